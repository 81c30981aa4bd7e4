"""Procedural (caption, image) pairs of the shapes world for pretraining, never showing a held-out pair.

:func:`sample_training_prompt` draws GenEval metadata from the world's prompt templates -- a task by
``task_weights``, then its classes, colours, counts and relation uniformly, in a random phrasing (clause
order, "A left of B" or "B right of A") -- i.e. from the distribution whose support is the train and test
splits' prompts. :class:`SceneStream` renders a scene for each (:func:`sample_scene`, no distractors).
Neither a caption nor an image ever contains a (shape, colour) pair of ``unseen_pairs`` (default
:data:`UNSEEN_PAIRS`): captions naming one are redrawn, and scenes in which an object got a held-out pair
as its random colour are redrawn, which is exactly sampling those colours uniformly from the allowed ones.

All randomness comes from one ``numpy.random.Generator``; :meth:`SceneStream.state` /
:meth:`SceneStream.set_state` save and restore it as JSON, so a training run resumes on the very batch
it would have drawn.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from flowalign.worlds.shapes.prompts import (
    NUMBERS,
    UNSEEN_PAIRS,
    color_attr_prompt,
    colors_prompt,
    counting_prompt,
    position_prompt,
    single_object_prompt,
    two_object_prompt,
)
from flowalign.worlds.shapes.sampler import sample_scene
from flowalign.worlds.shapes.scene import Scene, render_scenes
from rewards.geneval.scorer import TASKS
from rewards.shapes.sprites import COLORS, SHAPES

__all__ = [
    "SceneBatch",
    "SceneStream",
    "main",
    "names_held_out_pair",
    "sample_training_prompt",
    "write_captions",
    "write_real_images",
]

_RELATIONS = ("left of", "right of", "above", "below")


def names_held_out_pair(metadata: Mapping[str, Any], pairs: Sequence[tuple[str, str]] = UNSEEN_PAIRS) -> bool:
    """Whether an include clause of ``metadata`` asks for a (shape, colour) pair of ``pairs``."""
    held = set(pairs)
    return any((c["class"], c.get("color")) in held for c in metadata["include"])


def _pick(rng: np.random.Generator, items: Sequence, k: int = 1) -> list:
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def sample_training_prompt(
    rng: np.random.Generator,
    task_weights: Sequence[float] | None = None,
    unseen_pairs: Sequence[tuple[str, str]] = UNSEEN_PAIRS,
) -> dict[str, Any]:
    """One GenEval metadata dict from the world's templates (module docstring); ``task_weights`` are
    per task in :data:`rewards.geneval.TASKS` order (default uniform)."""
    weights = np.asarray(task_weights if task_weights is not None else [1.0] * len(TASKS), dtype=np.float64)
    if weights.shape != (len(TASKS),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"task_weights must be {len(TASKS)} non-negative numbers ({', '.join(TASKS)}), got {task_weights!r}."
        )
    task = TASKS[int(rng.choice(len(TASKS), p=weights / weights.sum()))]
    colors = list(COLORS)
    while True:
        if task == "single_object":
            metadata = single_object_prompt(_pick(rng, SHAPES)[0])
        elif task == "two_object":
            metadata = two_object_prompt(*_pick(rng, SHAPES, 2))
        elif task == "counting":
            metadata = counting_prompt(_pick(rng, SHAPES)[0], int(_pick(rng, sorted(NUMBERS))[0]))
        elif task == "colors":
            metadata = colors_prompt(_pick(rng, SHAPES)[0], _pick(rng, colors)[0])
        elif task == "position":
            a, b = _pick(rng, SHAPES, 2)
            metadata = position_prompt(a, _pick(rng, _RELATIONS)[0], b)
        else:
            (a, b), (ca, cb) = _pick(rng, SHAPES, 2), _pick(rng, colors, 2)
            metadata = color_attr_prompt(a, ca, b, cb)
        if not names_held_out_pair(metadata, unseen_pairs):
            return metadata


def _scene_without_held_out_pairs(
    metadata: Mapping[str, Any], rng: np.random.Generator, unseen_pairs: Sequence[tuple[str, str]]
) -> Scene:
    """A scene of ``metadata`` (:func:`sample_scene`), redrawn while an object has a held-out (shape, colour)
    pair as its random colour: exactly sampling those colours uniformly from the allowed ones."""
    held = set(unseen_pairs)
    while True:
        scene = sample_scene(metadata, rng)
        if not any((o.shape, o.color) in held for o in scene.objects):
            return scene


@dataclass
class SceneBatch:
    """``B`` training pairs: ``images [B, 3, H, W]`` float32 in {0, 1}, their ``captions`` and metadata."""

    images: Tensor
    captions: list[str]
    metadata: list[dict[str, Any]]
    scenes: list[Scene]


class SceneStream:
    """An endless stream of (caption, rendered scene) batches driven by one seeded numpy generator."""

    def __init__(
        self,
        seed: int,
        task_weights: Sequence[float] | None = None,
        unseen_pairs: Sequence[tuple[str, str]] = UNSEEN_PAIRS,
    ):
        self.rng = np.random.default_rng(seed)
        self.task_weights = None if task_weights is None else list(task_weights)
        self.unseen_pairs = tuple(tuple(p) for p in unseen_pairs)
        for shape, color in self.unseen_pairs:
            if shape not in SHAPES or color not in COLORS:
                raise ValueError(
                    f"unseen pair {(shape, color)!r} is not a (shape, colour) of the shapes world."
                )

    def sample(self) -> tuple[dict[str, Any], Scene]:
        metadata = sample_training_prompt(self.rng, self.task_weights, self.unseen_pairs)
        return metadata, _scene_without_held_out_pairs(metadata, self.rng, self.unseen_pairs)

    def next_batch(self, batch_size: int) -> SceneBatch:
        pairs = [self.sample() for _ in range(batch_size)]
        scenes = [s for _, s in pairs]
        return SceneBatch(
            images=render_scenes(scenes),
            captions=[m["prompt"] for m, _ in pairs],
            metadata=[m for m, _ in pairs],
            scenes=scenes,
        )

    def state(self) -> dict[str, Any]:
        """The generator state, JSON-serialisable."""
        return self.rng.bit_generator.state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state)


def write_captions(path: str | Path, count: int, seed: int) -> list[dict[str, Any]]:
    """Write ``count`` captions drawn like the pretraining stream's (:func:`sample_training_prompt`, uniform
    tasks, random phrasing; never a held-out pair) as a GenEval metadata jsonl, and return them.

    This is the teacher's caption distribution, whose support is the train and test splits: distilling on
    it (as DMD2 distils on its teacher's training captions) shows the student every seen prompt, test
    included, and still no unseen one."""
    if count < 1:
        raise ValueError(f"--count must be a positive number of captions, got {count}.")
    rng = np.random.default_rng(seed)
    captions = [sample_training_prompt(rng) for _ in range(count)]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in captions))
    tmp.replace(out)
    return captions


def write_real_images(prompts: str | Path, out: str | Path, per_prompt: int, seed: int) -> int:
    """Render ``per_prompt`` correct scenes of every prompt of a GenEval metadata jsonl (:func:`sample_scene`,
    held-out pairs never drawn as random colours) as PNGs next to ``out``, a jsonl of ``{"prompt", "image",
    "tag"}`` lines: the shapes world's real (caption, image) pairs, e.g. for DMD2's discriminator
    (``dmd.gan_real``). A prompt naming a held-out pair is refused. Returns the number of images."""
    from PIL import Image

    from flowalign.data.prompts import read_jsonl

    if per_prompt < 1:
        raise ValueError(f"--per-prompt must be a positive number of images, got {per_prompt}.")
    prompts, out = Path(prompts), Path(out)
    records = read_jsonl(prompts)
    for number, metadata in records:
        if "prompt" not in metadata or "include" not in metadata:
            raise ValueError(f"{prompts}:{number}: not GenEval metadata (needs prompt and include).")
        if names_held_out_pair(metadata):
            raise ValueError(
                f"{prompts}:{number}: {metadata['prompt']!r} names a held-out (shape, colour) pair; real images "
                "of it would show the model what the unseen split tests."
            )
    rng = np.random.default_rng(seed)
    folder = out.parent / f"{out.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _, metadata in records:
        for _ in range(per_prompt):
            scene = _scene_without_held_out_pairs(metadata, rng, UNSEEN_PAIRS)
            name = f"{len(lines):06d}.png"
            pixels = (render_scenes([scene])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name)
            image = f"{folder.name}/{name}"
            lines.append(
                json.dumps({"prompt": metadata["prompt"], "image": image, "tag": metadata.get("tag")})
            )
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out)
    return len(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flowalign.worlds.shapes.data --out FILE [--count N] [--seed S]``, or with ``--render
    PROMPTS [--per-prompt K]`` real (caption, image) pairs of a prompt file."""
    parser = argparse.ArgumentParser(
        description="Write captions drawn from the shapes pretraining distribution, or (--render) real "
        "(caption, image) pairs of a prompt file."
    )
    parser.add_argument(
        "--out", required=True, help="output jsonl, e.g. assets/shapes/prompts/captions.jsonl"
    )
    parser.add_argument("--count", type=int, default=2048, help="captions to draw (default: 2048)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the draw (default: 1)")
    parser.add_argument(
        "--render",
        metavar="PROMPTS",
        help="a GenEval metadata jsonl: write --per-prompt rendered scenes of each prompt instead of captions "
        "(PNGs in OUT's folder <stem>_images/)",
    )
    parser.add_argument(
        "--per-prompt", type=int, default=8, help="images per prompt with --render (default: 8)"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        try:
            count = write_real_images(args.render, args.out, args.per_prompt, args.seed)
        except (ValueError, OSError) as err:
            parser.error(str(err))
        print(f"{args.out}: {count} images of the prompts of {args.render}")
        return
    if args.count < 1:
        parser.error(f"--count must be a positive number of captions, got {args.count}")
    captions = write_captions(args.out, args.count, args.seed)
    per_task = {t: sum(m["tag"] == t for m in captions) for t in TASKS}
    distinct = len({m["prompt"] for m in captions})
    print(f"{args.out}: {len(captions)} captions ({distinct} distinct phrasings) {per_task}")


if __name__ == "__main__":
    main()
