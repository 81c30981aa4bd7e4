"""The moving-shapes world: true videos, prompts and records, and the judge validated on videos built for
it (true ones and eight kinds of wrong ones, all softened like a generative model's frames)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowalign.worlds.moving_shapes import (
    NEGATIVE_KINDS,
    STEP,
    MotionSpec,
    judge_video,
    motion_prompt,
    render_video,
    sample_spec,
    spec_from_record,
    validation_suite,
    write_prompt_set,
)
from flowalign.worlds.shapes.scene import Scene, SceneObject


def _spec():
    scene = Scene((SceneObject("circle", "red", 9, 2, 2), SceneObject("square", "blue", 9, 20, 20)))
    return MotionSpec(scene, 0, "right")


def test_true_video_prompt_and_record_roundtrip(tmp_path):
    spec = _spec()
    assert motion_prompt(spec) == "the red circle moves right while the blue square stays"
    video = render_video(spec)
    assert video.shape == (5, 3, 32, 32)
    red = video[:, 0] * (1 - video[:, 2])  # the red circle's pixels
    columns = [torch.nonzero(frame.sum(0)).min().item() for frame in red]
    assert columns == [2 + STEP * t for t in range(5)]
    assert torch.equal(
        video[:, 2, 20:29, 20:29], video[:1, 2, 20:29, 20:29].expand(5, -1, -1)
    )  # the square stays
    path = write_prompt_set(tmp_path, [spec], "test")
    record = json.loads(path.read_text())
    assert (
        record["prompt"] == motion_prompt(spec)
        and record["tag"] == "move_stay"
        and (tmp_path / record["image"]).is_file()
    )
    assert spec_from_record(record) == spec
    with pytest.raises(ValueError, match="a moving-shapes record needs 'scene'"):
        spec_from_record({"prompt": "the red circle moves right"})


def test_sampled_videos_are_valid_and_judged_correct():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(50)]
    assert {s.task for s in specs} == {"move", "move_stay"} and {s.direction for s in specs} == {
        "left",
        "right",
        "up",
        "down",
    }
    assert all(judge_video(render_video(s), s).correct for s in specs)


def test_the_judge_agrees_with_the_built_verdicts_on_every_case():
    """Confusion on the validation suite (10 videos of each kind here; 100 each in the judge's card): the
    true videos pass, each of the eight wrong kinds fails identity and/or motion exactly as built."""
    cases = validation_suite(10, seed=3)
    assert {c[0] for c in cases} == {"true", *NEGATIVE_KINDS}
    for kind, spec, video, identity, motion in cases:
        verdict = judge_video(video, spec)
        assert (verdict.identity, verdict.motion) == (identity, motion), (kind, verdict.reason)
        assert verdict.correct == (kind == "true")


def test_the_judge_under_the_calibration_perturbations():
    """With every frame drawn as the shapes judge's calibration suite draws images (scale jitter, sub-pixel
    placement, boundary noise, fringes, fragments, speckles), the built verdicts are kept and the judge agrees
    on 53 of these 54 videos (its card: 892 / 900 and 887 / 900 on two draws of 100 per kind; the misses are
    single-frame drop-outs of small diamonds and triangles, the image judge's weak spot; the image judge's
    third version agreed on 52)."""
    cases = validation_suite(6, seed=3, perturbation="full")
    assert {c[0] for c in cases} == {"true", *NEGATIVE_KINDS} and len(cases) == 54
    video = cases[0][2]
    assert ((video * 255) % 255 != 0).float().mean() > 0.1  # anti-aliased and noisy, not an exact render
    verdicts = [judge_video(v, spec) for _, spec, v, _, _ in cases]
    agree = [(v.identity, v.motion) == (c[3], c[4]) for v, c in zip(verdicts, cases)]
    assert sum(agree) == 53
    with pytest.raises(ValueError, match="perturbation must be one of"):
        validation_suite(1, perturbation="harsh")


def test_bad_specs_are_one_line():
    scene = Scene((SceneObject("circle", "red", 9, 2, 2), SceneObject("circle", "red", 9, 20, 20)))
    with pytest.raises(ValueError, match="must differ in shape or colour"):
        MotionSpec(scene, 0, "right")
    with pytest.raises(ValueError, match="direction must be one of"):
        MotionSpec(_spec().scene, 0, "sideways")
