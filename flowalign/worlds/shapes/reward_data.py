"""Procedural training and evaluation data for the shapes world's learned rewards.

**Prompt-image agreement** (``shapes_match``, :func:`match_examples`). Each example is a prompt (GenEval
metadata from a given list, e.g. the train split), an image and a label: 1 when GenEval's rules judge the
image correct for the prompt (:func:`rewards.geneval.evaluate` on the exact detector's detections), else
0. A positive is a render of :func:`~flowalign.worlds.shapes.sample_scene` for the prompt (with 0-2
distractors of classes the prompt never names, which GenEval ignores). A negative is a render of a scene
sampled for a *corrupted* copy of the metadata, of one of the :data:`NEGATIVE_KINDS` the prompt's task
allows, and kept only if the judge rejects it for the original prompt:

- ``wrong_shape``: one clause's class replaced by a class the prompt does not name;
- ``wrong_colour``: one colour replaced by another; ``swapped_colours``: color_attr's two colours swapped;
- ``wrong_count``: counting with a count other than N and N + 1; ``extra_object``: N + 1 of the class;
- ``wrong_position``: the relation replaced by another one (its mirror or an orthogonal one);
- ``missing_object``: one clause dropped (an empty canvas or only other classes for one-clause prompts).

Classes the original prompt names and the corrupted one does not are excluded from the scene, so a
distractor never turns a negative into a different kind. A share of examples is made imperfect
(:func:`perturb_images`: blur, pixel noise, erased patches, dimmed colours, speckles; 1-2 of them), and
their label is the judge's verdict on the perturbed image -- the label always is GenEval's verdict.

**Artifacts** (``artifact``, :func:`artifact_examples`): clean renders of prompt-satisfying scenes
(label 1) and the same kind of scenes with one of the :data:`CORRUPTIONS` (label 0): pixel ``noise``,
``broken`` shapes (holes, cut lines, a displaced piece), ``merged`` (overlapping or touching) shapes,
``blur`` (Gaussian blur or colour bleeding: a channel shifted or blurred alone) and ``off_palette``
colours (objects in a colour that is not a corner of the RGB cube).

No image ever shows a (shape, colour) pair of ``unseen_pairs`` (default
:data:`~flowalign.worlds.shapes.prompts.UNSEEN_PAIRS`): scenes that would are redrawn. All randomness comes
from the ``numpy.random.Generator`` passed in; images are quantized to multiples of 1/255 (as a generator's
saved output would be) before they are judged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from flowalign.worlds.shapes.prompts import UNSEEN_PAIRS
from flowalign.worlds.shapes.sampler import UnsatisfiablePromptError, sample_scene
from flowalign.worlds.shapes.scene import Scene, render_scenes, scene_detections
from rewards.geneval.scorer import RELATIONS, TASKS, Detection, evaluate
from rewards.shapes.detector import detect_batch
from rewards.shapes.sprites import COLORS, SHAPES, SIZES, sprite_mask

__all__ = [
    "CORRUPTIONS",
    "KIND_WEIGHTS",
    "NEGATIVE_KINDS",
    "PERTURBATIONS",
    "ArtifactExamples",
    "MatchExamples",
    "Verdicts",
    "artifact_examples",
    "judge",
    "match_examples",
    "negative_kinds",
    "perturb_images",
]

NEGATIVE_KINDS: tuple[str, ...] = (
    "wrong_shape",
    "wrong_colour",
    "swapped_colours",
    "wrong_count",
    "extra_object",
    "wrong_position",
    "missing_object",
)
PERTURBATIONS: tuple[str, ...] = ("blur", "noise", "erase", "dim", "speckle")
CORRUPTIONS: tuple[str, ...] = ("noise", "broken", "merged", "blur", "off_palette")

KIND_WEIGHTS: dict[str, float] = {
    "wrong_shape": 1.0,
    "missing_object": 1.0,
    "wrong_colour": 2.0,
    "swapped_colours": 2.0,
    "wrong_count": 3.0,
    "extra_object": 4.0,
    "wrong_position": 4.0,
}
"""Default sampling weight of each negative kind among those a task allows: the kinds that need binding,
counting or relations are drawn more often than a wrong or missing shape, which every task allows."""
_DISTRACTORS = (0, 0, 0, 1, 1, 2)  # n_distractors drawn uniformly from this: 0 half the time

Metadata = dict[str, Any]


@dataclass
class MatchExamples:
    """``N`` prompt-image pairs for the agreement model.

    Attributes:
        images: ``[N, 3, 32, 32]`` uint8 (divide by 255 for the reward's [0, 1] input).
        prompts: ``N`` prompt texts.
        labels: ``[N]`` float32, 1 when GenEval judges the image correct for the prompt.
        kinds: ``N`` names: ``"positive"`` or the :data:`NEGATIVE_KINDS` entry the image was made as.
        tags: ``N`` GenEval task tags.
        perturbed: ``[N]`` bool, the image went through :func:`perturb_images`.
        strict_labels: ``[N]`` float32, Flow-GRPO's exact-count ``strict_correct`` verdict (reported only).
        metadata: ``N`` GenEval metadata dicts of the prompts.
        detections: ``N`` lists of the exact detector's detections of the images (what the labels judge).
    """

    images: Tensor
    prompts: list[str]
    labels: Tensor
    kinds: list[str]
    tags: list[str]
    perturbed: Tensor
    strict_labels: Tensor
    metadata: list[Metadata]
    detections: list[list[Detection]]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class ArtifactExamples:
    """``N`` images for the artifact classifier.

    Attributes:
        images: ``[N, 3, 32, 32]`` uint8.
        labels: ``[N]`` float32, 1 clean, 0 corrupted.
        kinds: ``N`` names: ``"clean"`` or a :data:`CORRUPTIONS` entry.
    """

    images: Tensor
    labels: Tensor
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.kinds)


# ----------------------------------------------------------------------------------- scenes and judging


def _names_unseen(scene: Scene, unseen: set[tuple[str, str]]) -> bool:
    return any((o.shape, o.color) in unseen for o in scene.objects)


def _sample_allowed(
    metadata: Mapping[str, Any], rng: np.random.Generator, n_distractors: int, unseen: set[tuple[str, str]]
) -> Scene:
    """:func:`sample_scene` redrawn until no object shows a held-out pair."""
    for _ in range(64):
        scene = sample_scene(metadata, rng, n_distractors=n_distractors)
        if not _names_unseen(scene, unseen):
            return scene
    raise UnsatisfiablePromptError(f"every scene sampled for {dict(metadata)} shows a held-out pair.")


@dataclass
class Verdicts:
    """GenEval's verdicts on ``N`` images.

    Attributes:
        correct: ``[N]`` float32, GenEval's ``correct`` (1.0 / 0.0).
        strict: ``[N]`` float32, Flow-GRPO's exact-count ``strict_correct``.
        detections: the exact detector's detections of each image.
    """

    correct: Tensor
    strict: Tensor
    detections: list[list[Detection]]


def judge(images: Tensor, metadata: Sequence[Mapping[str, Any]]) -> Verdicts:
    """GenEval's verdicts on ``[N, 3, H, W]`` images in [0, 1] with the shapes world's exact detector."""
    detections = detect_batch(images)
    results = [evaluate(d, m) for d, m in zip(detections, metadata, strict=True)]
    return Verdicts(
        torch.tensor([float(r.correct) for r in results]),
        torch.tensor([float(r.strict_correct) for r in results]),
        detections,
    )


# ------------------------------------------------------------------------------------------- negatives


def negative_kinds(metadata: Mapping[str, Any]) -> list[str]:
    """The :data:`NEGATIVE_KINDS` that apply to a prompt's task."""
    tag = metadata["tag"]
    kinds = ["wrong_shape", "missing_object"]
    if tag == "counting":
        kinds += ["wrong_count"] + (["extra_object"] if metadata["include"][0]["count"] < 4 else [])
    if tag in ("colors", "color_attr"):
        kinds.append("wrong_colour")
    if tag == "color_attr":
        kinds.append("swapped_colours")
    if tag == "position":
        kinds.append("wrong_position")
    return kinds


def _corrupt(
    metadata: Mapping[str, Any], kind: str, rng: np.random.Generator, unseen: set[tuple[str, str]]
) -> Metadata | None:
    """Metadata a negative scene of ``kind`` is sampled for, or None when this draw cannot make one."""
    m: Metadata = copy.deepcopy(dict(metadata))
    include = m["include"]
    named = [c["class"] for c in include]
    k = int(rng.integers(len(include)))
    if kind == "wrong_shape":
        color = include[k].get("color")
        options = [s for s in SHAPES if s not in named and (s, color) not in unseen]
        if not options:
            return None
        include[k]["class"] = options[int(rng.integers(len(options)))]
        if m["tag"] == "counting":
            m["exclude"] = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
    elif kind == "wrong_colour":
        colored = [i for i, c in enumerate(include) if "color" in c]
        k = colored[int(rng.integers(len(colored)))]
        options = [c for c in COLORS if c != include[k]["color"] and (include[k]["class"], c) not in unseen]
        include[k]["color"] = options[int(rng.integers(len(options)))]
    elif kind == "swapped_colours":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
        if any((c["class"], c["color"]) in unseen for c in include):
            return None
    elif kind in ("wrong_count", "extra_object"):
        count = include[0]["count"]
        options = (
            [count + 1]
            if kind == "extra_object"
            else [n for n in (1, 2, 3, 4) if n not in (count, count + 1)]
        )
        include[0]["count"] = options[int(rng.integers(len(options)))]
        m["exclude"] = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
    elif kind == "wrong_position":
        relation = include[1]["position"][0]
        options = [r for r in RELATIONS if r != relation]
        include[1]["position"] = [options[int(rng.integers(len(options)))], 0]
    elif kind == "missing_object":
        if len(include) == 1:
            others = [s for s in SHAPES if s not in named]
            if rng.random() < 0.3:
                return {"tag": "empty", "include": []}
            include[0] = {"class": others[int(rng.integers(len(others)))], "count": 1}
        else:
            kept = dict(include[1 - k])
            kept.pop("position", None)
            m["include"] = [kept]
    else:
        raise ValueError(f"unknown negative kind {kind!r}; kinds are {list(NEGATIVE_KINDS)}.")
    # Classes the prompt names but the corrupted metadata does not include stay out of the scene.
    included = {c["class"] for c in m["include"]}
    m["exclude"] = list(m.get("exclude", [])) + [
        {"class": s, "count": 1} for s in dict.fromkeys(named) if s not in included
    ]
    return m


def _negative_scene(
    metadata: Mapping[str, Any], kind: str, rng: np.random.Generator, unseen: set[tuple[str, str]]
) -> Scene | None:
    for _ in range(16):
        corrupted = _corrupt(metadata, kind, rng, unseen)
        if corrupted is None:
            return None
        if corrupted["tag"] == "empty":
            return Scene(())
        try:
            scene = _sample_allowed(corrupted, rng, int(rng.choice(_DISTRACTORS)), unseen)
        except UnsatisfiablePromptError:
            continue
        if not evaluate(scene_detections(scene), metadata).correct:
            return scene
    return None


# ------------------------------------------------------------------------------------ imperfect images


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Blur each channel of ``[C, H, W]`` (edges replicated)."""
    return torch.from_numpy(ndimage.gaussian_filter(image.numpy(), sigma=(0, sigma, sigma), mode="nearest"))


def _perturb_one(image: Tensor, op: str, rng: np.random.Generator) -> Tensor:
    _, h, w = image.shape
    if op == "blur":
        return _gaussian_blur(image, float(rng.uniform(0.4, 1.2)))
    if op == "noise":
        noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
        return image + float(rng.uniform(0.03, 0.25)) * noise
    if op == "erase":
        out = image.clone()
        for _ in range(int(rng.integers(1, 3))):
            eh, ew = (int(v) for v in rng.integers(2, 7, size=2))
            y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            out[:, y : y + eh, x : x + ew] = 0
        return out
    if op == "dim":
        scale = torch.from_numpy(rng.uniform(0.55, 0.95, size=(3, 1, 1)).astype(np.float32))
        return image * scale
    if op == "speckle":
        out = image.clone()
        n = int(rng.integers(5, 40))
        ys, xs = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
        out[:, ys, xs] = torch.from_numpy(rng.random((3, n)).astype(np.float32))
        return out
    raise ValueError(f"unknown perturbation {op!r}; perturbations are {list(PERTURBATIONS)}.")


def perturb_images(images: Tensor, rng: np.random.Generator) -> Tensor:
    """Imperfect versions of ``[N, 3, H, W]`` images in [0, 1]: 1-2 random :data:`PERTURBATIONS` each
    (Gaussian blur sigma 0.4-1.2, pixel noise std 0.03-0.25, 1-2 erased 2-6 px patches, per-channel
    dimming to 55-95 %, 5-40 random-coloured pixels), clamped and quantized to multiples of 1/255."""
    out = []
    for image in images:
        ops = rng.choice(len(PERTURBATIONS), size=int(rng.integers(1, 3)), replace=False)
        for op in sorted(ops):
            image = _perturb_one(image, PERTURBATIONS[op], rng)
        out.append(image)
    return _quantize(torch.stack(out))


def _quantize(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round() / 255


# ------------------------------------------------------------------------------------- match examples


def match_examples(
    prompts: Sequence[Mapping[str, Any]],
    n: int,
    rng: np.random.Generator,
    *,
    positive_fraction: float = 0.5,
    perturbed_fraction: float = 0.0,
    rephrase: bool = False,
    kind_weights: Mapping[str, float] = KIND_WEIGHTS,
    unseen_pairs: Sequence[tuple[str, str]] = UNSEEN_PAIRS,
    progress: bool = False,
) -> MatchExamples:
    """``n`` labelled prompt-image pairs (module docstring).

    Prompts are drawn task-uniformly (a GenEval task, then a prompt of it), so the small tasks weigh as
    much as color_attr, as in GenEval's overall score. ``rephrase`` replaces a prompt by a random phrasing
    that asks for the same thing (clause order; "A left of B" or "B right of A"). Negatives draw a kind
    among those the task allows with probability proportional to ``kind_weights``. ``perturbed_fraction`` of the examples go through
    :func:`perturb_images` and are relabelled by the judge.
    """
    unseen = {tuple(p) for p in unseen_pairs}
    for metadata in prompts:
        if any((c["class"], c.get("color")) in unseen for c in metadata["include"]):
            raise ValueError(f"prompt {metadata['prompt']!r} names a held-out (shape, colour) pair.")
    by_task = {t: [m for m in prompts if m["tag"] == t] for t in TASKS}
    tasks = [t for t in TASKS if by_task[t]]
    if not tasks:
        raise ValueError("match_examples() needs at least one prompt.")
    scenes, metas, kinds = [], [], []
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="match examples", leave=False)
    for _ in iterator:
        while True:
            group = by_task[tasks[int(rng.integers(len(tasks)))]]
            metadata = group[int(rng.integers(len(group)))]
            if rephrase:
                metadata = _rephrase(metadata, rng)
            if rng.random() < positive_fraction:
                kind = "positive"
                scene = _sample_allowed(metadata, rng, int(rng.choice(_DISTRACTORS)), unseen)
            else:
                options = negative_kinds(metadata)
                weights = np.array([kind_weights.get(k, 0.0) for k in options])
                kind = options[int(rng.choice(len(options), p=weights / weights.sum()))]
                scene = _negative_scene(metadata, kind, rng, unseen)
                if scene is None:
                    continue
            break
        scenes.append(scene)
        metas.append(metadata)
        kinds.append(kind)
    images = render_scenes(scenes)
    perturbed = torch.from_numpy(rng.random(n) < perturbed_fraction)
    if perturbed.any():
        images[perturbed] = perturb_images(images[perturbed], rng)
    verdicts = judge(images, metas)
    return MatchExamples(
        images=(images * 255).round().to(torch.uint8),
        prompts=[m["prompt"] for m in metas],
        labels=verdicts.correct,
        kinds=kinds,
        tags=[m["tag"] for m in metas],
        perturbed=perturbed,
        strict_labels=verdicts.strict,
        metadata=metas,
        detections=verdicts.detections,
    )


def _rephrase(metadata: Mapping[str, Any], rng: np.random.Generator) -> Metadata:
    """A random phrasing of the same prompt (:func:`~flowalign.worlds.shapes.prompts.canonical_key` equal)."""
    from flowalign.worlds.shapes import prompts as P

    include = metadata["include"]
    tag = metadata["tag"]
    if tag == "two_object" and rng.random() < 0.5:
        return P.two_object_prompt(include[1]["class"], include[0]["class"])
    if tag == "color_attr" and rng.random() < 0.5:
        return P.color_attr_prompt(
            include[1]["class"], include[1]["color"], include[0]["class"], include[0]["color"]
        )
    if tag == "position" and rng.random() < 0.5:
        inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return P.position_prompt(include[0]["class"], inverse[include[1]["position"][0]], include[1]["class"])
    return dict(metadata)


# ---------------------------------------------------------------------------------- artifact examples


def _paint(canvas: np.ndarray, mask: np.ndarray, rgb: Sequence[float], x: int, y: int) -> None:
    """Paint ``mask`` at (x, y) in colour ``rgb``, clipped to the canvas."""
    h, w = canvas.shape[1:]
    size = mask.shape[0]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, h), min(x + size, w)
    if y0 >= y1 or x0 >= x1:
        return
    sub = mask[y0 - y : y1 - y, x0 - x : x1 - x]
    for c in range(3):
        canvas[c, y0:y1, x0:x1][sub] = rgb[c]


def _render_objects(
    scene: Scene, replace: Mapping[int, tuple[np.ndarray, Sequence[float]]] | None = None
) -> np.ndarray:
    canvas = np.zeros((3, scene.height, scene.width), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        mask, rgb = (replace or {}).get(i, (sprite_mask(obj.shape, obj.size), COLORS[obj.color]))
        _paint(canvas, mask, rgb, obj.x, obj.y)
    return canvas


def _broken_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sprite with holes, a cut line, or a piece displaced."""
    out = mask.copy()
    size = mask.shape[0]
    mode = int(rng.integers(3))
    if mode == 0:  # holes inside the sprite
        on = np.argwhere(mask)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = on[int(rng.integers(len(on)))]
            r = int(rng.integers(1, 3))
            out[max(cy - r + 1, 0) : cy + r, max(cx - r + 1, 0) : cx + r] = False
    elif mode == 1:  # a 1-2 px cut through the sprite: row, column or diagonal
        width = int(rng.integers(1, 3))
        at = int(rng.integers(2, size - 3))
        i, j = np.mgrid[0:size, 0:size]
        line = [i - at, j - at, i - j + (at - size // 2), i + j - (size - 1) + (at - size // 2)][
            int(rng.integers(4))
        ]
        out[(line >= 0) & (line < width)] = False
    else:  # one half shifted by 1-3 px
        at = int(rng.integers(3, size - 3))
        shift = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        half = out.copy()
        if rng.random() < 0.5:
            half[:at] = False
            out[at:] = False
            out |= np.roll(half, shift, axis=1)
        else:
            half[:, :at] = False
            out[:, at:] = False
            out |= np.roll(half, shift, axis=0)
    return out


def _corrupt_scene(scene: Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    objects = scene.objects
    k = int(rng.integers(len(objects)))
    if kind == "broken":
        obj = objects[k]
        return _render_objects(
            scene, {k: (_broken_mask(sprite_mask(obj.shape, obj.size), rng), COLORS[obj.color])}
        )
    if kind == "off_palette":
        replace = {}
        for i in rng.permutation(len(objects))[: int(rng.integers(1, len(objects) + 1))]:
            while True:
                rgb = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=3)
                if (rgb.max() > 0.3) and np.any((rgb > 0) & (rgb < 1)):
                    break
            obj = objects[int(i)]
            replace[int(i)] = (sprite_mask(obj.shape, obj.size), tuple(float(v) for v in rgb))
        return _render_objects(scene, replace)
    if kind == "merged":
        canvas = _render_objects(scene)
        obj = objects[k]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        same_colour = rng.random() < 0.5
        color = obj.color if same_colour else list(COLORS)[int(rng.integers(len(COLORS)))]
        # Overlap the boxes by 2 px or more, so the sprites touch or cover each other.
        for _ in range(32):
            dx, dy = (int(v) for v in rng.integers(-(size - 2), obj.size - 1, size=2))
            x, y = obj.x + dx, obj.y + dy
            if 0 <= x <= scene.width - size and 0 <= y <= scene.height - size and (dx, dy) != (0, 0):
                break
        _paint(canvas, sprite_mask(shape, size), COLORS[color], x, y)
        return canvas
    canvas = _render_objects(scene)
    image = torch.from_numpy(canvas)
    if kind == "noise":
        if rng.random() < 0.5:
            noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
            image = image + float(rng.uniform(0.06, 0.3)) * noise
        else:
            image = _perturb_one(image, "speckle", rng)
    elif kind == "blur":
        mode = int(rng.integers(3))
        if mode == 0:
            image = _gaussian_blur(image, float(rng.uniform(0.5, 1.5)))
        else:
            c = int(rng.integers(3))
            if mode == 1:  # colour bleeding: one channel shifted by 1-2 px
                shift = int(rng.integers(1, 3)) * (1 if rng.random() < 0.5 else -1)
                image[c] = torch.roll(image[c], shift, dims=int(rng.integers(1, 3)) - 1)
            else:  # one channel blurred alone
                image[c : c + 1] = _gaussian_blur(image[c : c + 1], float(rng.uniform(0.8, 1.8)))
    else:
        raise ValueError(f"unknown corruption {kind!r}; corruptions are {list(CORRUPTIONS)}.")
    return image.clamp(0, 1).numpy()


def artifact_examples(
    prompts: Sequence[Mapping[str, Any]],
    n: int,
    rng: np.random.Generator,
    *,
    clean_fraction: float = 0.5,
    unseen_pairs: Sequence[tuple[str, str]] = UNSEEN_PAIRS,
    progress: bool = False,
) -> ArtifactExamples:
    """``n`` clean (``clean_fraction``) or corrupted renders of scenes sampled for random prompts of
    ``prompts`` with 0-2 distractors; corruptions uniform over :data:`CORRUPTIONS` (module docstring)."""
    unseen = {tuple(p) for p in unseen_pairs}
    if not prompts:
        raise ValueError("artifact_examples() needs at least one prompt.")
    images, kinds = [], []
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="artifact examples", leave=False)
    for _ in iterator:
        metadata = prompts[int(rng.integers(len(prompts)))]
        scene = _sample_allowed(metadata, rng, int(rng.choice(_DISTRACTORS)), unseen)
        if rng.random() < clean_fraction:
            kinds.append("clean")
            images.append(_render_objects(scene))
        else:
            kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
            kinds.append(kind)
            images.append(_corrupt_scene(scene, kind, rng))
    stacked = _quantize(torch.from_numpy(np.stack(images)))
    return ArtifactExamples(
        images=(stacked * 255).round().to(torch.uint8),
        labels=torch.tensor([float(k == "clean") for k in kinds]),
        kinds=kinds,
    )
