"""The shapes judge's calibration: the procedural suite's verdicts, exactness on clean renders, and the
shape fit's pieces (issue 13; the full confusion table is benchmarks/results/judge_calibration/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from flowalign.worlds.shapes.calibration import NEGATIVE_KINDS, Figure, calibration_suite, render_figures
from flowalign.worlds.shapes.scene import render_scenes, scene_from_detections
from rewards.geneval import evaluate
from rewards.geneval.scorer import TASKS
from rewards.shapes import detect, detect_batch
from rewards.shapes.detector import _SMALLEST_AREA, CONFIDENCE_DECIMALS, fit_shape, signed_distance
from rewards.shapes.sprites import SHAPES, shape_mask, sprite_mask


@pytest.fixture(scope="module")
def suite():
    cases = calibration_suite(25, seed=7)
    verdicts = [
        evaluate(d, c.metadata).correct
        for c, d in zip(cases, detect_batch(torch.stack([c.image for c in cases])))
    ]
    return cases, verdicts


def test_suite_is_balanced_and_labelled(suite):
    cases, _ = suite
    for tag in TASKS:
        of_task = [c for c in cases if c.tag == tag]
        assert sum(c.positive for c in of_task) == 25 and sum(not c.positive for c in of_task) == 25
        assert {c.kind for c in of_task if not c.positive} <= set(NEGATIVE_KINDS[tag])
    assert all(c.image.shape == (3, 32, 32) and 0 <= c.image.min() and c.image.max() <= 1 for c in cases)
    # Quantized like a saved image, and never exactly binary (every image is soft or perturbed).
    assert all(torch.equal((c.image * 255).round() / 255, c.image) for c in cases)


def test_judge_meets_its_measured_rates_on_a_fixed_subset(suite):
    """The fixed-seed subset's rates (the card's targets are 97%; the reported draws of 200 per task are
    in benchmarks/results/judge_calibration/). Overall >= 97% both ways, every task >= 92% (at most 2 of
    its 25 wrong)."""
    cases, verdicts = suite
    pos = [v for c, v in zip(cases, verdicts) if c.positive]
    neg = [not v for c, v in zip(cases, verdicts) if not c.positive]
    assert np.mean(pos) >= 0.97 and np.mean(neg) >= 0.97
    for tag in TASKS:
        tp = [v for c, v in zip(cases, verdicts) if c.tag == tag and c.positive]
        tn = [not v for c, v in zip(cases, verdicts) if c.tag == tag and not c.positive]
        assert np.mean(tp) >= 0.92 and np.mean(tn) >= 0.92, (tag, np.mean(tp), np.mean(tn))


def test_clean_renders_are_exact_with_confidence_one():
    from flowalign.worlds.shapes.prompts import load_prompts
    from flowalign.worlds.shapes.sampler import sample_scene

    rng = np.random.default_rng(3)
    prompts = load_prompts(Path(__file__).resolve().parents[1] / "assets/shapes/prompts/train.jsonl")
    scenes = [
        sample_scene(prompts[int(rng.integers(len(prompts)))], rng, n_distractors=2) for _ in range(200)
    ]
    for scene, dets in zip(scenes, detect_batch(render_scenes(scenes))):
        assert scene_from_detections(dets) == scene and all(d.confidence == 1.0 for d in dets)


def test_shape_mask_extends_the_sprites_and_signed_distance_agrees_with_it():
    for shape in SHAPES:
        for size in (9, 11):
            assert np.array_equal(shape_mask(shape, size), sprite_mask(shape, size))
        for size in (8, 10, 13):
            i, j = np.mgrid[0:size, 0:size] + 0.5
            inside = signed_distance(shape, j - size / 2, i - size / 2, size) >= 0
            assert np.array_equal(inside, shape_mask(shape, size)), (shape, size)
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 9)
    with pytest.raises(ValueError, match=">= 3"):
        shape_mask("circle", 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_soft_shapes_are_confident_and_their_halves_are_not(shape):
    for side, cx, cy in ((8.0, 10.3, 12.6), (12.5, 15.5, 15.0)):
        image = torch.from_numpy(render_figures([Figure(shape, "green", cx, cy, side)]).astype(np.float32))
        (d,) = detect(image)
        assert d.class_name == shape and d.confidence > 0.9, (side, d)
    # The left half of an 11-px figure (a vertical cut through its centre) is no object.
    half = torch.from_numpy(render_figures([Figure(shape, "green", 15.5, 15.5, 11.0, cut=(1.0, 0.0, 0.0))]))
    assert detect(half.float()) == []


def test_blur_keeps_the_evidence_that_thresholding_loses():
    """A blurred 7.7-px square: its thresholded mask alone reads as a disc (the corners fell below the
    threshold), its pixel values still show the corners."""
    image = render_figures([Figure("square", "green", 12.3, 12.6, 7.7)])
    image = np.round(np.stack([ndimage.gaussian_filter(c, 0.6, mode="constant") for c in image]) * 255) / 255
    mask = image[1] * 255 >= 128
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert fit_shape(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]).shape == "circle"
    (d,) = detect(torch.from_numpy(image).float())
    assert (d.class_name, d.confidence) == ("square", 1.0)


def test_a_colour_fringe_of_another_code_still_shows_the_object():
    """A 7.7-px white diamond whose blue channel is blurred more than the others: its edge pixels
    threshold to yellow, a component of another colour, but their values still show the diamond. The
    third judge read them as 0 and scored this diamond 0.0694 (too small for the world); the value model
    now reads every pixel near a component except another object of the same colour."""
    image = render_figures([Figure("diamond", "white", 16.3, 15.8, 7.7)])
    image = np.round(np.stack([ndimage.gaussian_filter(c, s, mode="constant")
                               for c, s in zip(image, (0.2, 0.2, 0.7))]) * 255) / 255  # fmt: skip
    on = image * 255 >= 128
    assert (on[0] & on[1] & ~on[2]).any()  # a fringe pixel that thresholds to yellow
    found = [d for d in detect(torch.from_numpy(image).float(), 0.0) if d.pixel_count > 4]
    assert [(d.class_name, d.color, d.confidence) for d in found] == [("diamond", "white", 1.0)]


def test_another_object_of_the_same_colour_nearby_reads_as_nothing():
    """A same-coloured object two pixels away is another object, not this one's evidence: each object's
    detection is exactly what it is alone."""
    left, right = Figure("triangle", "green", 8.3, 15.6, 8.1), Figure("square", "green", 18.5, 15.5, 9.0)
    alone = [detect(torch.from_numpy(render_figures([f])).float())[0] for f in (left, right)]
    image = render_figures([left, right])
    assert (image[1, :, 12] > 0).any() and (image[1, :, 13] == 0).all() and (image[1, 11:20, 14] == 1).all()
    together = detect(torch.from_numpy(image).float())
    assert sorted(together, key=lambda d: d.bbox) == sorted(alone, key=lambda d: d.bbox)


@pytest.mark.parametrize("shape", SHAPES)
def test_figures_outside_the_worlds_sizes_are_no_objects(shape):
    """The world's objects have sides 7.65-12.65 px: a whole figure of side 5.5 (a triangle cut off a
    triangle is one) is too small to be one, a blob of side 15 too large."""
    for side, whole in ((5.5, False), (7.7, True), (15.0, False)):
        image = torch.from_numpy(render_figures([Figure(shape, "red", 15.5, 15.5, side)])).float()
        found = detect(image)
        assert (found != []) == whole and all(d.class_name == shape for d in found), (side, found)


def test_specks_too_small_to_fit_have_no_objectness():
    rng = np.random.default_rng(0)
    limit = int(np.ceil(_SMALLEST_AREA / 3))
    for _ in range(200):
        h, w = rng.integers(1, 7, size=2)
        mask = rng.random((h, w)) < 0.7
        mask[0, :] = mask[:, 0] = True
        if mask.sum() < limit:
            assert fit_shape(mask).objectness == 0.0


def test_rounding_a_square_moves_the_posterior_towards_the_circle():
    corners = [(0, 0), (0, 8), (8, 0), (8, 8)]
    square = np.ones((9, 9), dtype=bool)
    rounded = square.copy()
    for y, x in corners:  # one pixel off each corner: still a square with soft corners
        rounded[y, x] = False
    fits = [fit_shape(m) for m in (square, rounded, sprite_mask("circle", 9))]
    assert [f.shape for f in fits] == ["square", "square", "circle"]
    assert fits[0].confidence == 1.0 and fits[2].confidence == 1.0
    assert fits[1].shape_posterior[0] > fits[0].shape_posterior[0]
    assert fits[1].confidence == round(fits[1].shape_posterior[1] * fits[1].objectness, CONFIDENCE_DECIMALS)
