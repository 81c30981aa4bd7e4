"""Paired comparison of two finished GenEval-style runs (``flowalign bench compare A_DIR B_DIR``).

Two runs pair image by image when they judged the same prompts, in the same order, with the same number
of images per prompt, the same noise seed and the same sampler settings: image ``j`` of prompt ``i`` then
starts from the same noise in both (:func:`flowalign.eval.geneval.image_seed`), and the difference between
the models is measured with the paired bootstrap and McNemar's test of
:func:`flowalign.eval.stats.paired_comparison`, which is far tighter than comparing two separate
intervals. A run is read back from the ``results.json`` that :func:`flowalign.eval.geneval.write_report`
writes (its per-image verdicts).

    a, b = load_run("bench/base"), load_run("bench/tuned")
    comparison = compare_runs(a, b)     # ValueError naming the first setting that differs
    comparison.overall.excludes_zero
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowalign.eval.stats import N_RESAMPLES, PairedComparison, Verdicts, benchmark_stats, paired_comparison

__all__ = [
    "SAMPLER_SETTINGS",
    "BenchmarkRun",
    "Protocol",
    "compare_runs",
    "comparison_markdown",
    "load_run",
    "write_comparison",
]

# The settings of the sampler alone: runs that differ only in them still share prompts and per-image noise.
SAMPLER_SETTINGS = ("steps", "guidance", "levels")


@dataclass(frozen=True)
class Protocol:
    """What two runs must share for their images to pair.

    Attributes:
        prompts: the prompt texts, in the order judged.
        images_per_prompt: images of each prompt.
        steps, guidance, resolution, seed: the sampler's settings and the base seed of the noise.
        levels: the steps' explicit noise levels (None: the scheduler's; runs written before they were
            recorded read as None).
        detector: the GenEval detector that judged the images (``shapes``, ``mask2former``, ``owlv2``).
    """

    prompts: tuple[str, ...]
    images_per_prompt: tuple[int, ...]
    steps: int
    guidance: float
    resolution: int
    seed: int
    detector: str = "shapes"
    levels: tuple[float, ...] | None = None

    def mismatch(self, other: Protocol, ignore: Collection[str] = ()) -> str | None:
        """The first setting that differs, as ``"guidance (1.0 vs 1.5)"``; None when the runs pair.
        ``ignore``: settings allowed to differ (:data:`SAMPLER_SETTINGS` for a student against its teacher)."""
        if self.prompts != other.prompts:
            first = next(
                (i for i, (x, y) in enumerate(zip(self.prompts, other.prompts)) if x != y),
                min(len(self.prompts), len(other.prompts)),
            )
            return (
                f"prompts ({len(self.prompts)} vs {len(other.prompts)} prompts, first difference at prompt "
                f"{first})"
            )
        if self.images_per_prompt != other.images_per_prompt:
            first = next(
                i for i, (x, y) in enumerate(zip(self.images_per_prompt, other.images_per_prompt)) if x != y
            )
            return (
                f"images per prompt (prompt {first}: {self.images_per_prompt[first]} vs "
                f"{other.images_per_prompt[first]} images)"
            )
        for name in ("steps", "levels", "guidance", "resolution", "seed", "detector"):
            if name not in ignore and getattr(self, name) != getattr(other, name):
                return f"{name} ({getattr(self, name)} vs {getattr(other, name)})"
        return None


@dataclass(frozen=True)
class BenchmarkRun:
    """A finished run read back by :func:`load_run`.

    Attributes:
        path: its directory; model: the model description it recorded; command: the command that made it.
        protocol: its prompts, image counts and settings; verdicts: its per-image verdicts.
        overall, task_accuracy: its GenEval summary.
    """

    path: Path
    model: dict[str, Any]
    command: str | None
    protocol: Protocol
    verdicts: Verdicts
    overall: float
    task_accuracy: dict[str, float]


def load_run(directory: str | Path) -> BenchmarkRun:
    """Read ``directory/results.json`` of a ``flowalign bench geneval`` run (or of any
    :func:`~flowalign.eval.geneval.write_report`). Raises ``ValueError`` naming the path when it is missing
    or holds no per-image verdicts."""
    path = Path(directory)
    results = path / "results.json"
    if not results.is_file():
        raise ValueError(f"{str(path)!r} holds no results.json; pass the --out directory of a benchmark run.")
    payload = json.loads(results.read_text())
    images = payload.get("images")
    if not images:
        raise ValueError(
            f"{results} has no per-image verdicts ('images'); rerun the benchmark to write them."
        )
    images = sorted(images, key=lambda r: (r["prompt_index"], r["image_index"]))
    counts = Counter(r["prompt_index"] for r in images)
    prompts = {r["prompt_index"]: r["prompt"] for r in images}
    config = payload["config"]
    protocol = Protocol(
        prompts=tuple(prompts[i] for i in sorted(prompts)),
        images_per_prompt=tuple(counts[i] for i in sorted(counts)),
        steps=config["steps"],
        guidance=float(config["guidance"]),
        resolution=config["resolution"],
        seed=config["seed"],
        detector=(payload.get("model") or {}).get("detector", "shapes"),
        levels=tuple(config["levels"]) if config.get("levels") is not None else None,
    )
    verdicts = Verdicts.from_images(
        [r["prompt_index"] for r in images], [r["tag"] for r in images], [r["correct"] for r in images]
    )
    summary = payload["summary"]
    return BenchmarkRun(
        path=path,
        model=payload.get("model") or {},
        command=payload.get("command"),
        protocol=protocol,
        verdicts=verdicts,
        overall=summary["overall"],
        task_accuracy=summary["task_accuracy"],
    )


def compare_runs(
    a: BenchmarkRun,
    b: BenchmarkRun,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    ignore: Collection[str] = (),
) -> PairedComparison:
    """``b - a`` with paired intervals (:func:`~flowalign.eval.stats.paired_comparison`). Raises
    ``ValueError`` (one line, naming the first setting that differs) when the runs do not pair. ``ignore``:
    settings allowed to differ; :data:`SAMPLER_SETTINGS` pairs a few-step student with its teacher, whose
    images still share prompts and per-image initial noise."""
    different = a.protocol.mismatch(b.protocol, ignore)
    if different is not None:
        raise ValueError(
            f"cannot pair {str(a.path)!r} and {str(b.path)!r}: they differ in {different}; a paired comparison "
            "needs the same prompts, images per prompt, seed, steps, guidance and resolution (rerun one with "
            "the other's command, in its results.json)."
        )
    return paired_comparison(a.verdicts, b.verdicts, n_resamples=n_resamples, seed=seed)


def comparison_markdown(a: BenchmarkRun, b: BenchmarkRun, comparison: PairedComparison) -> str:
    """A markdown table: per task and overall, both accuracies, ``B - A`` with its interval, whether the
    interval excludes zero, the discordant images and McNemar's p."""
    p = a.protocol
    level = f"{comparison.confidence:.0%}"
    stats = {"a": benchmark_stats(a.verdicts), "b": benchmark_stats(b.verdicts)}

    def accuracy(run: str, tag: str | None = None) -> str:
        i = stats[run].overall if tag is None else stats[run].tasks[tag].accuracy
        return f"{i.estimate:.3f} [{i.low:.2f}, {i.high:.2f}]"

    lines = [
        f"A: `{a.path}` ({_describe(a)})",
        f"B: `{b.path}` ({_describe(b)})",
        "",
        f"{len(p.prompts)} prompts, {sum(p.images_per_prompt)} paired images (same noise); {p.steps} steps, "
        f"guidance {p.guidance}, seed {p.seed}.",
        "",
        f"| task | A | B | B - A | {level} interval | excludes 0 | A only / B only | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag, task in comparison.tasks.items():
        d = task.difference
        lines.append(
            f"| {tag} | {accuracy('a', tag)} | {accuracy('b', tag)} | {d.estimate:+.3f} | "
            f"[{d.low:+.3f}, {d.high:+.3f}] | {_yes(d.excludes_zero)} | {task.a_only} / {task.b_only} | "
            f"{task.mcnemar_p:.3g} |"
        )
    o, i = comparison.overall, comparison.image_accuracy
    lines += [
        f"| **overall** | {accuracy('a')} | {accuracy('b')} | **{o.estimate:+.3f}** | [{o.low:+.3f}, {o.high:+.3f}] "
        f"| **{_yes(o.excludes_zero)}** | | |",
        f"| % images | | | {i.estimate:+.3f} | [{i.low:+.3f}, {i.high:+.3f}] | {_yes(i.excludes_zero)} | | |",
        "",
        f"Intervals: {comparison.method}; A and B: {stats['a'].method}.",
    ]
    return "\n".join(lines) + "\n"


def write_comparison(
    a: BenchmarkRun, b: BenchmarkRun, comparison: PairedComparison, out_dir: str | Path
) -> dict[str, Path]:
    """Write ``comparison.json`` and ``comparison.md`` to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "a": {"path": str(a.path), "model": a.model, "command": a.command, "overall": a.overall},
        "b": {"path": str(b.path), "model": b.model, "command": b.command, "overall": b.overall},
        "difference": "b - a",
        **comparison.as_json(),
    }
    paths = {"json": out / "comparison.json", "markdown": out / "comparison.md"}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    paths["markdown"].write_text(comparison_markdown(a, b, comparison))
    return paths


def _describe(run: BenchmarkRun) -> str:
    model = run.model.get("model", "?")
    lora = run.model.get("lora")
    return f"model {model}" + (f", LoRA {lora}" if lora else "")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
