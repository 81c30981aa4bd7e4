"""Preference pairs: offline pair files and pairs mined online from groups under any reward.

A pair file is jsonl, one pair per line: ``{"prompt": ..., "chosen": "a.png", "rejected": "b.png", ...}``;
image paths are relative to the file's directory; other keys become metadata. For a video model the pair
is two videos (``"chosen": "a.gif"``; GIF, or MP4 and other formats through ``imageio``); for an image-to-video
model both were generated from one conditioning first frame, ``"image": "first.png"`` (:func:`load_pair_file`
with ``first_frame=True``). Online pairs take, in each
group of samples of one prompt, the best against the worst sample under the reward (or the ``k`` best
against the ``k`` worst, rank by rank), when their reward gap is at least ``min_gap`` and never when they tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.data.prompts import read_jsonl

__all__ = ["PairRecord", "load_pair_file", "load_image", "load_video", "mine_pairs"]


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    chosen: Path
    rejected: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    image: Path | None = None  # the conditioning first frame of a video pair


def load_pair_file(path: str | Path, first_frame: bool = False) -> list[PairRecord]:
    """The pairs of a pair file; with ``first_frame=True`` every pair must name its conditioning first frame
    (``"image"``), which becomes :attr:`PairRecord.image` instead of metadata."""
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
        for sample in (chosen, rejected):
            if not sample.is_file():
                raise FileNotFoundError(f"{path}:{number}: {str(sample)!r} does not exist.")
        first = None
        if first_frame:
            if not isinstance(item.get("image"), str):
                raise ValueError(
                    f"{path}:{number}: a video pair needs the conditioning first frame both videos were generated "
                    'from: add "image": "first.png" (a path relative to the file).'
                )
            first = path.parent / item["image"]
            if not first.is_file():
                raise FileNotFoundError(f"{path}:{number}: image {str(first)!r} does not exist.")
        fields = (
            ("prompt", "chosen", "rejected", "image") if first_frame else ("prompt", "chosen", "rejected")
        )
        extra = {k: v for k, v in item.items() if k not in fields}
        pairs.append(PairRecord(item["prompt"], chosen, rejected, extra, first))
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


def load_video(path: Path, num_frames: int, size: tuple[int, int]) -> Tensor:
    """``[num_frames, 3, H, W]`` float in [0, 1] from a video file (diffusers' ``load_video``: GIF with PIL,
    other formats with imageio); another frame count or frame size is an error, not silently resampled."""
    import numpy as np
    from diffusers.utils import load_video as read_frames

    try:
        frames = read_frames(str(path))
    except (ImportError, AttributeError, OSError, ValueError) as err:
        raise ValueError(f"video {str(path)!r} cannot be read: {err}") from None
    if str(path).lower().endswith(".gif") and len(frames) < num_frames:
        frames = _unmerged_gif_frames(path, frames, num_frames)
    if len(frames) != num_frames:
        raise ValueError(
            f"video {str(path)!r} has {len(frames)} frames, the model makes {num_frames}; cut or pad it first."
        )
    height, width = size
    if frames[0].size != (width, height):
        raise ValueError(
            f"video {str(path)!r} is {frames[0].size[0]}x{frames[0].size[1]}, the model trains at {width}x{height} "
            "(the pair's first frame, or model.resolution); resize it."
        )
    array = np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) for frame in frames]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _unmerged_gif_frames(path: Path, frames: list, num_frames: int) -> list:
    """A GIF writer (Pillow's among them) stores identical consecutive frames once, with their durations
    summed: a still video of 5 frames reads back as 1. With the expected frame count, each stored frame
    stands for ``duration / (total / num_frames)`` frames when that is a whole number for every frame;
    otherwise the frames are returned as stored (and the count check names the file)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        durations = [frame.info.get("duration") or 0 for frame in ImageSequence.Iterator(gif)]
    if len(durations) != len(frames) or min(durations) <= 0:
        return frames
    unit = sum(durations) / num_frames
    counts = [d / unit for d in durations]
    if any(abs(c - round(c)) > 1e-6 or round(c) < 1 for c in counts):
        return frames
    return [frame for frame, c in zip(frames, counts) for _ in range(round(c))]


def mine_pairs(
    rewards: Tensor, group_ids: Tensor, min_gap: float = 0.0, per_group: int = 1
) -> list[tuple[int, int]]:
    """``(winner, loser)`` indices mined in each group: the ``i``-th best against the ``i``-th worst for
    ``i < per_group`` (``per_group=1``: best vs worst, first index on ties), each pair kept only when
    ``best - worst >= min_gap`` and ``best > worst`` (ties are skipped). A sample is in at most one pair, so
    ``per_group`` is capped at half the group."""
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError("rewards and group_ids must both be [n].")
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}.")
    rewards, group_ids = rewards.detach().cpu(), group_ids.cpu()  # rewards gathered on a GPU, ids on the CPU
    pairs = []
    for g in torch.unique(group_ids, sorted=True).tolist():
        idx = (group_ids == g).nonzero().flatten()
        r = rewards[idx]
        k = min(per_group, max(1, len(idx) // 2))
        best = idx[torch.sort(r, descending=True, stable=True).indices[:k]].tolist()
        worst = idx[torch.sort(r, stable=True).indices[:k]].tolist()
        for winner, loser in zip(best, worst):
            gap = (rewards[winner] - rewards[loser]).item()
            if gap > 0 and gap >= min_gap:
                pairs.append((winner, loser))
    return pairs
