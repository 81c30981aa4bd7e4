"""The moving-shapes object-identity embedder behind the identity reward: its card numbers reproduce, and the
reward ranks a true video above the same video with an object changed, removed or added."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flowalign.worlds.moving_shapes import sample_spec, soften, validation_case
from flowalign.worlds.moving_shapes_identity import CORRUPTIONS, separation
from flowalign.worlds.shapes.scene import SceneError
from rewards.registry import load_reward

ROOT = Path(__file__).resolve().parents[1]
EMBEDDER = ROOT / "assets" / "moving_shapes" / "rewards" / "object_identity.pt"


def test_the_shipped_embedders_separation_reproduces():
    report = json.loads(EMBEDDER.with_suffix(".json").read_text())
    measured = separation(torch.jit.load(str(EMBEDDER)))
    assert measured == {k: report[k] for k in measured}
    assert report["ranked_correctly"] >= 0.99 and report["cos_same_video"] - report["cos_corrupted"] > 0.3


def test_identity_reward_ranks_the_true_video_above_a_corrupted_one():
    reward = load_reward(
        "identity",
        backend="torch",
        detector="none",
        embedder_path=str(EMBEDDER),
        input_size=32,
        pool_reduce="mean",
    )
    rng = np.random.default_rng(7)
    wins = total = 0
    while total < 24:
        spec = sample_spec(rng)
        try:
            corrupted, _, _ = validation_case(spec, CORRUPTIONS[total % len(CORRUPTIONS)], rng)
        except SceneError:
            continue
        true, _, _ = validation_case(spec, "true", rng)
        videos = torch.stack([soften(true, rng), soften(corrupted, rng)])
        reference = {"reference": videos[0, :1]}  # the pool: the conditioning first frame
        scores = reward(videos, ["p", "p"], [reference, reference]).scores
        wins += int(scores[0] > scores[1])
        total += 1
    assert wins == total
