"""The moving-shapes world's object-identity embedder: the analogue of a face embedder, for the ``identity``
reward of this world (IPRO's reward, Shen et al. 2025, with objects for faces).

An :class:`ObjectEmbedder` maps a 32x32 frame to a unit vector that should depend on *which* objects the
frame holds (their shapes and colours) and not on *where* they are: frames of one true video (the objects
moved) embed close together, frames in which an object changed shape or colour, vanished or appeared embed
apart. It is a small convolutional network with global pooling (translation-invariant by construction
up to the border), trained procedurally -- never on model samples -- with InfoNCE (van den Oord et al.
2018): for an anchor frame of a true video, the positive is another frame of the same video and the
negatives are the other videos' frames in the batch plus a corrupted copy of the positive (the validation
kinds of :mod:`flowalign.worlds.moving_shapes`: recoloured, reshaped, vanished, appeared). All frames are
softened like a model's (:func:`~flowalign.worlds.moving_shapes.soften`).

``python -m flowalign.worlds.moving_shapes_identity --out assets/moving_shapes/rewards/object_identity.pt``
trains it and writes a TorchScript file that the ``identity`` reward loads offline:
``identity: {backend: torch, detector: none, embedder_path: assets/moving_shapes/rewards/object_identity.pt,
input_size: 32}``, with each prompt record's first frame as its reference (``"reference"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.worlds.moving_shapes import (
    NUM_FRAMES,
    render_video,
    sample_spec,
    soften,
    validation_case,
)

__all__ = ["ObjectEmbedder", "identity_pairs", "main", "train_embedder"]

CORRUPTIONS = ("recoloured", "reshaped", "vanishes", "appears")


class ObjectEmbedder(nn.Module):
    """``[N, 3, 32, 32]`` frames normalised as the identity reward feeds them (``(x - 0.5) / 0.5``) ->
    ``[N, dim]`` unit vectors: three 3x3 conv stages (32/64/128 channels, the last two stride 2), global mean
    and max pooling, a linear projection."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.project = nn.Linear(256, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)
        return F.normalize(self.project(pooled), dim=1)


def identity_pairs(rng: np.random.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` (anchor, positive, corrupted) frames in ``[0, 1]``: frame 0 and a later frame of one true video,
    and that later frame with one object changed, removed or added."""
    from flowalign.worlds.shapes.scene import SceneError

    anchors, positives, negatives = [], [], []
    while len(anchors) < n:
        spec = sample_spec(rng)
        kind = CORRUPTIONS[rng.integers(len(CORRUPTIONS))]
        try:
            corrupted, _, _ = validation_case(spec, kind, rng)
        except SceneError:
            continue
        video = render_video(spec)
        t = int(rng.integers(3, NUM_FRAMES))  # frames 3.. are corrupted in every kind
        anchors.append(soften(video[:1], rng)[0])
        positives.append(soften(video[t : t + 1], rng)[0])
        negatives.append(soften(corrupted[t : t + 1], rng)[0])
    return torch.stack(anchors), torch.stack(positives), torch.stack(negatives)


def _normalise(x: Tensor) -> Tensor:
    return (x - 0.5) / 0.5


def info_nce(
    model: ObjectEmbedder, anchors: Tensor, positives: Tensor, negatives: Tensor, temperature: float
) -> Tensor:
    """InfoNCE over the batch: each anchor's positive against every other positive and every corrupted frame."""
    a, p, c = (model(_normalise(x)) for x in (anchors, positives, negatives))
    logits = a @ torch.cat([p, c]).T / temperature
    return F.cross_entropy(logits, torch.arange(len(a)))


@torch.no_grad()
def separation(model: ObjectEmbedder, seed: int = 12345, n: int = 400) -> dict[str, float]:
    """On held-out triples: mean cosine of (first frame, later frame of the same video) and of (first frame,
    corrupted later frame), and the fraction of triples where the true frame is the closer one."""
    anchors, positives, negatives = identity_pairs(np.random.default_rng(seed), n)
    a, p, c = (model(_normalise(x)) for x in (anchors, positives, negatives))
    same, corrupted = (a * p).sum(1), (a * c).sum(1)
    return {
        "cos_same_video": round(same.mean().item(), 4),
        "cos_corrupted": round(corrupted.mean().item(), 4),
        "ranked_correctly": round((same > corrupted).float().mean().item(), 4),
        "triples": n,
    }


def train_embedder(
    steps: int = 1500, batch: int = 64, lr: float = 1e-3, temperature: float = 0.1, seed: int = 0
) -> tuple[ObjectEmbedder, list[dict]]:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ObjectEmbedder()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    log = []
    for step in tqdm(range(1, steps + 1), desc="object embedder", mininterval=5):
        loss = info_nce(model, *identity_pairs(rng, batch), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4)})
    return model.eval(), log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the moving-shapes object-identity embedder.")
    parser.add_argument("--out", required=True, help="TorchScript file to write")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, log = train_embedder(steps=args.steps)
    report = {
        "train_s": round(time.perf_counter() - start, 1),
        "steps": args.steps,
        "log": log,
        **separation(model),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "log"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
