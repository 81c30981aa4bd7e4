"""The shapes world's exact object detector: colour codes, connected components, sprite matching.

For images ``[3, H, W]`` (or batches ``[B, 3, H, W]``) of floats in ``[0, 1]``:

1. **Colour code.** A channel is on when ``value * 255 >= 128``; the pixel's code is ``R + 2 G + 4 B``
   (:data:`rewards.shapes.sprites.COLOR_TO_CODE`); code 0 (black) is background.
2. **Components.** Pixels of one code form 4-connected components (``scipy.ndimage.label`` with the
   cross structure); different codes never join.
3. **Shape.** The component's mask, cropped to its bounding box (``h x w``), is compared with every
   sprite (4 shapes x 2 sizes, :func:`rewards.shapes.sprites.sprite_mask`). The IoU with an ``s x s``
   sprite is the best over the placements of the two boxes in which, along each axis, one box's extent
   contains the other's (a single placement when ``h == w == s``). The shape is the sprite with the
   highest IoU; ties go to the earlier shape in :data:`~rewards.shapes.sprites.SHAPES`, then the smaller size.
4. **Purity.** ``purity = 1 - mean over the component's pixels and the 3 channels of |value - corner|``,
   where ``corner`` is the 0/1 RGB corner of the component's colour. A render with exact 0/1 values has
   purity 1; since every channel of a component pixel lies on its corner's side of 128/255, purity is
   never below ~0.5, and blurry, washed-out or off-colour pixels move it towards that.
5. **Confidence** ``= IoU x purity``: exactly 1.0 for every object of a perfect render.

A detection's box is ``(x0, y0, x1, y1)`` with ``x1``/``y1`` one past the last pixel (GenEval's boxes), so
for a rendered sprite it is exactly the box the sprite was placed in. Detections come sorted by
confidence (descending), then ``y0``, ``x0``, class and colour, so ties are broken by reading order.

Detections with confidence below ``min_confidence`` are dropped; a component is skipped before any
shape matching when the area bound ``IoU <= min(p, A) / max(p, A)`` (``p`` component and ``A`` sprite
pixels) already rules it out, which keeps noisy images (hundreds of specks) cheap. The default is
GenEval's detection threshold 0.3, below which the scorer ignores detections anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from rewards.base import RewardInputError
from rewards.geneval.scorer import THRESHOLD, Detection
from rewards.shapes.sprites import CODE_TO_COLOR, COLORS, SHAPES, SIZES, sprite_mask

__all__ = ["MIN_CONFIDENCE", "ShapesDetector", "detect", "detect_batch"]

MIN_CONFIDENCE = THRESHOLD
"""Default ``min_confidence``: GenEval's 0.3. The scorer keeps only detections above it, so dropping the
rest never changes a verdict; pass a lower value together with a lower scorer threshold."""

# (shape, size, mask, area) in tie-breaking order.
_TEMPLATES = [
    (shape, size, sprite_mask(shape, size), int(sprite_mask(shape, size).sum()))
    for shape in SHAPES
    for size in SIZES
]
_AREAS = np.array([t[3] for t in _TEMPLATES], dtype=np.float64)
# 4-connectivity inside each image of a [B, H, W] stack, never across images.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


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
    # Per-pixel mean |value - corner| over channels: the corner's channel is 1 exactly where it is on.
    deviation = np.where(on, 1 - x, x).mean(axis=1)  # [B, H, W]

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

    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n_components + 1)[1:].astype(np.float64)
    purity = 1 - np.bincount(flat, weights=deviation.ravel(), minlength=n_components + 1)[1:] / areas
    iou_bound = (np.minimum(areas[:, None], _AREAS) / np.maximum(areas[:, None], _AREAS)).max(axis=1)
    candidates = np.flatnonzero(iou_bound * purity >= min_confidence)
    if candidates.size == 0:
        return results
    slices = ndimage.find_objects(labels, max_label=int(candidates[-1]) + 1)
    for index in candidates.tolist():
        sb, sy, sx = slices[index]
        crop = labels[sb.start, sy, sx] == index + 1
        iou, shape = _match_shape(crop, int(areas[index]))
        confidence = float(iou * purity[index])
        if confidence < min_confidence:
            continue
        results[sb.start].append(
            Detection(
                class_name=shape,
                color=CODE_TO_COLOR[component_code[index + 1]],
                bbox=(sx.start, sy.start, sx.stop, sy.stop),
                confidence=confidence,
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


def _match_shape(crop: np.ndarray, area: int) -> tuple[float, str]:
    """Best (IoU, shape) over all sprites, pruned by the area bound (exact argmax, ties to template order)."""
    bounds = [min(area, a) / max(area, a) for *_, a in _TEMPLATES]
    order = sorted(range(len(_TEMPLATES)), key=lambda t: -bounds[t])  # stable: ties keep template order
    best_iou, best_t = -1.0, order[0]
    for t in order:
        if bounds[t] < best_iou:
            break
        iou = _best_aligned_iou(crop, area, _TEMPLATES[t][2], _TEMPLATES[t][3])
        if iou > best_iou or (iou == best_iou and t < best_t):
            best_iou, best_t = iou, t
    return best_iou, _TEMPLATES[best_t][0]


def _best_aligned_iou(crop: np.ndarray, area: int, sprite: np.ndarray, sprite_area: int) -> float:
    """Max IoU over placements where, per axis, one box's extent contains the other's."""
    h, w = crop.shape
    s = sprite.shape[0]
    if h == w == s:
        best = int(np.count_nonzero(crop & sprite))
    else:
        # Window (iy, ix) of the crop zero-padded by s - 1 is the sprite placed at (iy - s + 1, ix - s + 1)
        # relative to the crop's top-left; keep the placements that nest the extents along each axis.
        padded = np.pad(crop, s - 1)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (s, s))
        y0, x0 = s - 1 + min(0, h - s), s - 1 + min(0, w - s)
        windows = windows[y0 : y0 + abs(h - s) + 1, x0 : x0 + abs(w - s) + 1]
        best = int((windows & sprite).sum(axis=(2, 3)).max())
    # IoU is increasing in the intersection for fixed areas, so maximise the intersection.
    return best / (area + sprite_area - best)
