"""The shapes world's object detector: colour codes, connected components, a calibrated shape fit.

For images ``[3, H, W]`` (or batches ``[B, 3, H, W]``) of floats in ``[0, 1]``:

1. **Colour code.** A channel is on when ``value * 255 >= 128``; the pixel's code is ``R + 2 G + 4 B``
   (:data:`rewards.shapes.sprites.COLOR_TO_CODE`); code 0 (black) is background.
2. **Components.** Pixels of one code form 4-connected components (``scipy.ndimage.label`` with the
   cross structure); different codes never join. A component is one candidate object; its box is the
   component's bounding box (GenEval's mask-derived box) and its colour the code's.
3. **Shape fit.** Each shape's figure (the disc, square, triangle and diamond of
   :func:`rewards.shapes.sprites.shape_mask`) is considered at every side in :data:`SIDES` (the sprite
   sides 9 and 11 scaled by +-15%, in half pixels), at half-pixel phases and at placements within ~1.5
   px of the component's box centre. A pixel whose centre lies ``d`` px inside a figure's edge
   (:func:`signed_distance`, negative outside) is on with probability ``sigmoid(d / EDGE_SCALE)``:
   pixels deep inside are on, deep outside off, and pixels at the edge may go either way, which is how
   soft edges, blur, a one-pixel wobble and sub-pixel placement look after thresholding.
4. **Confidence** ``= P(shape | M) x objectness``:

   - ``P(shape | M)``: the posterior of the four shapes given the component's mask ``M`` under that
     pixel model, with a uniform prior over shapes, sides, phases and placements (each shape's
     likelihood summed over its figures). Near 1 when one shape explains the pixels clearly better than
     the others; towards 1/2 when two explain them equally (a blob half way between a circle and a
     square).
   - ``objectness``: is the component *one whole object* of the world? With the most likely figure ``T``,
     the misfit is the sum over pixels where ``M`` and ``T`` disagree of ``min(1, |d| / RAMP)`` (a
     disagreement on the edge costs nothing, one a pixel or more away from it costs 1), divided by
     ``|M u T|``. Objectness is 1 up to a misfit of :data:`MISFIT_FULL` and 0 from :data:`MISFIT_ZERO`,
     times a ramp on the box's aspect (short side / long side) from 0 at :data:`ASPECT_ZERO` to 1 at
     :data:`ASPECT_FULL`: every figure's box is square. Fragments, half-drawn shapes and specks leave much
     of every figure of the world's sizes unexplained or have the wrong proportions; two objects merged
     into one blob leave much of the blob unexplained.

   The confidence is rounded to :data:`CONFIDENCE_DECIMALS` decimals, so clearly drawn objects tie (a
   perfect render scores exactly 1.0) and the scorer breaks ties as GenEval does.

The confidence thus plays the role of Mask2Former's score in GenEval: how sure the detector is that a
component is one whole object of its class. Colour purity does not enter it (GenEval classifies colour
separately; here the colour is the thresholded code). A perfect render of a sprite is its own figure at an
integer placement, so ``detect(render(scene))`` recovers the scene exactly (class, colour and box, with
confidence 1.0). The card ``docs/shapes_judge.md`` gives the reasoning, how the constants were chosen
(on a development draw of the calibration suite, never on model samples) and the confusion table on the
reported draw (``benchmarks/shapes/judge_calibration.py``; generator
:mod:`flowalign.worlds.shapes.calibration`). The first version's confidence, IoU with the exact sprite x
colour purity, measured pixel fidelity: with GenEval's counting threshold 0.9 it failed 23 of 24 of the
shipped model's correctly counted images.

Detections come sorted by confidence (descending), then ``y0``, ``x0``, class and colour. Detections with
confidence below ``min_confidence`` are dropped (default: GenEval's detection threshold 0.3, below which
the scorer ignores them anyway); components smaller than a third of the smallest figure are not fitted
then (their objectness is 0; a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from rewards.base import RewardInputError
from rewards.geneval.scorer import THRESHOLD, Detection
from rewards.shapes.sprites import CODE_TO_COLOR, COLORS, SHAPES

__all__ = [
    "CONFIDENCE_DECIMALS",
    "EDGE_SCALE",
    "MIN_CONFIDENCE",
    "MISFIT_FULL",
    "MISFIT_ZERO",
    "SIDES",
    "RAMP",
    "ShapeFit",
    "ShapesDetector",
    "detect",
    "detect_batch",
    "fit_shape",
    "signed_distance",
]

MIN_CONFIDENCE = THRESHOLD
"""Default ``min_confidence``: GenEval's 0.3. The scorer keeps only detections above it, so dropping the
rest never changes a verdict; pass a lower value together with a lower scorer threshold."""

SIDES: tuple[float, ...] = tuple(7.5 + 0.5 * k for k in range(12))
"""Template sides (px): the sprite sides 9 and 11 scaled by 0.85-1.15 (7.65-12.65), in half pixels."""
EDGE_SCALE = 0.15
"""``tau``: a pixel whose centre lies ``d`` px inside the figure (negative: outside) is on with
probability ``sigmoid(d / tau)``: a soft or slightly wobbly edge wanders by a fraction of a pixel."""
RAMP = 1.0
"""A disagreement ``d`` px from the figure's edge costs ``min(1, |d| / RAMP)`` in the misfit."""
MISFIT_FULL = 0.1
"""Misfit up to which objectness is 1."""
MISFIT_ZERO = 0.18
"""Misfit from which objectness is 0."""
ASPECT_FULL = 0.7
"""Box aspect (short side / long side) from which objectness is 1: every figure's box is square (a
triangle's is one pixel shorter at even sides), and a pixel of boundary noise on a 7.65-px object
leaves at least ~0.78."""
ASPECT_ZERO = 0.6
"""Box aspect at which objectness is 0: half of a figure cut across is about half as wide as tall."""

CONFIDENCE_DECIMALS = 6
"""Confidences are rounded to this many decimals, so every clearly drawn object scores exactly the same
(1.0 for a perfect render) and ties are broken by the scorer's rule, as GenEval's are."""

_WINDOW = 18  # template window (px): the largest figure plus a 2-px margin on each side
_MARGIN_LOG_ON = math.log(1 / (1 + math.exp(2.0 / EDGE_SCALE)))  # log P(on) of a pixel 2 px outside
# 4-connectivity inside each image of a [B, H, W] stack, never across images.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def signed_distance(shape: str, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """Signed distance (px, positive inside) of points ``(x, y)`` -- offsets from the figure's centre,
    y downwards -- to the edge of ``shape`` with side ``side`` (the figures of
    :func:`rewards.shapes.sprites.shape_mask`). Exact inside and near the edge; outside a corner it is
    the distance to the nearest edge's line, which is all the pixel model needs."""
    half = side / 2
    if shape == "circle":
        return half - np.hypot(x, y)
    if shape == "square":
        return half - np.maximum(np.abs(x), np.abs(y))
    if shape == "triangle":  # apex (0, -half), base y = half; legs 2|x| = y + half
        return -np.maximum((2 * np.abs(x) - y - half) / math.sqrt(5), y - half)
    if shape == "diamond":
        return (half - np.abs(x) - np.abs(y)) / math.sqrt(2)
    raise ValueError(f"unknown shape {shape!r}; the shapes world has shapes {list(SHAPES)}.")


@dataclass(frozen=True)
class _TemplateBank:
    """Every (shape, side, sub-pixel phase) figure in a ``_WINDOW``-px window centred at
    ``_WINDOW / 2 + phase``: ``kernels [n, 3, W, W]`` = log-odds of "on", misfit weight signed by whether
    the pixel is inside, inside indicator; ``log_off``, ``weight_inside``, ``area`` ``[n]`` their constants."""

    shapes: np.ndarray
    sides: np.ndarray
    phases: np.ndarray
    kernels: np.ndarray
    log_off: np.ndarray
    weight_inside: np.ndarray
    area: np.ndarray


def _bank() -> _TemplateBank:
    centres = np.arange(_WINDOW) + 0.5
    rows = []
    for s, shape in enumerate(SHAPES):
        for side in SIDES:
            for py in (0.0, 0.5):
                for px in (0.0, 0.5):
                    y, x = np.meshgrid(
                        centres - (_WINDOW / 2 + py), centres - (_WINDOW / 2 + px), indexing="ij"
                    )
                    d = signed_distance(shape, x, y, side)
                    log_on, log_off = -np.logaddexp(0, -d / EDGE_SCALE), -np.logaddexp(0, d / EDGE_SCALE)
                    inside = (d >= 0).astype(np.float64)
                    weight = np.minimum(np.abs(d) / RAMP, 1)
                    rows.append((s, side, (py, px), np.stack([log_on - log_off, weight * (1 - 2 * inside), inside]),
                                 log_off.sum(), (weight * inside).sum(), inside.sum()))  # fmt: skip
    return _TemplateBank(
        shapes=np.array([r[0] for r in rows]), sides=np.array([r[1] for r in rows]),
        phases=np.array([r[2] for r in rows]), kernels=np.stack([r[3] for r in rows]),
        log_off=np.array([r[4] for r in rows]), weight_inside=np.array([r[5] for r in rows]),
        area=np.array([r[6] for r in rows]),
    )  # fmt: skip


_BANK = _bank()
_SMALLEST_AREA = float(_BANK.area.min())


@dataclass(frozen=True)
class ShapeFit:
    """The detector's reading of one component.

    Attributes:
        shape: the most likely shape.
        side: the side (px) of its most likely figure.
        shape_posterior: ``P(shape | M)`` of each shape, in :data:`SHAPES` order.
        misfit: the most likely figure's tolerance-weighted disagreements over ``|M u T|``.
        objectness: the misfit mapped to ``[0, 1]`` (see the module docstring).
        confidence: ``shape_posterior[shape] * objectness``.
    """

    shape: str
    side: float
    shape_posterior: tuple[float, ...]
    misfit: float
    objectness: float
    confidence: float


def _ramp(value: float, zero: float, full: float) -> float:
    """0 at ``zero``, 1 at ``full``, linear between and clamped (either direction)."""
    return min(1.0, max(0.0, (value - zero) / (full - zero)))


def _objectness(misfit: float, aspect: float) -> float:
    """1 for a whole object of the world: misfit up to :data:`MISFIT_FULL` and a box at least
    :data:`ASPECT_FULL` square; 0 from :data:`MISFIT_ZERO` or an aspect of :data:`ASPECT_ZERO`."""
    return _ramp(misfit, MISFIT_ZERO, MISFIT_FULL) * _ramp(aspect, ASPECT_ZERO, ASPECT_FULL)


def fit_shape(mask: np.ndarray) -> ShapeFit:
    """Fit every figure to a component's mask ``[h, w]`` (bool, cropped to its box; see the module
    docstring) and return the reading."""
    mask = np.asarray(mask, dtype=bool)
    return _fit(mask, int(mask.sum()))


def _fit(crop: np.ndarray, area: int) -> ShapeFit:
    h, w = crop.shape
    b = _BANK
    # Window top-left corners that put the figure's centre within ~1.5 px of the crop's box centre.
    pad = _WINDOW
    padded = np.pad(crop.astype(np.float64), pad)
    top, left = pad + math.floor(h / 2 - _WINDOW / 2), pad + math.floor(w / 2 - _WINDOW / 2)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (_WINDOW, _WINDOW))[
        top - 1 : top + 2, left - 1 : left + 2
    ]  # [3, 3, W, W]
    counts = np.tensordot(windows, b.kernels, axes=([2, 3], [2, 3])).reshape(9, -1, 3)  # [placements, n, 3]
    log_odds, signed_weight, overlap = np.moveaxis(counts, -1, 0)
    inside_window = windows.sum(axis=(2, 3)).reshape(9, 1)
    outside = area - inside_window
    log_lik = log_odds + b.log_off + outside * _MARGIN_LOG_ON
    disagreement = signed_weight + b.weight_inside + outside
    # P(shape | M): marginal likelihood over sides, phases and placements (uniform prior), normalised.
    shape_log_lik = np.array(
        [np.logaddexp.reduce(log_lik[:, b.shapes == s], axis=None) for s in range(len(SHAPES))]
    )
    posterior = np.exp(shape_log_lik - shape_log_lik.max())
    posterior /= posterior.sum()
    winner = int(np.argmax(shape_log_lik))  # ties go to the earlier shape in SHAPES
    masked = np.where(b.shapes[None, :] == winner, log_lik, -np.inf)
    placement, index = np.unravel_index(int(np.argmax(masked)), masked.shape)
    union = area + b.area[index] - overlap[placement, index]
    misfit = float(disagreement[placement, index] / union)
    objectness = _objectness(misfit, min(h, w) / max(h, w))
    return ShapeFit(
        shape=SHAPES[winner],
        side=float(b.sides[index]),
        shape_posterior=tuple(float(p) for p in posterior),
        misfit=misfit,
        objectness=objectness,
        confidence=round(float(posterior[winner]) * objectness, CONFIDENCE_DECIMALS),
    )


def detect(image: Tensor, min_confidence: float = MIN_CONFIDENCE) -> list[Detection]:
    """Detect the objects of one image ``[3, H, W]`` float in ``[0, 1]`` (see the module docstring)."""
    if not isinstance(image, Tensor) or image.ndim != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise RewardInputError(
            f"shapes detector: detect() takes one image [3, H, W], got {shape}; use detect_batch() for [B, 3, H, W]."
        )
    return detect_batch(image.unsqueeze(0), min_confidence)[0]


def detect_batch(images: Tensor, min_confidence: float = MIN_CONFIDENCE) -> list[list[Detection]]:
    """Detect the objects of each image of ``[B, 3, H, W]`` float in ``[0, 1]``; one list per image."""
    x = _to_numpy(images)
    batch = x.shape[0]
    on = x * 255 >= 128  # [B, 3, H, W]
    codes = on[:, 0].astype(np.uint8) | (on[:, 1].astype(np.uint8) << 1) | (on[:, 2].astype(np.uint8) << 2)

    labels = np.zeros(codes.shape, dtype=np.int32)
    component_code = [0]
    present = np.bincount(codes.ravel(), minlength=8)
    for code in range(1, 8):
        if not present[code]:
            continue
        code_labels, n = ndimage.label(codes == code, structure=_STRUCTURE)
        mask = code_labels > 0
        labels[mask] = code_labels[mask] + (len(component_code) - 1)
        component_code.extend([code] * n)
    n_components = len(component_code) - 1
    results: list[list[Detection]] = [[] for _ in range(batch)]
    if n_components == 0:
        return results

    areas = np.bincount(labels.ravel(), minlength=n_components + 1)[1:].astype(np.float64)
    # Specks: a component with less than a third of the smallest figure's area misfits every figure by
    # more than MISFIT_ZERO (at least 2/3 of the figure's pixels are missing, most of them far inside it).
    possible = areas >= _SMALLEST_AREA / 3 if min_confidence > 0 else np.ones(n_components, dtype=bool)
    candidates = np.flatnonzero(possible)
    if candidates.size == 0:
        return results
    slices = ndimage.find_objects(labels, max_label=int(candidates[-1]) + 1)
    for index in candidates.tolist():
        sb, sy, sx = slices[index]
        crop = labels[sb.start, sy, sx] == index + 1
        fit = _fit(crop, int(areas[index]))
        if fit.confidence < min_confidence:
            continue
        results[sb.start].append(
            Detection(
                class_name=fit.shape,
                color=CODE_TO_COLOR[component_code[index + 1]],
                bbox=(sx.start, sy.start, sx.stop, sy.stop),
                confidence=fit.confidence,
                pixel_count=int(areas[index]),
            )
        )
    for dets in results:
        dets.sort(key=lambda d: (-d.confidence, d.bbox[1], d.bbox[0], d.class_name, d.color))
    return results


@dataclass(frozen=True)
class ShapesDetector:
    """:func:`detect_batch` as a GenEval detector (``images -> detection lists``, with ``classes``/``colors``
    vocabularies), the default detector of the ``geneval`` reward."""

    min_confidence: float = MIN_CONFIDENCE

    @property
    def classes(self) -> tuple[str, ...]:
        return SHAPES

    @property
    def colors(self) -> tuple[str, ...]:
        return tuple(COLORS)

    def __call__(self, images: Tensor) -> list[list[Detection]]:
        return detect_batch(images, self.min_confidence)


def _to_numpy(images: Tensor) -> np.ndarray:
    if not isinstance(images, Tensor):
        raise RewardInputError(
            f"shapes detector: images must be a torch.Tensor, got {type(images).__name__}."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " use detect() for a single [3, H, W] image." if images.ndim == 3 else ""
        raise RewardInputError(
            f"shapes detector: detect_batch() takes images [B, 3, H, W], got {tuple(images.shape)};{hint}"
        )
    if not images.is_floating_point():
        raise RewardInputError(
            f"shapes detector: images must be float in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with `images.float() / 255`."
        )
    images = images.detach()
    if images.dtype not in (torch.float32, torch.float64):
        images = images.float()
    x = images.cpu().numpy()
    if x.size:
        lo, hi = x.min(), x.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise RewardInputError(
                f"shapes detector: image values must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]; "
                "images in [-1, 1] map to [0, 1] with `(x + 1) / 2`."
            )
    return x
