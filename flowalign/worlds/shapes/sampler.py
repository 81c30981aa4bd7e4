"""Sample scenes that satisfy a prompt's GenEval metadata.

``sample_scene(metadata, rng)`` builds the objects the prompt asks for (``count`` sprites of each include
clause's class, of its colour when given, otherwise of a random colour; a random sprite size each), plus
optional distractors of classes the prompt never names, then places them:

1. **Random placement**, up to ``max_tries`` times: each object at a uniform random position inside the
   canvas, re-drawn while it is closer than :data:`~flowalign.worlds.shapes.scene.MIN_GAP` to an earlier one.
2. **Grid fallback**, when no random placement satisfied the prompt: the objects go into the cells of a
   fixed 2 x 2 grid (centred, 2 px gaps for the largest sprite), trying every assignment of objects to
   cells in an order shuffled by ``rng``. Four objects always fit, and every combination of GenEval
   relations between distinct cells is realisable on the grid.

A placement is accepted only when GenEval's own rules (:func:`rewards.geneval.evaluate`) judge the
scene's exact detections correct for the metadata -- the same check the benchmark makes -- and Flow-GRPO's
strict check passes too (so the partial-credit score is 1.0); the position rule (0.1 x (dim_a + dim_b)
shrink, direction cosine > 0.5) is therefore satisfied by construction. A prompt no
placement can satisfy (too many objects, an exclude clause that contradicts an include clause, a class or
colour outside the shapes world, contradictory relations) raises :class:`UnsatisfiablePromptError`.

Randomness comes only from the generator passed in (a ``numpy.random.Generator`` or a
``torch.Generator``); there is no global RNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from flowalign.worlds.shapes.scene import (
    IMAGE_SIZE,
    MAX_OBJECTS,
    MIN_GAP,
    Scene,
    SceneObject,
    box_gap,
    scene_detections,
)
from rewards.geneval.scorer import MetadataError, evaluate, validate_metadata
from rewards.shapes.sprites import COLORS, SHAPES, SIZES

__all__ = ["UnsatisfiablePromptError", "as_numpy_generator", "sample_scene"]


class UnsatisfiablePromptError(ValueError):
    """Raised when no scene of the shapes world satisfies a prompt's metadata."""


def as_numpy_generator(rng: np.random.Generator | torch.Generator) -> np.random.Generator:
    """A numpy generator driven by ``rng``: itself, or one seeded by a draw from a torch generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=rng).item())
        return np.random.default_rng(seed)
    raise TypeError(f"rng must be a numpy.random.Generator or a torch.Generator, got {type(rng).__name__}.")


def sample_scene(
    metadata: Mapping[str, Any],
    rng: np.random.Generator | torch.Generator,
    *,
    n_distractors: int = 0,
    max_tries: int = 64,
    height: int = IMAGE_SIZE,
    width: int = IMAGE_SIZE,
) -> Scene:
    """A random scene that GenEval's rules judge correct for ``metadata`` (see the module docstring).

    Args:
        metadata: GenEval prompt metadata over the shapes world's classes and colours.
        rng: the only source of randomness.
        n_distractors: up to this many extra objects of classes the metadata never names (random
            colour and size); fewer when the scene would exceed
            :data:`~flowalign.worlds.shapes.scene.MAX_OBJECTS` objects or every class is named.
        max_tries: random placements tried before the grid fallback.
        height, width: canvas size.
    """
    try:
        validate_metadata(metadata, classes=SHAPES, colors=COLORS)
    except MetadataError as err:
        raise UnsatisfiablePromptError(f"cannot sample a scene for {dict(metadata)}: {err}") from None
    if n_distractors < 0:
        raise ValueError(f"n_distractors must be >= 0, got {n_distractors}.")
    generator = as_numpy_generator(rng)
    specs = _object_specs(metadata)
    named = {c["class"] for c in metadata["include"]} | {c["class"] for c in metadata.get("exclude", [])}
    others = [s for s in SHAPES if s not in named]
    if others:
        for _ in range(min(n_distractors, MAX_OBJECTS - len(specs))):
            specs.append((others[int(generator.integers(len(others)))], None))

    for _ in range(max_tries):
        objects = _draw_objects(specs, generator)
        placed = _random_placement(objects, generator, height, width)
        if placed is not None and _satisfies(placed, metadata):
            return placed
    objects = _draw_objects(specs, generator)
    cells = _grid_cells(height, width)
    for assignment in _shuffled_permutations(len(cells), len(objects), generator):
        placed = Scene(
            tuple(_in_cell(obj, cells[cell], max(SIZES)) for obj, cell in zip(objects, assignment)),
            height,
            width,
        )
        if _satisfies(placed, metadata):
            return placed
    failure = evaluate(scene_detections(placed), metadata).reason
    raise UnsatisfiablePromptError(
        f"no scene satisfies {dict(metadata)}: {max_tries} random placements and every grid placement fail "
        f"(last reason: {failure!r}); check that its relations do not contradict each other."
    )


def _object_specs(metadata: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """(shape, colour or None for random) per required object; checks counts against the rules."""
    specs = [(c["class"], c.get("color")) for c in metadata["include"] for _ in range(c["count"])]
    if len(specs) > MAX_OBJECTS:
        raise UnsatisfiablePromptError(
            f"{dict(metadata)} asks for {len(specs)} objects, but a shapes-world scene holds at most {MAX_OBJECTS}."
        )
    for clause in metadata.get("exclude", []):
        required = sum(shape == clause["class"] for shape, _ in specs)
        if required >= clause["count"]:
            raise UnsatisfiablePromptError(
                f"{dict(metadata)} needs {required} {clause['class']} objects but excludes {clause['count']} or more."
            )
    return specs


def _draw_objects(specs: list[tuple[str, str | None]], rng: np.random.Generator) -> list[SceneObject]:
    colors = list(COLORS)
    return [
        SceneObject(
            shape,
            color if color is not None else colors[int(rng.integers(len(colors)))],
            SIZES[int(rng.integers(len(SIZES)))],
            0,
            0,
        )
        for shape, color in specs
    ]


def _random_placement(
    objects: list[SceneObject], rng: np.random.Generator, height: int, width: int, attempts: int = 32
) -> Scene | None:
    placed: list[SceneObject] = []
    for obj in objects:
        for _ in range(attempts):
            x = int(rng.integers(0, width - obj.size + 1))
            y = int(rng.integers(0, height - obj.size + 1))
            candidate = SceneObject(obj.shape, obj.color, obj.size, x, y)
            if all(box_gap(candidate.bbox, other.bbox) >= MIN_GAP for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return Scene(tuple(placed), height, width)


def _grid_cells(height: int, width: int) -> list[tuple[int, int]]:
    """Top-left corners of a centred 2 x 2 grid of cells of the largest sprite size, MIN_GAP apart."""
    cell = max(SIZES)
    span = 2 * cell + MIN_GAP
    if span > min(height, width):
        raise UnsatisfiablePromptError(f"a {width}x{height} canvas is too small for the 2x2 fallback grid.")
    x0, y0 = (width - span) // 2, (height - span) // 2
    return [(x0 + cx * (cell + MIN_GAP), y0 + cy * (cell + MIN_GAP)) for cy in range(2) for cx in range(2)]


def _in_cell(obj: SceneObject, corner: tuple[int, int], cell: int) -> SceneObject:
    offset = (cell - obj.size) // 2  # centred, so objects in one row or column share a centre line
    return SceneObject(obj.shape, obj.color, obj.size, corner[0] + offset, corner[1] + offset)


def _shuffled_permutations(n_cells: int, n_objects: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    perms = list(itertools.permutations(range(n_cells), n_objects))
    return [perms[i] for i in rng.permutation(len(perms))]


def _satisfies(scene: Scene, metadata: Mapping[str, Any]) -> bool:
    result = evaluate(scene_detections(scene), metadata)
    return result.correct and result.strict_correct
