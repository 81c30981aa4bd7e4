"""GenEval-style prompts for the shapes world, and their train / test / unseen splits.

Prompts are GenEval metadata (``tag``, ``include[{class, count, color?, position?}]``, optional
``exclude``, ``prompt``) over the six GenEval tasks, phrased as GenEval's ``prompts/create_prompts.py``
phrases them ("a photo of a red circle", "a photo of three squares", "a photo of a circle left of a
square", "a photo of a red circle and a blue square"). As in GenEval, two-object prompts name two
different classes and colour-attribution prompts two different classes with two different colours.

**Duplicates.** Two prompts are the same when they ask for the same thing (:func:`canonical_key`):
"a red circle and a blue square" == "a blue square and a red circle", and "a circle left of a square" ==
"a square right of a circle" (GenEval's position rule is antisymmetric: A left of B iff B right of A).
The world then has exactly 326 distinct prompts: single_object 4, two_object 6, counting 12 (4 shapes x
2-4), colors 28, position 24, color_attr 252. Each appears in at most one split, in one phrasing whose
word order is drawn at random.

**Splits** (:func:`make_splits`). ``unseen`` holds every prompt that names a held-out (shape, colour) pair
(:data:`UNSEEN_PAIRS`, one per shape, four different colours); those pairs appear in no train or test
prompt. The remaining prompts of each task are split in half between ``train`` and ``test``, stratified so
that both halves see every shape, count, colour and axis: counting gives each count two shapes in test and
the other two in train; position puts one orientation of each (pair, axis) in test and the other in
train; colors splits each shape's colours. With the default pairs: train 128, test 128
(2 / 3 / 6 / 12 / 12 / 93 per task), unseen 70 (4 colors + 66 color_attr). The splits depend only on
``seed``.

Write them with ``python -m flowalign.worlds.shapes.prompts --out assets/shapes/prompts``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rewards.geneval.scorer import TASKS
from rewards.shapes.sprites import COLORS, SHAPES

__all__ = [
    "NUMBERS",
    "PromptSplits",
    "SPLITS",
    "UNSEEN_PAIRS",
    "canonical_key",
    "color_attr_prompt",
    "colors_prompt",
    "counting_prompt",
    "load_prompts",
    "main",
    "make_splits",
    "position_prompt",
    "single_object_prompt",
    "two_object_prompt",
    "write_splits",
]

NUMBERS = {2: "two", 3: "three", 4: "four"}
UNSEEN_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "green"),
    ("square", "magenta"),
    ("triangle", "yellow"),
    ("diamond", "cyan"),
)
"""(shape, colour) pairs held out of train and test: the ``unseen`` split is every prompt naming one."""
SPLITS: tuple[str, ...] = ("train", "test", "unseen")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

Metadata = dict[str, Any]


# --- prompt builders (GenEval's create_prompts.py phrasing) ---------------------------------------------


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _plural(word: str) -> str:
    return f"{word}es" if word.endswith("s") else f"{word}s"


def single_object_prompt(shape: str) -> Metadata:
    """``a photo of a circle``."""
    return {
        "tag": "single_object",
        "include": [{"class": shape, "count": 1}],
        "prompt": f"a photo of {_article(shape)}",
    }


def two_object_prompt(shape_a: str, shape_b: str) -> Metadata:
    """``a photo of a circle and a square``."""
    return {
        "tag": "two_object",
        "include": [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}],
        "prompt": f"a photo of {_article(shape_a)} and {_article(shape_b)}",
    }


def counting_prompt(shape: str, count: int) -> Metadata:
    """``a photo of three circles``; excludes ``count + 1`` as GenEval does, so exactly ``count`` pass."""
    if count not in NUMBERS:
        raise ValueError(f"counting prompts ask for {sorted(NUMBERS)} objects, got {count!r}.")
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": count}],
        "exclude": [{"class": shape, "count": count + 1}],
        "prompt": f"a photo of {NUMBERS[count]} {_plural(shape)}",
    }


def colors_prompt(shape: str, color: str) -> Metadata:
    """``a photo of a red circle``."""
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": f"a photo of {_article(color)} {shape}",
    }


def position_prompt(shape_a: str, relation: str, shape_b: str) -> Metadata:
    """``a photo of a circle left of a square``: clause 0 is the reference B, clause 1 is A relative to it."""
    if relation not in _INVERSE:
        raise ValueError(f"unknown relation {relation!r}; use one of {list(_INVERSE)}.")
    return {
        "tag": "position",
        "include": [
            {"class": shape_b, "count": 1},
            {"class": shape_a, "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of {_article(shape_a)} {relation} {_article(shape_b)}",
    }


def color_attr_prompt(shape_a: str, color_a: str, shape_b: str, color_b: str) -> Metadata:
    """``a photo of a red circle and a blue square``."""
    return {
        "tag": "color_attr",
        "include": [
            {"class": shape_a, "count": 1, "color": color_a},
            {"class": shape_b, "count": 1, "color": color_b},
        ],
        "prompt": f"a photo of {_article(color_a)} {shape_a} and {_article(color_b)} {shape_b}",
    }


def canonical_key(metadata: Mapping[str, Any]) -> str:
    """A string equal for prompts that ask for the same thing, whatever the order of their clauses.

    Objects are compared as a sorted list of (class, count, colour); each relation is rewritten with
    "left of" / "above" (``A right of B`` -> ``B left of A``) over object descriptions instead of indices;
    exclude clauses are sorted; the tag is part of the key, the prompt text is not.
    """
    include = metadata["include"]
    objects = [(c["class"], c["count"], c.get("color") or "") for c in include]
    relations = []
    for j, clause in enumerate(include):
        if "position" in clause:
            relation, i = clause["position"]
            a, b = objects[j], objects[i]
            if relation in ("right of", "below"):
                relation, a, b = _INVERSE[relation], b, a
            relations.append([list(a), relation, list(b)])
    exclude = sorted((c["class"], c["count"]) for c in metadata.get("exclude", []))
    return json.dumps(
        {
            "tag": metadata["tag"],
            "objects": sorted(objects),
            "relations": sorted(relations),
            "exclude": exclude,
        }
    )


# --- splits -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSplits:
    """The three prompt lists (GenEval metadata dicts, grouped by task in GenEval's task order).

    Attributes:
        train, test, unseen: the splits (see the module docstring).
        unseen_pairs: the held-out (shape, colour) pairs.
        seed: the seed they were drawn with.
    """

    train: list[Metadata]
    test: list[Metadata]
    unseen: list[Metadata]
    unseen_pairs: tuple[tuple[str, str], ...]
    seed: int

    def as_dict(self) -> dict[str, list[Metadata]]:
        return {"train": self.train, "test": self.test, "unseen": self.unseen}


def make_splits(seed: int = 0, unseen_pairs: Sequence[tuple[str, str]] = UNSEEN_PAIRS) -> PromptSplits:
    """Draw the train / test / unseen splits (module docstring); deterministic given ``seed``."""
    held_out = set()
    for pair in unseen_pairs:
        shape, color = pair
        if shape not in SHAPES or color not in COLORS:
            raise ValueError(
                f"unseen pair {pair!r} is not a (shape, colour) of the shapes world: shapes {list(SHAPES)}, "
                f"colours {list(COLORS)}."
            )
        held_out.add((shape, color))
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Metadata]] = {name: [] for name in SPLITS}

    def assign(prompts: list[Metadata], in_test: Iterable[bool]) -> None:
        for metadata, test in zip(prompts, in_test, strict=True):
            splits["test" if test else "train"].append(metadata)

    # single_object, two_object: half of the (few) prompts each.
    shapes = list(SHAPES)
    test_shapes = set(_half(shapes, rng))
    assign([single_object_prompt(s) for s in shapes], [s in test_shapes for s in shapes])
    pairs = list(itertools.combinations(SHAPES, 2))
    test_pairs = set(_half(pairs, rng))
    assign([two_object_prompt(*_maybe_swap(p, rng)) for p in pairs], [p in test_pairs for p in pairs])

    # counting: each count has two shapes in test and the other two in train.
    order = [shapes[i] for i in rng.permutation(len(shapes))]
    for t, count in enumerate(sorted(NUMBERS)):
        in_test = {order[(2 * t) % 4], order[(2 * t + 1) % 4]}
        assign([counting_prompt(s, count) for s in shapes], [s in in_test for s in shapes])

    # colors: each shape's seen colours split in half; held-out pairs go to unseen.
    for shape in SHAPES:
        seen = [c for c in COLORS if (shape, c) not in held_out]
        test_colors = set(_half(seen, rng))
        assign([colors_prompt(shape, c) for c in seen], [c in test_colors for c in seen])
        splits["unseen"] += [colors_prompt(shape, c) for c in COLORS if (shape, c) in held_out]

    # position: per unordered pair and axis, one orientation in test, the other in train.
    for a, b in pairs:
        for relation in ("left of", "above"):
            flip = int(rng.integers(2))
            for k, (first, second) in enumerate(((a, b), (b, a))):
                if rng.integers(2):  # phrase "first left of second" or "second right of first"
                    metadata = position_prompt(second, _INVERSE[relation], first)
                else:
                    metadata = position_prompt(first, relation, second)
                splits["test" if k == flip else "train"].append(metadata)

    # color_attr: prompts naming a held-out pair go to unseen; the rest split in half.
    seen_attr, unseen_attr = [], []
    for a, b in pairs:
        for ca, cb in itertools.permutations(COLORS, 2):
            (sa, ca_), (sb, cb_) = _maybe_swap(((a, ca), (b, cb)), rng)
            metadata = color_attr_prompt(sa, ca_, sb, cb_)
            (unseen_attr if {(a, ca), (b, cb)} & held_out else seen_attr).append(metadata)
    test_index = set(_half(list(range(len(seen_attr))), rng))
    assign(seen_attr, [i in test_index for i in range(len(seen_attr))])
    splits["unseen"] += unseen_attr

    for name in SPLITS:
        splits[name].sort(key=lambda m: TASKS.index(m["tag"]))  # stable: keeps the order within a task
    return PromptSplits(splits["train"], splits["test"], splits["unseen"], tuple(unseen_pairs), seed)


def _half(items: list, rng: np.random.Generator) -> list:
    """A random half (rounded down) of ``items``."""
    return [items[i] for i in rng.permutation(len(items))[: len(items) // 2]]


def _maybe_swap(pair: tuple, rng: np.random.Generator) -> tuple:
    return pair[::-1] if rng.integers(2) else pair


# --- files --------------------------------------------------------------------------------------------


def write_splits(splits: PromptSplits, out_dir: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``unseen.jsonl`` (one GenEval metadata object per line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, prompts in splits.as_dict().items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in prompts))
        tmp.replace(path)
        paths[name] = path
    return paths


def load_prompts(path: str | Path) -> list[Metadata]:
    """Read a jsonl prompt file and check every line against GenEval's schema and the shapes vocabulary
    (:func:`flowalign.eval.geneval.load_geneval_prompts` with the shapes detector)."""
    from flowalign.eval.geneval import load_geneval_prompts

    return load_geneval_prompts(path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flowalign.worlds.shapes.prompts --out DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. assets/shapes/prompts")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    args = parser.parse_args(argv)
    splits = make_splits(args.seed)
    for name, path in write_splits(splits, args.out).items():
        prompts = splits.as_dict()[name]
        per_task = {t: sum(m["tag"] == t for m in prompts) for t in TASKS}
        print(f"{path}: {len(prompts)} prompts {per_task}")


if __name__ == "__main__":
    main()
