"""Preference pairs: offline pair files and pairs mined online from groups under any reward.

A pair file is jsonl, one pair per line: ``{"prompt": ..., "chosen": "a.png", "rejected": "b.png", ...}``;
image paths are relative to the file's directory; other keys become metadata. Online pairs take, in each
group of samples of one prompt, the best against the worst sample under the reward, when their reward gap
is at least ``min_gap`` and never when they tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.data.prompts import read_jsonl

__all__ = ["PairRecord", "load_pair_file", "load_image", "mine_pairs"]


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    chosen: Path
    rejected: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def load_pair_file(path: str | Path) -> list[PairRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair file {str(path)!r} does not exist.")
    pairs = []
    for number, item in read_jsonl(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(
                f"{path}:{number}: each pair needs string fields prompt, chosen, rejected; missing {missing}."
            )
        chosen, rejected = path.parent / item["chosen"], path.parent / item["rejected"]
        for image in (chosen, rejected):
            if not image.is_file():
                raise FileNotFoundError(f"{path}:{number}: image {str(image)!r} does not exist.")
        extra = {k: v for k, v in item.items() if k not in ("prompt", "chosen", "rejected")}
        pairs.append(PairRecord(item["prompt"], chosen, rejected, extra))
    if not pairs:
        raise ValueError(f"pair file {str(path)!r} holds no pairs.")
    return pairs


def load_image(path: Path, size: int) -> Tensor:
    """``[3, size, size]`` float in [0, 1]; an image of another size is an error, not silently resized."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            raise ValueError(
                f"image {str(path)!r} is {image.size[0]}x{image.size[1]}, the model trains at {size}x{size}; resize it first."
            )
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def mine_pairs(rewards: Tensor, group_ids: Tensor, min_gap: float = 0.0) -> list[tuple[int, int]]:
    """``(winner, loser)`` indices: per group the best and the worst sample (first index on ties), kept only
    when ``best - worst >= min_gap`` and ``best > worst`` (ties are skipped)."""
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError("rewards and group_ids must both be [n].")
    pairs = []
    for g in torch.unique(group_ids, sorted=True).tolist():
        idx = (group_ids == g).nonzero().flatten()
        r = rewards[idx]
        best, worst = idx[int(torch.argmax(r))].item(), idx[int(torch.argmin(r))].item()
        gap = (rewards[best] - rewards[worst]).item()
        if gap > 0 and gap >= min_gap:
            pairs.append((best, worst))
    return pairs
