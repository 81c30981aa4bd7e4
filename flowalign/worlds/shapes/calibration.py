"""The judge's calibration suite: procedurally imperfect images whose correct verdict is known.

The shapes world's detector (:mod:`rewards.shapes.detector`) must say what a careful person would: an
image that shows what the prompt asks for, drawn with a generative model's imperfections, is correct; an
image that does not is incorrect, however cleanly it is drawn. This module makes such images for every
GenEval task, with a verdict known by construction, so that the judge can be measured before anything is
measured with it. It is never fitted to model samples.

Every case starts from a scene that satisfies the prompt (:func:`~flowalign.worlds.shapes.sample_scene`,
0-1 distractors of classes the prompt does not name), redrawn **continuously**: each object is its
shape's figure (:func:`rewards.shapes.sprites.shape_mask`'s definition) with side ``size x U(0.85, 1.15)``
and its centre moved by ``U(-0.5, 0.5)`` px in x and y, rendered with 4 x 4 supersampling (anti-aliased,
soft edges). A case is redrawn when two objects' pixels come within one pixel of each other, an object
leaves the canvas, or (positives) the objects' true boxes no longer satisfy the prompt under GenEval's
rules (a sub-pixel shift can flip a borderline position).

**Positives** then get a random subset (each with probability 1/2, at least one; ``blur`` and ``fringe``
never together) of the :data:`PERTURBATIONS`:

- ``blur``: Gaussian blur, sigma ``U(0.3, 0.7)`` px;
- ``fringe``: each colour channel blurred with its own sigma ``U(0.2, 0.7)`` (colour fringes at edges);
- ``boundary``: every pixel on either side of an object's edge flips (drawn / erased) with probability 0.15;
- ``colour_noise``: every channel value jittered by ``N(0, 0.12)``, clipped to its side of 128/255 (the
  colour of a pixel never changes);
- ``fragment``: a piece of a shape (side 3-4 px, so 9-16 px) of a random colour, 2 px or more from
  everything: not an object;
- ``speckles``: 3-8 isolated pixels of random colours.

**Negatives** get one of the :data:`NEGATIVE_KINDS` the prompt's task allows, plus the same random
perturbations (so that cleanliness is no cue):

- ``wrong_shape``: one object a clause asks for has another shape the prompt does not name;
- ``wrong_colour``: one object a colour clause asks for has another colour; ``swapped_colours``
  (color_attr): the two colours swapped;
- ``extra_object`` / ``missing_object``: counting with ``N + 1`` / ``N - 1`` objects; other tasks with
  one asked-for object removed;
- ``wrong_position``: the two objects of a position prompt swap places;
- ``merged``: two asked-for objects drawn in one colour with their centres ``0.25-0.5`` side apart,
  one blob (counting and two_object);
- ``half_drawn``: one asked-for object cut by a line through its area centroid at ``30-150`` degrees
  from the horizontal, one side erased (40-60% of its pixels left).

Negatives whose failure is geometric (``wrong_position``, counts) are kept only when the objects' true
boxes fail the prompt under GenEval's rules. All randomness comes from the ``numpy.random.Generator``
built from ``seed``; images are quantized to multiples of 1/255.

``python benchmarks/shapes/judge_calibration.py`` prints the suite's confusion table per task; the
test suite checks a fixed-seed subset.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from flowalign.worlds.shapes.sampler import sample_scene
from flowalign.worlds.shapes.scene import IMAGE_SIZE, Scene
from rewards.geneval.scorer import TASKS, Detection, evaluate
from rewards.shapes.sprites import COLORS, SHAPES

__all__ = [
    "NEGATIVE_KINDS",
    "PERTURBATIONS",
    "CalibrationCase",
    "Figure",
    "calibration_suite",
    "render_figures",
    "world_prompts",
]

PERTURBATIONS: tuple[str, ...] = ("blur", "fringe", "boundary", "colour_noise", "fragment", "speckles")
NEGATIVE_KINDS: dict[str, tuple[str, ...]] = {
    "single_object": ("wrong_shape", "missing_object", "half_drawn"),
    "two_object": ("wrong_shape", "missing_object", "merged", "half_drawn"),
    "counting": ("wrong_shape", "extra_object", "missing_object", "merged", "half_drawn"),
    "colors": ("wrong_shape", "wrong_colour", "half_drawn"),
    "position": ("wrong_shape", "missing_object", "wrong_position", "half_drawn"),
    "color_attr": ("wrong_shape", "wrong_colour", "swapped_colours", "missing_object", "half_drawn"),
}
"""The negative kinds each task's prompts can be corrupted by."""

_SUPERSAMPLE = 4
_PROMPTS_DIR = Path(__file__).resolve().parents[3] / "assets" / "shapes" / "prompts"


@dataclass(frozen=True)
class Figure:
    """One continuous object: its shape's figure with side ``side`` centred at ``(cx, cy)`` (pixels; the
    image's top-left corner is ``(0, 0)``), optionally cut: only the half-plane ``nx u + ny v <= c`` is
    kept, ``cut = (nx, ny, c)``, with ``(u, v) = 2 (x - cx, y - cy)``."""

    shape: str
    color: str
    cx: float
    cy: float
    side: float
    cut: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class CalibrationCase:
    """One image of the suite with its known verdict.

    Attributes:
        metadata: the GenEval prompt metadata it is judged against.
        image: ``[3, 32, 32]`` float32 in ``[0, 1]``.
        positive: True when a careful person would judge the image correct for the prompt.
        kind: ``"positive"`` or one of :data:`NEGATIVE_KINDS`.
        perturbations: the :data:`PERTURBATIONS` applied.
    """

    metadata: dict[str, Any]
    image: Tensor
    positive: bool
    kind: str
    perturbations: tuple[str, ...] = field(default=())

    @property
    def tag(self) -> str:
        return self.metadata["tag"]


def world_prompts() -> list[dict[str, Any]]:
    """Every prompt of the shapes world (train, test and unseen splits), the suite's prompt pool."""
    from flowalign.worlds.shapes.prompts import load_prompts

    return [
        dict(p)
        for split in ("train", "test", "unseen")
        for p in load_prompts(_PROMPTS_DIR / f"{split}.jsonl")
    ]


# --- rendering ----------------------------------------------------------------------------------------------


def _coverage(fig: Figure, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel inside the figure, from ``_SUPERSAMPLE^2`` samples per pixel ``[H, W]``."""
    k = _SUPERSAMPLE
    offsets = (np.arange(k) + 0.5) / k
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    # Twice the offset from the centre in units where the box is [-side, side] (shape_mask's u, v).
    u, v = np.meshgrid(2 * (xs - fig.cx), 2 * (ys - fig.cy), indexing="xy")
    s = fig.side
    in_box = (np.abs(u) <= s) & (np.abs(v) <= s)
    if fig.shape == "circle":
        inside = u**2 + v**2 <= s**2
    elif fig.shape == "square":
        inside = in_box
    elif fig.shape == "triangle":
        inside = in_box & (2 * np.abs(u) <= v + s)
    else:
        inside = np.abs(u) + np.abs(v) <= s
    if fig.cut is not None:
        inside &= fig.cut[0] * u + fig.cut[1] * v <= fig.cut[2]
    return inside.reshape(height, k, width, k).mean(axis=(1, 3))


def render_figures(
    figures: Sequence[Figure], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE
) -> np.ndarray:
    """Anti-aliased render ``[3, H, W]`` float64 of figures painted in order on black."""
    canvas = np.zeros((3, height, width))
    for fig in figures:
        cover = _coverage(fig, height, width)
        canvas = canvas * (1 - cover) + cover * np.array(COLORS[fig.color], dtype=np.float64)[:, None, None]
    return canvas


def _masks(figures: Sequence[Figure], height: int, width: int) -> list[np.ndarray]:
    return [_coverage(f, height, width) >= 0.5 for f in figures]


def _valid(figures: Sequence[Figure], height: int, width: int, merged: tuple[int, int] | None = None) -> bool:
    """Inside the canvas, and no two objects' pixels within one pixel (8-neighbourhood) of each other
    (except the pair deliberately ``merged``)."""
    for f in figures:
        half = f.side / 2
        if f.cx - half < 0 or f.cy - half < 0 or f.cx + half > width or f.cy + half > height:
            return False
    masks = _masks(figures, height, width)
    if any(not m.any() for m in masks):
        return False
    grown = [ndimage.binary_dilation(m, np.ones((3, 3), bool)) for m in masks]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            if merged is not None and {a, b} == set(merged):
                continue
            if (grown[a] & masks[b]).any():
                return False
    return True


def _true_detections(figures: Sequence[Figure], height: int, width: int) -> list[Detection]:
    """What a careful observer sees: every whole figure with its box (of its pixels at coverage >= 0.5)."""
    dets = []
    for f, m in zip(figures, _masks(figures, height, width)):
        if f.cut is not None or not m.any():
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        dets.append(Detection(f.shape, f.color, box, 1.0))
    return dets


# --- perturbations ----------------------------------------------------------------------------------------


def _blur(image: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(c, s, mode="constant") for c, s in zip(image, sigmas)])


def _boundary_noise(image: np.ndarray, masks: Sequence[np.ndarray], figures, rng, p: float = 0.15):
    out = image.copy()
    grown = [ndimage.binary_dilation(m, np.ones((3, 3), bool)) for m in masks]
    for i, (m, f) in enumerate(zip(masks, figures)):
        inner = m & ~ndimage.binary_erosion(m)
        outer = ~m & ndimage.binary_dilation(m)
        others = np.zeros_like(m)
        for j, g in enumerate(grown):
            if j != i:
                others |= g
        erase = inner & (rng.random(m.shape) < p)
        draw = outer & ~others & (rng.random(m.shape) < p)
        out[:, erase] = 0.0
        out[:, draw] = np.array(COLORS[f.color], dtype=np.float64)[:, None]
    return out


def _colour_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    on = image * 255 >= 128
    noisy = image + rng.normal(0, 0.12, image.shape)
    return np.where(on, np.clip(noisy, 128 / 255, 1.0), np.clip(noisy, 0.0, 127 / 255))


def _free_spot(occupied: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner where a ``size`` box has 2 px or more of empty space around it."""
    h, w = occupied.shape
    blocked = ndimage.binary_dilation(occupied, np.ones((5, 5), bool))
    spots = [
        (y, x)
        for y in range(h - size + 1)
        for x in range(w - size + 1)
        if not blocked[y : y + size, x : x + size].any()
    ]
    return spots[int(rng.integers(len(spots)))] if spots else None


def _add_fragment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    size = int(rng.integers(3, 5))
    spot = _free_spot((image * 255 >= 128).any(0), size, rng)
    if spot is None:
        return None
    shape = ("circle", "square")[int(rng.integers(2))]
    fig = Figure(
        shape, list(COLORS)[int(rng.integers(len(COLORS)))], spot[1] + size / 2, spot[0] + size / 2, size
    )
    cover = _coverage(fig, *image.shape[1:])
    return image * (1 - cover) + cover * np.array(COLORS[fig.color], dtype=np.float64)[:, None, None]


def _add_speckles(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    occupied = ndimage.binary_dilation((image * 255 >= 128).any(0), np.ones((3, 3), bool))
    free = np.argwhere(~occupied)
    for y, x in free[rng.permutation(len(free))[: int(rng.integers(3, 9))]]:
        out[:, y, x] = COLORS[list(COLORS)[int(rng.integers(len(COLORS)))]]
    return out


def _perturb(
    image: np.ndarray, figures: Sequence[Figure], rng: np.random.Generator
) -> tuple[np.ndarray, tuple[str, ...]]:
    chosen = [p for p in PERTURBATIONS if rng.random() < 0.5]
    if not chosen:
        chosen = [PERTURBATIONS[int(rng.integers(len(PERTURBATIONS)))]]
    if "blur" in chosen and "fringe" in chosen:  # one way of softening edges per image
        chosen.remove(("blur", "fringe")[int(rng.integers(2))])
    height, width = image.shape[1:]
    applied = []
    for name in chosen:
        if name == "blur":
            image = _blur(image, [rng.uniform(0.3, 0.7)] * 3)
        elif name == "fringe":
            image = _blur(image, rng.uniform(0.2, 0.7, size=3))
        elif name == "boundary":
            image = _boundary_noise(image, _masks(figures, height, width), figures, rng)
        elif name == "colour_noise":
            image = _colour_noise(image, rng)
        elif name == "fragment":
            with_fragment = _add_fragment(image, rng)
            if with_fragment is None:
                continue
            image = with_fragment
        else:
            image = _add_speckles(image, rng)
        applied.append(name)
    return image, tuple(applied)


# --- cases --------------------------------------------------------------------------------------------------


def _figures(scene: Scene, rng: np.random.Generator) -> list[Figure]:
    figures = []
    for obj in scene.objects:
        figures.append(
            Figure(
                obj.shape, obj.color,
                cx=obj.x + obj.size / 2 + rng.uniform(-0.5, 0.5), cy=obj.y + obj.size / 2 + rng.uniform(-0.5, 0.5),
                side=obj.size * rng.uniform(0.85, 1.15),
            )
        )  # fmt: skip
    return figures


def _named_indices(figures: Sequence[Figure], metadata: Mapping[str, Any]) -> list[int]:
    named = {c["class"] for c in metadata["include"]}
    return [i for i, f in enumerate(figures) if f.shape in named]


def _corrupt(
    figures: list[Figure], metadata: Mapping[str, Any], kind: str, rng: np.random.Generator
) -> tuple[list[Figure], tuple[int, int] | None] | None:
    """Apply a negative ``kind``; None when this scene cannot carry it."""
    include = metadata["include"]
    named_classes = {c["class"] for c in include} | {c["class"] for c in metadata.get("exclude", [])}
    targets = _named_indices(figures, metadata)
    if not targets:
        return None
    pick = targets[int(rng.integers(len(targets)))]
    figures = list(figures)
    if kind == "wrong_shape":
        others = [s for s in SHAPES if s not in named_classes]
        if not others:
            return None
        figures[pick] = replace(figures[pick], shape=others[int(rng.integers(len(others)))])
    elif kind == "wrong_colour":
        clause = next((c for c in include if c["class"] == figures[pick].shape and "color" in c), None)
        if clause is None:
            return None
        others = [c for c in COLORS if c != clause["color"]]
        figures[pick] = replace(figures[pick], color=others[int(rng.integers(len(others)))])
    elif kind == "swapped_colours":
        if len(targets) != 2 or figures[targets[0]].color == figures[targets[1]].color:
            return None
        a, b = targets
        figures[a], figures[b] = (
            replace(figures[a], color=figures[b].color),
            replace(figures[b], color=figures[a].color),
        )
    elif kind == "missing_object":
        del figures[pick]
    elif kind == "extra_object":
        color = include[0].get("color") or list(COLORS)[int(rng.integers(len(COLORS)))]
        side = float(rng.choice([9, 11])) * rng.uniform(0.85, 1.15)
        for _ in range(50):  # a free spot for the (N + 1)-th object
            cx, cy = rng.uniform(side / 2, IMAGE_SIZE - side / 2, size=2)
            extra = replace(figures[pick], color=color, cx=float(cx), cy=float(cy), side=side)
            if _valid([*figures, extra], IMAGE_SIZE, IMAGE_SIZE):
                figures.append(extra)
                break
        else:
            return None
    elif kind == "wrong_position":
        if len(targets) != 2:
            return None
        a, b = targets
        fa, fb = figures[a], figures[b]
        figures[a] = replace(fa, cx=fb.cx, cy=fb.cy)
        figures[b] = replace(fb, cx=fa.cx, cy=fa.cy)
    elif kind == "merged":
        if len(targets) < 2:
            return None
        a, b = rng.choice(targets, size=2, replace=False)
        fa, fb = figures[a], figures[b]
        distance = rng.uniform(0.25, 0.5) * max(fa.side, fb.side)
        angle = rng.uniform(0, 2 * math.pi)
        figures[b] = replace(
            fb, color=fa.color, cx=fa.cx + distance * math.cos(angle), cy=fa.cy + distance * math.sin(angle)
        )
        return figures, (int(a), int(b))
    elif kind == "half_drawn":
        angle = math.radians(rng.uniform(30, 150)) + (math.pi if rng.random() < 0.5 else 0.0)
        figures[pick] = _cut_through_centroid(figures[pick], (math.sin(angle), -math.cos(angle)))
    else:
        raise ValueError(
            f"unknown negative kind {kind!r}; expected one of {sorted(set(sum(NEGATIVE_KINDS.values(), ())))}."
        )
    return figures, None


def _cut_through_centroid(fig: Figure, normal: tuple[float, float]) -> Figure:
    """``fig`` cut by the line through its area centroid ``g`` with the given normal: the half-plane
    ``normal . (p - g) <= 0`` is kept, stored in :class:`Figure`'s doubled coordinates."""
    cover = _coverage(fig, IMAGE_SIZE, IMAGE_SIZE)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    gx, gy = (cover * xs).sum() / cover.sum() - fig.cx, (cover * ys).sum() / cover.sum() - fig.cy
    return replace(fig, cut=(normal[0], normal[1], 2 * (normal[0] * gx + normal[1] * gy)))


def _half_drawn_ok(figures: Sequence[Figure], height: int, width: int) -> bool:
    """The cut object keeps 40-60% of its pixels."""
    for f in figures:
        if f.cut is not None:
            whole = (_coverage(replace(f, cut=None), height, width) >= 0.5).sum()
            kept = (_coverage(f, height, width) >= 0.5).sum()
            return 0.4 <= kept / max(whole, 1) <= 0.6
    return True


def _case(
    metadata: Mapping[str, Any], positive: bool, rng: np.random.Generator, max_tries: int = 200
) -> CalibrationCase | None:
    height = width = IMAGE_SIZE
    kinds = NEGATIVE_KINDS[metadata["tag"]]
    for _ in range(max_tries):
        scene = sample_scene(metadata, rng, n_distractors=int(rng.integers(0, 2)))
        figures = _figures(scene, rng)
        kind, merged = "positive", None
        if not positive:
            kind = kinds[int(rng.integers(len(kinds)))]
            corrupted = _corrupt(figures, metadata, kind, rng)
            if corrupted is None:
                continue
            figures, merged = corrupted
        if not _valid(figures, height, width, merged) or not _half_drawn_ok(figures, height, width):
            continue
        truth = evaluate(_true_detections(figures, height, width), metadata).correct
        if positive != truth and (positive or kind in ("wrong_position", "extra_object", "missing_object")):
            continue
        image, applied = _perturb(render_figures(figures, height, width), figures, rng)
        image = np.round(np.clip(image, 0, 1) * 255) / 255
        return CalibrationCase(
            copy.deepcopy(dict(metadata)), torch.from_numpy(image.astype(np.float32)), positive, kind, applied
        )
    return None


def calibration_suite(
    cases_per_task: int, seed: int, prompts: Sequence[Mapping[str, Any]] | None = None
) -> list[CalibrationCase]:
    """``cases_per_task`` positives and as many negatives for each GenEval task, drawn with ``seed``.

    Prompts are drawn uniformly from ``prompts`` (default: :func:`world_prompts`) within each task; each
    negative's kind uniformly from the task's :data:`NEGATIVE_KINDS` (redrawn when a scene cannot carry it).
    """
    if cases_per_task < 1:
        raise ValueError(f"cases_per_task must be >= 1, got {cases_per_task}.")
    rng = np.random.default_rng(seed)
    pool = [dict(p) for p in (prompts if prompts is not None else world_prompts())]
    cases = []
    for tag in TASKS:
        of_task = [p for p in pool if p["tag"] == tag]
        if not of_task:
            continue
        for positive in (True, False):
            made = 0
            while made < cases_per_task:
                case = _case(of_task[int(rng.integers(len(of_task)))], positive, rng)
                if case is not None:
                    cases.append(case)
                    made += 1
    return cases
