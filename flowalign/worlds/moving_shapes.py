"""The moving-shapes world: the image-to-video companion of the shapes world, with an exact judge.

A video is :data:`NUM_FRAMES` frames of 32 x 32 (frame 0 given, then 4 generated: Wan's ``4k + 1``).
Frame 0 is a shapes-world scene of one or two objects (:mod:`flowalign.worlds.shapes.scene`); the prompt
names one object and a direction, ``"the red circle moves right"``, or, with a second object, ``"the red
circle moves right while the blue square stays"``. In the true video the named object moves
:data:`STEP` pixels per frame in that direction (12 px by the last frame) and the other stays; objects
keep their shape, colour and size, and boxes stay at least one empty pixel apart in every frame.

**The judge** (:func:`judge_video`), per video, from the calibrated shapes detector
(:mod:`rewards.shapes.detector`, GenEval's 0.3 detection threshold) run on every frame:

- *identity*: every frame holds exactly the first frame's objects as (shape, colour) pairs -- nothing
  vanishes, appears, changes shape or colour, or breaks into pieces;
- *motion*: in the last frame the named object is found once, is displaced in the named direction by
  GenEval's position rule (:func:`rewards.geneval.scorer.relative_position` of its last box against its
  first: "right of" for ``right``, "below" for ``down``, ...) and by at least :data:`MIN_TRAVEL` pixels
  along it (half the true 12 px); every other object is found once within :data:`STAY_TOLERANCE` pixels
  of where it started;
- *correct*: both.

The first frame's objects are read from the prompt record (``scene``), which is what rendered the
conditioning image, so the judge never has to trust a detection of frame 0. Tasks: ``move`` (one object)
and ``move_stay`` (two objects); accuracies are aggregated like GenEval (per-task Wilson intervals, the
overall the unweighted mean of the tasks with a stratified bootstrap interval).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowalign.worlds.shapes.scene import IMAGE_SIZE, Scene, SceneObject, render_scene
from rewards.geneval.scorer import relative_position
from rewards.shapes.sprites import COLORS, SHAPES, SIZES

__all__ = [
    "DIRECTIONS",
    "NUM_FRAMES",
    "STEP",
    "TASKS",
    "VOCABULARY_WORDS",
    "MotionSpec",
    "VideoVerdict",
    "judge_video",
    "motion_prompt",
    "render_video",
    "sample_spec",
    "spec_from_record",
    "spec_record",
    "write_prompt_set",
]

NUM_FRAMES = 5
STEP = 3
"""Pixels per frame the named object moves."""
MIN_TRAVEL = 6
"""Pixels along the named direction the mover must cover by the last frame (half of the true 12)."""
STAY_TOLERANCE = 3
"""Pixels a staying object's box centre may drift by the last frame."""
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
RELATION = {"left": "left of", "right": "right of", "up": "above", "down": "below"}
TASKS = ("move", "move_stay")
VOCABULARY_WORDS: tuple[str, ...] = ("the", "moves", "while", "stays", *DIRECTIONS, *SHAPES, *COLORS)
"""Every word of the world's prompts."""


@dataclass(frozen=True)
class MotionSpec:
    """One video of the world: the first frame, which object moves (index into ``scene.objects``) and where."""

    scene: Scene
    mover: int
    direction: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {self.direction!r}.")
        if not 0 <= self.mover < len(self.scene.objects):
            raise ValueError(
                f"mover {self.mover} is not an object index of a {len(self.scene.objects)}-object scene."
            )
        pairs = [(o.shape, o.color) for o in self.scene.objects]
        if len(set(pairs)) != len(pairs):
            raise ValueError(
                f"the objects of a moving-shapes scene must differ in shape or colour, got {pairs}."
            )

    @property
    def task(self) -> str:
        return TASKS[len(self.scene.objects) - 1]

    def frame_scenes(self) -> list[Scene]:
        """The scene of every frame (raises :class:`~flowalign.worlds.shapes.scene.SceneError` when the mover
        leaves the canvas or comes within ``MIN_GAP`` of another object)."""
        dx, dy = DIRECTIONS[self.direction]
        frames = []
        for t in range(NUM_FRAMES):
            objects = list(self.scene.objects)
            o = objects[self.mover]
            objects[self.mover] = SceneObject(
                o.shape, o.color, o.size, o.x + dx * STEP * t, o.y + dy * STEP * t
            )
            frames.append(Scene(tuple(objects)))
        return frames


def motion_prompt(spec: MotionSpec) -> str:
    mover = spec.scene.objects[spec.mover]
    prompt = f"the {mover.color} {mover.shape} moves {spec.direction}"
    for i, other in enumerate(spec.scene.objects):
        if i != spec.mover:
            prompt += f" while the {other.color} {other.shape} stays"
    return prompt


def render_video(spec: MotionSpec) -> Tensor:
    """The true video ``[NUM_FRAMES, 3, 32, 32]`` float32 in {0, 1}."""
    return torch.stack([render_scene(s) for s in spec.frame_scenes()])


def sample_spec(rng: np.random.Generator, n_objects: int | None = None, max_tries: int = 1000) -> MotionSpec:
    """A uniformly drawn valid video: objects' shapes, colours (distinct pairs), sizes and positions, the
    mover and its direction, redrawn until every frame is a valid scene (the mover stays inside and
    ``MIN_GAP`` px from the other object)."""
    from flowalign.worlds.shapes.scene import SceneError

    n = int(rng.integers(1, 3)) if n_objects is None else n_objects
    for _ in range(max_tries):
        pairs: list[tuple[str, str]] = []
        while len(pairs) < n:
            pair = (SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))])
            if pair not in pairs:
                pairs.append(pair)
        objects = []
        for shape, color in pairs:
            size = int(SIZES[rng.integers(len(SIZES))])
            objects.append(
                SceneObject(
                    shape,
                    color,
                    size,
                    int(rng.integers(0, IMAGE_SIZE - size + 1)),
                    int(rng.integers(0, IMAGE_SIZE - size + 1)),
                )
            )
        mover_object = objects[0]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        try:
            scene = Scene(tuple(objects))
            spec = MotionSpec(scene, scene.objects.index(mover_object), direction)
            spec.frame_scenes()
        except (SceneError, ValueError):
            continue
        return spec
    raise RuntimeError(f"no valid moving-shapes video in {max_tries} draws of {n} objects.")


def spec_record(spec: MotionSpec, image: str | None = None) -> dict[str, Any]:
    """The prompt record of a video (a line of a prompt file): prompt, task tag, first-frame scene, mover,
    direction and, when given, the conditioning image's path."""
    record: dict[str, Any] = {"prompt": motion_prompt(spec), "tag": spec.task}
    if image is not None:
        record["image"] = image
    record["scene"] = [[o.shape, o.color, o.size, o.x, o.y] for o in spec.scene.objects]
    record["mover"] = spec.mover
    record["direction"] = spec.direction
    return record


def spec_from_record(record: Mapping[str, Any]) -> MotionSpec:
    """The :class:`MotionSpec` a prompt record describes; a record without one is a ``ValueError``."""
    try:
        scene = Scene(
            tuple(SceneObject(str(s), str(c), int(z), int(x), int(y)) for s, c, z, x, y in record["scene"])
        )
        return MotionSpec(scene, int(record["mover"]), str(record["direction"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"a moving-shapes record needs 'scene' ([[shape, colour, size, x, y], ...]), 'mover' and 'direction' "
            f"({type(err).__name__}: {err}); write prompt files with flowalign.worlds.moving_shapes.write_prompt_set."
        ) from None


def write_prompt_set(directory: str | Path, specs: Sequence[MotionSpec], name: str) -> Path:
    """Write ``<directory>/<name>.jsonl`` and each first frame as ``<directory>/<name>/<i>.png``."""
    from PIL import Image

    directory = Path(directory)
    (directory / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, spec in enumerate(specs):
        image = f"{name}/{i:04d}.png"
        frame = (render_scene(spec.scene) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(frame).save(directory / image)
        lines.append(json.dumps(spec_record(spec, image)))
    path = directory / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class VideoVerdict:
    """The judge's verdict on one video; ``reason`` says what failed first (empty when correct)."""

    identity: bool
    motion: bool
    reason: str

    @property
    def correct(self) -> bool:
        return self.identity and self.motion


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def judge_video(
    frames: Tensor, spec: MotionSpec, detections: Sequence[Sequence[Any]] | None = None
) -> VideoVerdict:
    """Judge one video ``[T, 3, H, W]`` in ``[0, 1]`` against its spec (see the module docstring).
    ``detections``: the frames' detections when already computed (one list per frame)."""
    from rewards.shapes.detector import detect_batch

    if frames.ndim != 4 or frames.shape[0] != NUM_FRAMES:
        raise ValueError(f"judge_video takes one video [{NUM_FRAMES}, 3, H, W], got {tuple(frames.shape)}.")
    dets = detect_batch(frames.float()) if detections is None else detections
    expected = sorted((o.shape, o.color) for o in spec.scene.objects)
    identity, reason = True, ""
    for t, frame_dets in enumerate(dets):
        found = sorted((d.class_name, d.color) for d in frame_dets)
        if found != expected:
            identity, reason = False, f"frame {t}: objects {found} instead of {expected}"
            break
    last = dets[-1]
    motion = True
    for i, obj in enumerate(spec.scene.objects):
        matches = [d for d in last if (d.class_name, d.color) == (obj.shape, obj.color)]
        if len(matches) != 1:
            motion, reason = False, reason or f"last frame: {len(matches)} {obj.color} {obj.shape}s"
            break
        (cx, cy), (sx, sy) = _centre(matches[0].bbox), _centre(obj.bbox)
        if i == spec.mover:
            dx, dy = DIRECTIONS[spec.direction]
            travel = (cx - sx) * dx + (cy - sy) * dy
            relations = relative_position(matches[0].bbox, obj.bbox)
            if RELATION[spec.direction] not in relations or travel < MIN_TRAVEL:
                motion = False
                reason = reason or f"the {obj.color} {obj.shape} moved ({cx - sx:+.1f}, {cy - sy:+.1f}) px"
                break
        elif max(abs(cx - sx), abs(cy - sy)) > STAY_TOLERANCE:
            motion = False
            reason = reason or f"the {obj.color} {obj.shape} drifted ({cx - sx:+.1f}, {cy - sy:+.1f}) px"
            break
    return VideoVerdict(identity, motion, reason)


# ---------------------------------------------------------------------------------------------- validation

NEGATIVE_KINDS = (
    "still",
    "reversed",
    "short",
    "other_moves",
    "recoloured",
    "vanishes",
    "appears",
    "reshaped",
)
"""Videos the judge must fail, built from a true video (see :func:`validation_case`)."""


def validation_case(spec: MotionSpec, kind: str, rng: np.random.Generator) -> tuple[Tensor, bool, bool]:
    """A video built to test the judge, with the verdicts a careful person gives it: ``(video, identity,
    motion)``, the frames of :func:`validation_scenes` rendered exactly."""
    scenes, identity, motion = validation_scenes(spec, kind, rng)
    return torch.stack([render_scene(s) for s in scenes]), identity, motion


def validation_scenes(
    spec: MotionSpec, kind: str, rng: np.random.Generator
) -> tuple[list[Scene], bool, bool]:
    """The frame scenes of a video built to test the judge, with the verdicts a careful person gives it:
    ``(scenes, identity, motion)``. ``kind="true"`` is the true video; the :data:`NEGATIVE_KINDS` corrupt it:

    - ``still``: frame 0 repeated (identity kept, no motion); ``reversed``: the mover goes 8 px the other way;
      ``short``: the mover covers 1 px per frame (4 px, under :data:`MIN_TRAVEL`); ``other_moves``: a
      staying object moves too (two objects only; else ``still``);
    - ``recoloured`` / ``reshaped``: the mover changes colour / shape from frame 2 on; ``vanishes``: the
      mover is gone from frame 3 on (identity and motion fail: the named object is not in the last frame);
      ``appears``: a new object (another pair) enters at frame 2 where it fits (identity fails, motion is
      still correct).

    Raises :class:`~flowalign.worlds.shapes.scene.SceneError` when the corruption does not fit the canvas
    (:func:`validation_suite` then draws another video)."""
    from flowalign.worlds.shapes.scene import SceneError

    frames = spec.frame_scenes()
    identity, motion = True, True

    def moved(scene_objects, index, dx, dy):
        objects = list(scene_objects)
        o = objects[index]
        objects[index] = SceneObject(o.shape, o.color, o.size, o.x + dx, o.y + dy)
        return objects

    start = list(spec.scene.objects)
    ddx, ddy = DIRECTIONS[spec.direction]
    if kind == "other_moves" and len(start) == 1:
        kind = "still"
    if kind == "true":
        scenes = frames
    elif kind == "still":
        scenes, motion = [spec.scene] * NUM_FRAMES, False
    elif kind in ("reversed", "short"):
        step = (
            1 - STEP if kind == "reversed" else 1
        )  # reversed: 8 px back (12 px back never fits with 12 ahead)
        scenes = [
            Scene(tuple(moved(start, spec.mover, ddx * step * t, ddy * step * t))) for t in range(NUM_FRAMES)
        ]
        motion = False
    elif kind == "other_moves":
        other = 1 - spec.mover
        scenes = []
        for t in range(NUM_FRAMES):
            objects = moved(start, spec.mover, ddx * STEP * t, ddy * STEP * t)
            objects = moved(objects, other, -ddx * 2 * t, -ddy * 2 * t)  # 8 px the other way
            scenes.append(Scene(tuple(objects)))
        motion = False
    elif kind in ("recoloured", "reshaped", "vanishes"):
        scenes = list(frames)
        for t in range(2 if kind != "vanishes" else 3, NUM_FRAMES):
            objects = list(frames[t].objects)
            mover = next(
                o for o in objects if (o.shape, o.color) == (start[spec.mover].shape, start[spec.mover].color)
            )
            index = objects.index(mover)
            if kind == "vanishes":
                objects.pop(index)
            else:
                pairs = {(o.shape, o.color) for o in start}
                options = (
                    [(s, c) for s, c in ((s, mover.color) for s in SHAPES) if (s, c) not in pairs]
                    if kind == "reshaped"
                    else [(mover.shape, c) for c in COLORS if (mover.shape, c) not in pairs]
                )
                shape, color = options[rng.integers(len(options))]
                objects[index] = SceneObject(shape, color, mover.size, mover.x, mover.y)
            scenes[t] = Scene(tuple(objects))
        identity, motion = False, False  # the named object is not in the last frame as itself
    elif kind == "appears":
        scenes, identity = list(frames), False
        pairs = {(o.shape, o.color) for o in start}
        for _ in range(200):
            shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
            size = int(SIZES[rng.integers(len(SIZES))])
            new = SceneObject(
                shape,
                color,
                size,
                int(rng.integers(0, IMAGE_SIZE - size + 1)),
                int(rng.integers(0, IMAGE_SIZE - size + 1)),
            )
            if (shape, color) in pairs:
                continue
            try:
                extra = [Scene((*frames[t].objects, new)) for t in range(2, NUM_FRAMES)]
            except SceneError:
                continue
            scenes = list(frames[:2]) + extra
            break
        else:
            raise SceneError("no place for an appearing object in 200 draws")
    else:
        raise ValueError(f"unknown validation kind {kind!r}; use 'true' or one of {NEGATIVE_KINDS}.")
    return scenes, identity, motion


def soften(video: Tensor, rng: np.random.Generator) -> Tensor:
    """A generative model's imperfections on every frame of a video: Gaussian blur (sigma ``U(0.3, 0.6)``
    px, drawn per video) and colour noise that keeps every channel on its side of 128/255 (the shapes
    judge's calibration suite, :mod:`flowalign.worlds.shapes.calibration`); quantized to 1/255."""
    from flowalign.worlds.shapes.calibration import _blur, _colour_noise

    sigma = rng.uniform(0.3, 0.6)
    frames = []
    for frame in video.double().numpy():
        blurred = _blur(frame, [sigma] * 3)
        frames.append(np.round(_colour_noise(blurred, rng) * 255) / 255)
    return torch.from_numpy(np.stack(frames)).float()


def perturb_video(scenes: Sequence[Scene], rng: np.random.Generator) -> Tensor | None:
    """The frames of ``scenes`` drawn with the imperfections of the shapes judge's calibration suite
    (:mod:`flowalign.worlds.shapes.calibration`), quantized to 1/255: every object's side scaled by
    ``U(0.85, 1.15)`` (once per object and video), its centre moved by ``U(-0.5, 0.5)`` px in each frame
    (sub-pixel placement, anti-aliased), and in each frame 1-6 of Gaussian blur, colour fringes, boundary
    noise (edge pixels flipped with probability 0.15), colour noise that keeps every channel on its side of
    128/255, a 3-4 px fragment and speckles. None when a frame's objects leave the canvas or touch."""
    from flowalign.worlds.shapes.calibration import Figure, _perturb, _valid, render_figures

    scale = {(o.shape, o.color): rng.uniform(0.85, 1.15) for s in scenes for o in s.objects}
    frames = []
    for scene in scenes:
        figures = [
            Figure(o.shape, o.color, cx=o.x + o.size / 2 + rng.uniform(-0.5, 0.5),
                   cy=o.y + o.size / 2 + rng.uniform(-0.5, 0.5), side=o.size * scale[(o.shape, o.color)])
            for o in scene.objects
        ]  # fmt: skip
        if not _valid(figures, IMAGE_SIZE, IMAGE_SIZE):
            return None
        image, _ = _perturb(render_figures(figures), figures, rng)
        frames.append(np.round(np.clip(image, 0, 1) * 255) / 255)
    return torch.from_numpy(np.stack(frames)).float()


PERTURBATION_LEVELS = ("soft", "full")


def validation_suite(
    per_kind: int, seed: int = 0, perturbation: str = "soft"
) -> list[tuple[str, MotionSpec, Tensor, bool, bool]]:
    """``per_kind`` cases of ``"true"`` and of each of :data:`NEGATIVE_KINDS` (negatives perturbed too, so
    that cleanliness is no cue): ``(kind, spec, video, identity, motion)``. ``perturbation``: ``"soft"``
    (:func:`soften`: blur and colour noise on exact renders) or ``"full"`` (:func:`perturb_video`: scale
    jitter, sub-pixel placement, boundary noise, fringes, fragments, speckles)."""
    from flowalign.worlds.shapes.scene import SceneError

    if perturbation not in PERTURBATION_LEVELS:
        raise ValueError(f"perturbation must be one of {PERTURBATION_LEVELS}, got {perturbation!r}.")
    rng = np.random.default_rng(seed)
    cases = []
    for kind in ("true", *NEGATIVE_KINDS):
        while sum(c[0] == kind for c in cases) < per_kind:
            spec = sample_spec(rng, n_objects=2 if kind == "other_moves" else None)
            try:
                scenes, identity, motion = validation_scenes(spec, kind, rng)
            except SceneError:
                continue
            if perturbation == "soft":
                video = soften(torch.stack([render_scene(s) for s in scenes]), rng)
            else:
                video = perturb_video(scenes, rng)
                if video is None:
                    continue
            cases.append((kind, spec, video, identity, motion))
    return cases
