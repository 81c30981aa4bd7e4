"""Train the shapes world's learned rewards and measure them on held-out data.

::

    python -m flowalign.worlds.shapes.train_rewards match \\
        --out assets/shapes/rewards/shapes_match.safetensors --steps 3000 --seed 0
    python -m flowalign.worlds.shapes.train_rewards artifact \\
        --out assets/shapes/rewards/artifact_shapes.safetensors --steps 300 --seed 0

Each command writes the weights (safetensors) and a report next to them (same name, ``.json``: the
configuration, data sizes, wall time, held-out accuracies and the command), which the card
``assets/shapes/rewards/README.md`` quotes and ``tests/test_shapes_rewards.py`` checks against. A run is
deterministic given ``--seed`` (and ``--threads``, default 1: CPU kernels may sum in a different order on
another thread count).

**match** (:mod:`rewards.shapes_match`): examples from :func:`~flowalign.worlds.shapes.reward_data.match_examples`
for the *train* split's prompts only (rephrased at random, ``perturbed_fraction`` of them imperfect);
minibatch AdamW with linear warmup and cosine decay on the label-smoothed BCE of the match logit, plus two
auxiliary losses that give the image and the cross-attention a dense signal early (as MDETR supervises
box-token alignment, Kamath et al. 2021):

- *cells*: from the features of the 4x4-pixel cell holding an object's centre, a linear probe predicts the
  object's shape and colour (cross-entropy; empty cells predict "none"), and the model's offset head
  regresses where in the cell the centre lies (squared error);
- *grounding*: the first counting cross-attention's map of each noun of the prompt ("circle", "squares")
  should be 1 on the centre cells of the detected objects its clause describes (class, and colour when
  the clause has one) and 0 elsewhere (BCE).

Both targets come from the exact detector's detections of the image -- the same detections the label
judges, with GenEval's confidence cut-off. Held out: images of the *test* split's prompts (never trained
on), clean and perturbed, plus the train prompts on fresh images and the unseen split (held-out
(shape, colour) pairs) for reference.

**artifact** (:mod:`rewards.artifact`): clean and corrupted renders from
:func:`~flowalign.worlds.shapes.reward_data.artifact_examples` (train-split prompts), the classifier
trained by :func:`rewards.artifact.train_artifact_classifier` (full-batch, ``--steps`` epochs); held-out
accuracy per corruption on renders of the test split's prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.worlds.shapes.prompts import (
    NUMBERS,
    color_attr_prompt,
    colors_prompt,
    counting_prompt,
    load_prompts,
    position_prompt,
    single_object_prompt,
    two_object_prompt,
)
from flowalign.worlds.shapes.reward_data import (
    CORRUPTIONS,
    ArtifactExamples,
    MatchExamples,
    artifact_examples,
    match_examples,
)
from rewards.artifact import ArtifactClassifier, ArtifactConfig, train_artifact_classifier
from rewards.geneval.scorer import COUNTING_THRESHOLD, RELATIONS, TASKS, THRESHOLD
from rewards.shapes.sprites import COLORS, SHAPES
from rewards.shapes_match import ShapesMatchConfig, ShapesMatchModel, save_match_model

__all__ = [
    "ArtifactTrainConfig",
    "EVAL_SEEDS",
    "MatchTrainConfig",
    "artifact_accuracy",
    "main",
    "match_accuracy",
    "match_vocabulary",
    "train_artifact",
    "train_match",
]

PROMPTS_DIR = Path(__file__).resolve().parents[3] / "assets" / "shapes" / "prompts"
EVAL_SEEDS: dict[str, int] = {"test": 1001, "test_perturbed": 1002, "train_prompts": 1003, "unseen": 1004}
"""Seeds of the held-out sets, fixed whatever the training seed, so runs are compared on the same data."""


# ------------------------------------------------------------------------------------------------ match


@dataclass(frozen=True)
class MatchTrainConfig:
    """Everything that determines a ``shapes_match`` training run (saved in the report).

    Attributes:
        steps, batch_size: optimizer steps and examples per step.
        lr, weight_decay, warmup_steps, grad_clip: AdamW, linear warmup then cosine decay to 0, clipping.
        label_smoothing: BCE targets ``label_smoothing / 2`` and ``1 - label_smoothing / 2``.
        cell_weight, grounding_weight: weights of the auxiliary losses (module docstring).
        n_train: size of the generated training pool (drawn once; ``steps * batch_size / n_train`` epochs).
        perturbed_fraction: share of imperfect training images.
        n_eval: size of each held-out set.
        seed: seeds the data, the initialization and the batch order.
        width, text_layers, rounds: model sizes (:class:`rewards.shapes_match.ShapesMatchConfig`).
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    label_smoothing: float = 0.05
    cell_weight: float = 1.0
    grounding_weight: float = 1.0
    n_train: int = 60_000
    perturbed_fraction: float = 0.3
    n_eval: int = 4000
    seed: int = 0
    width: int = 64
    text_layers: int = 2
    rounds: int = 2


def match_vocabulary() -> tuple[str, ...]:
    """Every word the shapes world's prompt builders can write, sorted."""
    prompts = [single_object_prompt(s) for s in SHAPES]
    prompts += [counting_prompt(s, n) for s in SHAPES for n in NUMBERS]
    prompts += [colors_prompt(s, c) for s in SHAPES for c in COLORS]
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                prompts.append(two_object_prompt(a, b))
                prompts += [position_prompt(a, r, b) for r in RELATIONS]
                prompts += [color_attr_prompt(a, c, b, c) for c in COLORS]
    return tuple(sorted({w for m in prompts for w in m["prompt"].split()}))


@dataclass
class _MatchTargets:
    """Auxiliary targets of :func:`train_match` for ``N`` examples on a ``G x G`` cell grid."""

    cell_shape: Tensor  # [N, G*G] int64, 0 = no object centre, 1 + SHAPES index
    cell_color: Tensor  # [N, G*G] int64, 0 = none, 1 + COLORS index
    cell_offset: Tensor  # [N, G*G, 2] centre offset from the cell centre in half-cells
    noun_position: Tensor  # [N, 2] token index of each include clause's noun
    noun_mask: Tensor  # [N, 2] 1 where the clause exists
    grounding: Tensor  # [N, 2, G*G] 1 on centre cells of objects the clause describes


def _match_targets(examples: MatchExamples, grid: int) -> _MatchTargets:
    n, cells = len(examples), grid * grid
    targets = _MatchTargets(
        torch.zeros(n, cells, dtype=torch.long),
        torch.zeros(n, cells, dtype=torch.long),
        torch.zeros(n, cells, 2),
        torch.zeros(n, 2, dtype=torch.long),
        torch.zeros(n, 2),
        torch.zeros(n, 2, cells),
    )
    colors = list(COLORS)
    for i, (metadata, detections) in enumerate(zip(examples.metadata, examples.detections, strict=True)):
        cutoff = COUNTING_THRESHOLD if metadata["tag"] == "counting" else THRESHOLD
        kept = []
        for det in detections:
            if det.confidence <= cutoff:
                continue
            x0, y0, x1, y1 = det.bbox
            cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            col, row = min(int(cx // 4), grid - 1), min(int(cy // 4), grid - 1)
            cell = row * grid + col
            kept.append((det, cell))
            targets.cell_shape[i, cell] = SHAPES.index(det.class_name) + 1
            targets.cell_color[i, cell] = colors.index(det.color) + 1
            targets.cell_offset[i, cell] = torch.tensor(
                [(cx - (4 * col + 1.5)) / 2, (cy - (4 * row + 1.5)) / 2]
            )
        words = metadata["prompt"].split()
        for slot, clause in enumerate(metadata["include"][:2]):
            nouns = (clause["class"], clause["class"] + "s")
            position = next(j for j, w in enumerate(words) if w in nouns)
            targets.noun_position[i, slot] = position + 1  # token 0 is <cls>
            targets.noun_mask[i, slot] = 1
            for det, cell in kept:
                if det.class_name == clause["class"] and clause.get("color") in (None, det.color):
                    targets.grounding[i, slot, cell] = 1
    return targets


def _trim(token_ids: Tensor) -> Tensor:
    """Drop the padding columns every prompt of the batch has (same logits, less compute)."""
    return token_ids[:, : int((token_ids != 0).sum(dim=1).max())]


def _logits(model: ShapesMatchModel, examples: MatchExamples, batch_size: int = 500) -> Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            images = examples.images[start : start + batch_size].float() / 255
            out.append(model(images, _trim(model.tokenize(examples.prompts[start : start + batch_size]))))
    return torch.cat(out)


def _rate(values: Sequence[float]) -> float:
    return round(float(np.mean(values)), 4) if len(values) else float("nan")


def match_accuracy(
    model: ShapesMatchModel, examples: MatchExamples, temperature: float = 1.0
) -> dict[str, Any]:
    """Agreement of ``score > 0.5`` with the labels (GenEval's verdicts): overall, per kind, per task;
    also the mean score of positives and negatives and agreement with Flow-GRPO's strict verdict."""
    scores = torch.sigmoid(_logits(model, examples) / temperature)
    correct = ((scores > 0.5).float() == examples.labels).float().tolist()
    per_kind: dict[str, list[float]] = defaultdict(list)
    per_task: dict[str, list[float]] = defaultdict(list)
    for kind, tag, ok in zip(examples.kinds, examples.tags, correct, strict=True):
        per_kind[kind].append(ok)
        per_task[tag].append(ok)
    labels = examples.labels.bool()
    return {
        "n": len(examples),
        "accuracy": _rate(correct),
        "per_kind": {k: _rate(v) for k, v in sorted(per_kind.items())},
        "per_kind_n": {k: len(v) for k, v in sorted(per_kind.items())},
        "per_task": {t: _rate(per_task[t]) for t in TASKS if t in per_task},
        "judge_correct_rate": _rate(examples.labels.tolist()),
        "agreement_with_strict": _rate(((scores > 0.5).float() == examples.strict_labels).float().tolist()),
        "mean_score_positive": _rate(scores[labels].tolist()),
        "mean_score_negative": _rate(scores[~labels].tolist()),
    }


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _match_loss(
    model: ShapesMatchModel,
    probe: nn.Linear,
    images: Tensor,
    token_ids: Tensor,
    labels: Tensor,
    targets: _MatchTargets,
    index: Tensor,
    config: MatchTrainConfig,
) -> tuple[Tensor, dict[str, float]]:
    out = model.run(images, token_ids)
    smooth = config.label_smoothing
    match = F.binary_cross_entropy_with_logits(out.logits, labels * (1 - smooth) + smooth / 2)
    probe_logits = probe(out.cells)
    shape_t, color_t = targets.cell_shape[index], targets.cell_color[index]
    has_object = (shape_t > 0).float()
    cells = (
        F.cross_entropy(probe_logits[..., : len(SHAPES) + 1].transpose(1, 2), shape_t)
        + F.cross_entropy(probe_logits[..., len(SHAPES) + 1 :].transpose(1, 2), color_t)
        + (((out.offsets - targets.cell_offset[index]) ** 2).sum(-1) * has_object).mean()
    )
    first = out.match_logits[0]  # [B, T, N]
    position = targets.noun_position[index]
    noun_maps = first.gather(1, position[..., None].expand(-1, -1, first.shape[-1]))  # [B, 2, N]
    mask = targets.noun_mask[index]
    per_noun = F.binary_cross_entropy_with_logits(noun_maps, targets.grounding[index], reduction="none").mean(
        -1
    )
    grounding = (per_noun * mask).sum() / mask.sum().clamp_min(1)
    loss = match + config.cell_weight * cells + config.grounding_weight * grounding
    accuracy = ((out.logits > 0).float() == labels).float().mean()
    return loss, {
        "match": match.item(),
        "cells": cells.item(),
        "grounding": grounding.item(),
        "acc": accuracy.item(),
    }


def train_match(
    config: MatchTrainConfig,
    out: str | Path | None = None,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``shapes_match`` (module docstring); write ``out`` and its ``.json`` report when given.

    Returns the report: config, data sizes, wall times, the held-out results of :func:`match_accuracy`,
    and ``info`` (the command and the machine, from :func:`main`).
    """
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    train_prompts = load_prompts(PROMPTS_DIR / "train.jsonl")
    test_prompts = load_prompts(PROMPTS_DIR / "test.jsonl")
    data = match_examples(
        train_prompts,
        config.n_train,
        rng,
        perturbed_fraction=config.perturbed_fraction,
        rephrase=True,
        progress=progress,
    )
    model_config = ShapesMatchConfig(
        vocabulary=match_vocabulary(),
        width=config.width,
        text_layers=config.text_layers,
        rounds=config.rounds,
    )
    model = ShapesMatchModel(model_config)
    probe = nn.Linear(config.width, len(SHAPES) + 1 + len(COLORS) + 1)
    targets = _match_targets(data, model_config.grid)
    token_ids = model.tokenize(data.prompts)
    data_seconds = time.perf_counter() - started

    params = [*model.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(data), generator=generator), 0
    model.train()
    history: list[dict[str, float]] = []
    steps = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="shapes_match", dynamic_ncols=True)
    for step in steps:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config.steps, config.warmup_steps)
        images = data.images[index].float() / 255
        loss, parts = _match_loss(
            model, probe, images, _trim(token_ids[index]), data.labels[index], targets, index, config
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        history.append(parts)
        if progress and step % 50 == 0:
            recent = history[-50:]
            steps.set_postfix({k: f"{np.mean([h[k] for h in recent]):.3f}" for k in ("match", "acc")})
    train_seconds = time.perf_counter() - started - data_seconds
    model.eval().requires_grad_(False)

    held_out = {
        "test": match_examples(test_prompts, config.n_eval, np.random.default_rng(EVAL_SEEDS["test"])),
        "test_perturbed": match_examples(
            test_prompts,
            config.n_eval,
            np.random.default_rng(EVAL_SEEDS["test_perturbed"]),
            perturbed_fraction=1.0,
        ),
        "train_prompts": match_examples(
            train_prompts, config.n_eval, np.random.default_rng(EVAL_SEEDS["train_prompts"])
        ),
        "unseen": match_examples(
            load_prompts(PROMPTS_DIR / "unseen.jsonl"),
            config.n_eval,
            np.random.default_rng(EVAL_SEEDS["unseen"]),
            unseen_pairs=(),
        ),
    }
    results = {name: match_accuracy(model, examples) for name, examples in held_out.items()}
    test_logits = _logits(model, held_out["test"])
    report = {
        "reward": "shapes_match",
        "config": asdict(config),
        "model": {**asdict(model_config), "parameters": sum(p.numel() for p in model.parameters())},
        "train_data": {
            "n": len(data),
            "positive_rate": _rate(data.labels.tolist()),
            "perturbed": int(data.perturbed.sum()),
            "kinds": {k: data.kinds.count(k) for k in sorted(set(data.kinds))},
        },
        "final_train": {k: _rate([h[k] for h in history[-200:]]) for k in history[-1]} if history else {},
        "held_out": results,
        "test_logit_quantiles": [
            round(float(q), 3) for q in test_logits.quantile(torch.tensor([0.01, 0.5, 0.99]))
        ],
        "eval_seeds": EVAL_SEEDS,
        "wall_seconds": {
            "data": round(data_seconds, 1),
            "train": round(train_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        **dict(info or {}),
    }
    if out is not None:
        _write(
            out, report, lambda path: save_match_model(model, path, {"report": json.dumps(_summary(report))})
        )
    return report


# --------------------------------------------------------------------------------------------- artifact


@dataclass(frozen=True)
class ArtifactTrainConfig:
    """Everything that determines an artifact-classifier run for the shapes world (saved in the report).

    Attributes:
        steps: full-batch Adam epochs of the head.
        lr, weight_decay: Adam on the head.
        n_train: generated training images (half clean); ``val_fraction`` of them validate.
        n_eval: held-out images (test-split prompts).
        seed: seeds the data and the classifier (random features and head).
        image_size, channels, hidden, statistics: :class:`rewards.artifact.ArtifactConfig`.
    """

    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    n_train: int = 30_000
    val_fraction: float = 0.2
    n_eval: int = 4000
    seed: int = 0
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    hidden: int = 32
    statistics: tuple[str, ...] = ("mean", "std", "max")


def artifact_accuracy(classifier: ArtifactClassifier, examples: ArtifactExamples) -> dict[str, Any]:
    """Accuracy of ``P(clean) > 0.5`` against the labels: overall and per corruption (and on clean images)."""
    with torch.no_grad():
        logits = torch.cat(
            [classifier(examples.images[s : s + 1000].float() / 255) for s in range(0, len(examples), 1000)]
        )
    correct = ((logits > 0).float() == examples.labels).float().tolist()
    per_kind: dict[str, list[float]] = defaultdict(list)
    for kind, ok in zip(examples.kinds, correct, strict=True):
        per_kind[kind].append(ok)
    scores = torch.sigmoid(logits)
    clean = examples.labels.bool()
    return {
        "n": len(examples),
        "accuracy": _rate(correct),
        "per_kind": {k: _rate(per_kind[k]) for k in ("clean", *CORRUPTIONS) if k in per_kind},
        "per_kind_n": {k: len(per_kind[k]) for k in ("clean", *CORRUPTIONS) if k in per_kind},
        "mean_score_clean": _rate(scores[clean].tolist()),
        "mean_score_corrupted": _rate(scores[~clean].tolist()),
    }


def train_artifact(
    config: ArtifactTrainConfig,
    out: str | Path | None = None,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the shapes world's artifact classifier (module docstring); write ``out`` and its report."""
    from rewards.artifact import save_classifier

    started = time.perf_counter()
    train_prompts = load_prompts(PROMPTS_DIR / "train.jsonl")
    data = artifact_examples(
        train_prompts, config.n_train, np.random.default_rng(config.seed), progress=progress
    )
    images = data.images.float() / 255
    data_seconds = time.perf_counter() - started
    classifier_config = ArtifactConfig(
        image_size=config.image_size,
        channels=tuple(config.channels),
        hidden=config.hidden,
        seed=config.seed,
        statistics=tuple(config.statistics),
    )
    classifier, train_report = train_artifact_classifier(
        images[data.labels == 1],
        images[data.labels == 0],
        None,
        classifier_config,
        epochs=config.steps,
        lr=config.lr,
        weight_decay=config.weight_decay,
        val_fraction=config.val_fraction,
    )
    train_seconds = time.perf_counter() - started - data_seconds
    held_out = artifact_examples(
        load_prompts(PROMPTS_DIR / "test.jsonl"), config.n_eval, np.random.default_rng(EVAL_SEEDS["test"])
    )
    report = {
        "reward": "artifact",
        "config": asdict(config),
        "classifier": asdict(classifier_config),
        "train_data": {"n": len(data), "kinds": {k: data.kinds.count(k) for k in ("clean", *CORRUPTIONS)}},
        "final_train": {
            "train_accuracy": round(train_report.train_accuracy, 4),
            "val_accuracy": None
            if train_report.val_accuracy is None
            else round(train_report.val_accuracy, 4),
            "loss": round(train_report.final_loss, 4),
        },
        "held_out": {"test": artifact_accuracy(classifier, held_out)},
        "eval_seeds": {"test": EVAL_SEEDS["test"]},
        "wall_seconds": {
            "data": round(data_seconds, 1),
            "train": round(train_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        **dict(info or {}),
    }
    if out is not None:
        _write(out, report, lambda path: save_classifier(classifier, path))
    return report


# ------------------------------------------------------------------------------------------------ files


def _summary(report: Mapping[str, Any]) -> dict[str, Any]:
    return {"held_out_accuracy": {k: v["accuracy"] for k, v in report["held_out"].items()}}


def _write(out: str | Path, report: dict[str, Any], save) -> None:
    """Write the weights (through ``save(path)``) and the JSON report, each to a temporary file first."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    tmp.replace(path)
    report_path = path.with_suffix(".json")
    tmp_report = report_path.with_name(report_path.name + ".tmp")
    tmp_report.write_text(json.dumps(report, indent=2) + "\n")
    tmp_report.replace(report_path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flowalign.worlds.shapes.train_rewards match|artifact --out FILE [--steps N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flowalign.worlds.shapes.train_rewards", description=__doc__.splitlines()[0]
    )
    parser.add_argument("reward", choices=("match", "artifact"), help="which reward to train")
    parser.add_argument(
        "--out", required=True, help="output .safetensors file (a .json report is written beside it)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (match) or epochs (artifact)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None, help="training pool size")
    parser.add_argument("--n-eval", type=int, default=None, help="size of each held-out set")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, see the docstring)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    if not str(args.out).endswith(".safetensors"):
        parser.error(f"--out must end with .safetensors, got {args.out!r}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    info = {
        "command": "python -m flowalign.worlds.shapes.train_rewards " + shlex.join(argv),
        "machine": {
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    overrides = {
        k: v
        for k, v in (("steps", args.steps), ("n_train", args.n_train), ("n_eval", args.n_eval))
        if v is not None
    }
    if args.reward == "match":
        report = train_match(
            MatchTrainConfig(seed=args.seed, **overrides), args.out, not args.no_progress, info
        )
    else:
        report = train_artifact(
            ArtifactTrainConfig(seed=args.seed, **overrides), args.out, not args.no_progress, info
        )
    print(json.dumps({"held_out": report["held_out"], "wall_seconds": report["wall_seconds"]}, indent=2))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
