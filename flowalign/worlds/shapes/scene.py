"""Scenes of the shapes world and their renderer.

A scene is up to :data:`MAX_OBJECTS` sprites (:mod:`rewards.shapes.sprites`) on a black ``32 x 32`` canvas,
each at integer coordinates, fully inside the image, with at least :data:`MIN_GAP` empty pixels between
any two objects' boxes. Rendering is exact: every pixel is 0 or 1 in each channel, no anti-aliasing, so
the exact detector recovers the scene (``scene_from_detections(detect(render_scene(s))) == s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rewards.geneval.scorer import Detection
from rewards.shapes.sprites import COLORS, SHAPES, SIZES, color_rgb, sprite_mask

__all__ = [
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "MIN_GAP",
    "Scene",
    "SceneError",
    "SceneObject",
    "box_gap",
    "render_scene",
    "render_scenes",
    "scene_detections",
    "scene_from_detections",
]

IMAGE_SIZE = 32
MAX_OBJECTS = 4
MIN_GAP = 2
"""Minimum number of empty pixel rows or columns separating two objects' boxes (see :func:`box_gap`)."""


class SceneError(ValueError):
    """Raised for a scene that breaks the shapes world's rules (unknown shape, overlap, off-canvas, ...)."""


@dataclass(frozen=True)
class SceneObject:
    """One sprite.

    Attributes:
        shape: one of :data:`rewards.shapes.sprites.SHAPES`.
        color: one of :data:`rewards.shapes.sprites.COLORS`.
        size: sprite box size in pixels, one of :data:`rewards.shapes.sprites.SIZES`.
        x, y: column and row of the box's top-left pixel.
    """

    shape: str
    color: str
    size: int
    x: int
    y: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive: the box GenEval's position rule reads."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)


def box_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """Empty pixels between boxes ``(x0, y0, x1, y1)`` along the axis that separates them most.

    ``max(b.x0 - a.x1, a.x0 - b.x1, b.y0 - a.y1, a.y0 - b.y1)``: negative or zero when the boxes overlap
    or touch, 2 when two empty columns (or rows) lie between them.
    """
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


@dataclass(frozen=True)
class Scene:
    """A validated scene. ``objects`` is kept in reading order (``y``, then ``x``), so two scenes with the
    same objects compare equal whatever order they were listed in.

    Attributes:
        objects: the sprites, at most :data:`MAX_OBJECTS`.
        height, width: canvas size in pixels.
    """

    objects: tuple[SceneObject, ...]
    height: int = IMAGE_SIZE
    width: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if len(objects) > MAX_OBJECTS:
            raise SceneError(f"a scene holds at most {MAX_OBJECTS} objects, got {len(objects)}.")
        for obj in objects:
            _validate_object(obj, self.height, self.width)
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                if box_gap(a.bbox, b.bbox) < MIN_GAP:
                    raise SceneError(
                        f"objects {a} and {b} are {box_gap(a.bbox, b.bbox)} px apart; boxes must be at least "
                        f"{MIN_GAP} px apart (empty rows or columns between them)."
                    )
        ordered = tuple(sorted(objects, key=lambda o: (o.y, o.x, o.shape, o.color, o.size)))
        object.__setattr__(self, "objects", ordered)


def _validate_object(obj: SceneObject, height: int, width: int) -> None:
    if not isinstance(obj, SceneObject):
        raise SceneError(f"scene objects must be SceneObject, got {type(obj).__name__}.")
    if obj.shape not in SHAPES:
        raise SceneError(f"unknown shape {obj.shape!r} in {obj}; shapes are {list(SHAPES)}.")
    if obj.color not in COLORS:
        raise SceneError(f"unknown colour {obj.color!r} in {obj}; colours are {list(COLORS)}.")
    if obj.size not in SIZES:
        raise SceneError(f"unsupported size {obj.size!r} in {obj}; sizes are {list(SIZES)}.")
    for name in ("x", "y"):
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SceneError(f"{name} must be an integer pixel coordinate, got {value!r} in {obj}.")
    if not (0 <= obj.x and obj.x + obj.size <= width and 0 <= obj.y and obj.y + obj.size <= height):
        raise SceneError(
            f"{obj} does not fit inside the {width}x{height} image; need 0 <= x <= {width} - size and "
            f"0 <= y <= {height} - size."
        )


def _render_into(canvas: np.ndarray, scene: Scene) -> None:
    for obj in scene.objects:
        mask = sprite_mask(obj.shape, obj.size)
        for channel, on in enumerate(color_rgb(obj.color)):
            if on:
                canvas[channel, obj.y : obj.y + obj.size, obj.x : obj.x + obj.size][mask] = 1.0


def render_scene(scene: Scene) -> Tensor:
    """Render to a float32 tensor ``[3, H, W]`` with values in {0, 1} (black background)."""
    canvas = np.zeros((3, scene.height, scene.width), dtype=np.float32)
    _render_into(canvas, scene)
    return torch.from_numpy(canvas)


def render_scenes(scenes: Sequence[Scene]) -> Tensor:
    """Render a batch to ``[B, 3, H, W]`` float32 in {0, 1}; all scenes must share one canvas size."""
    if not scenes:
        raise SceneError("render_scenes() needs at least one scene.")
    sizes = {(s.height, s.width) for s in scenes}
    if len(sizes) != 1:
        raise SceneError(f"render_scenes() needs scenes of one canvas size, got sizes {sorted(sizes)}.")
    height, width = sizes.pop()
    canvas = np.zeros((len(scenes), 3, height, width), dtype=np.float32)
    for i, scene in enumerate(scenes):
        _render_into(canvas[i], scene)
    return torch.from_numpy(canvas)


def scene_detections(scene: Scene) -> list[Detection]:
    """The detections the exact detector makes on ``render_scene(scene)``, without rendering.

    Every confidence is 1.0, so the order is the detector's tie order: ``y0``, ``x0``, class, colour.
    """
    dets = [
        Detection(o.shape, o.color, o.bbox, 1.0, int(sprite_mask(o.shape, o.size).sum()))
        for o in scene.objects
    ]
    dets.sort(key=lambda d: (d.bbox[1], d.bbox[0], d.class_name, d.color))
    return dets


def scene_from_detections(
    detections: Sequence[Detection], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE
) -> Scene:
    """Read detections of a rendered scene back into a :class:`Scene` (the inverse of rendering + detecting).

    Each detection's box must be a square of a sprite size; raises :class:`SceneError` otherwise, or when
    the objects do not form a valid scene.
    """
    objects = []
    for det in detections:
        x0, y0, x1, y1 = (int(v) for v in det.bbox)
        if x1 - x0 != y1 - y0 or x1 - x0 not in SIZES or det.color is None:
            raise SceneError(
                f"detection {det} is not a rendered sprite: its box must be a square of side {list(SIZES)} and "
                "it must have a colour."
            )
        objects.append(SceneObject(det.class_name, det.color, x1 - x0, x0, y0))
    return Scene(tuple(objects), height, width)
