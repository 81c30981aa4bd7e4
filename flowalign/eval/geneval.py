"""GenEval-style benchmark runner: sample N images per prompt, detect objects, judge with GenEval's rules.

The protocol of GenEval (Ghosh et al. 2023; repository djghosh13/geneval: ``generation/diffusers_generate.py``
samples 4 images per prompt, ``evaluation/evaluate_images.py`` judges them, ``evaluation/summary_scores.py``
aggregates): for every prompt of a GenEval metadata file, ``images_per_prompt`` images are drawn with the
deterministic ODE sampler (:func:`flowalign.samplers.rollout` with :meth:`SamplingPlan.ode`), a detector
turns each image into :class:`~rewards.geneval.Detection` lists, :func:`rewards.geneval.evaluate` judges
each image and :func:`rewards.geneval.summarize` aggregates (per-task accuracy, overall = mean of the
tasks, % correct images, % correct prompts).

**Uncertainty.** Every report states each task's accuracy with its 95% Wilson interval and the overall
and % correct images with a stratified-bootstrap interval (:mod:`flowalign.eval.stats`). GenEval draws 4
images per prompt, which leaves a task with 2 prompts measured on 8 images; ``images_per_prompt`` may
therefore be one count per prompt, and :func:`balanced_images_per_prompt` gives every task at least
``min_images_per_task`` images (96 by default: the Wilson half-width at 96 images is at most 0.10).

**Determinism.** Image ``j`` of prompt ``i`` starts from noise drawn by its own generator seeded with
``seed * 1_000_003 + i * 1_009 + j`` (:func:`image_seed`), so an image does not depend on the batch
size, on the other prompts in the file or on the order of evaluation, and more images per prompt extend
the same set (the first ``n`` images of a prompt are the same at any count >= ``n``). (A different batch
size can still change results at float-rounding level, because the network's kernels block differently.)

**Detector.** Any callable ``images [B, 3, H, W] in [0, 1] -> list of B detection lists`` (see
:class:`Detector`); the default is the shapes world's exact detector. A real-image detector (Mask2Former or
OWLv2 plus a colour classifier, as GenEval uses) plugs in the same way.

Python API::

    prompts = load_prompts("assets/shapes/prompts/test.jsonl")
    counts = balanced_images_per_prompt([p["tag"] for p in prompts])  # >= 4 per prompt, >= 96 per task
    report = run_geneval(model, prompts, images_per_prompt=counts)
    report.summary.overall, report.stats.overall.low, report.stats.overall.high
    write_report(report, "out/")     # results.json, summary.md, grids/<task>.png
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from flowalign.eval.stats import BenchmarkStats, Interval, Verdicts, benchmark_stats
from rewards.geneval import Detection, GenEvalResult, GenEvalSummary, evaluate, format_summary, summarize
from rewards.geneval.scorer import TASKS, MetadataError, validate_metadata
from rewards.shapes import ShapesDetector

__all__ = [
    "Detector",
    "GenEvalConfig",
    "GenEvalReport",
    "ImageRecord",
    "ShapesDetector",
    "balanced_images_per_prompt",
    "balanced_subset",
    "check_prompts",
    "image_seed",
    "judge_images",
    "load_geneval_prompts",
    "merge_reports",
    "run_geneval",
    "stats_text",
    "summary_markdown",
    "verdicts_of",
    "write_report",
]


class Detector(Protocol):
    """A detector for the benchmark.

    ``__call__(images)`` takes ``[B, 3, H, W]`` float images in ``[0, 1]`` and returns ``B`` lists of
    detections (with ``color`` filled in when prompts ask for colours). ``classes`` and ``colors`` are the
    labels it can produce (None: unrestricted); prompts naming anything else are rejected before sampling.
    """

    classes: Sequence[str] | None
    colors: Sequence[str] | None

    def __call__(self, images: Tensor) -> list[list[Detection]]: ...


@dataclass(frozen=True)
class GenEvalConfig:
    """The settings of one benchmark run (recorded in ``results.json``).

    Attributes:
        images_per_prompt: images sampled for each prompt, one count per prompt (GenEval: 4 for all).
        steps: ODE sampling steps; guidance: classifier-free guidance scale; resolution: image side.
        levels: explicit noise levels of the steps (flow sigmas / diffusion timesteps), None: the scheduler's.
        seed: base seed of the per-image noise (:func:`image_seed`).
        batch_size: images per sampler call (CFG doubles the network batch).
    """

    images_per_prompt: tuple[int, ...] = ()
    steps: int = 20
    levels: tuple[float, ...] | None = None
    guidance: float = 1.0
    resolution: int = 32
    seed: int = 0
    batch_size: int = 32


@dataclass(frozen=True)
class ImageRecord:
    """The verdict on one image: ``prompt_index``/``image_index`` locate it, ``result`` is GenEval's verdict,
    ``detections`` what the detector saw."""

    prompt_index: int
    image_index: int
    result: GenEvalResult
    detections: list[Detection]

    def as_json(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "image_index": self.image_index,
            "tag": self.result.tag,
            "prompt": self.result.prompt,
            "correct": self.result.correct,
            "strict_correct": self.result.strict_correct,
            "score": self.result.score,
            "reason": self.result.reason,
            "detections": [
                {
                    "class": d.class_name,
                    "color": d.color,
                    "bbox": [float(v) for v in d.bbox],
                    "confidence": round(float(d.confidence), 6),
                }
                for d in self.detections
            ],
        }


@dataclass
class GenEvalReport:
    """What :func:`run_geneval` returns.

    Attributes:
        summary: GenEval's aggregate (per-task accuracy, overall, % correct images/prompts).
        stats: the same accuracies with 95% intervals (:func:`flowalign.eval.stats.benchmark_stats`).
        records: one per image, prompt-major (prompt 0's images, then prompt 1's, ...).
        prompts: the ``P`` prompt metadata dicts judged.
        config: the run's settings.
        images: ``[len(records), 3, H, W]`` float32 in ``[0, 1]`` in the order of ``records`` (None when
            not kept).
        wall_time_s: seconds spent sampling, detecting and judging.
        model: a description of the model (path, LoRA), for the report.
    """

    summary: GenEvalSummary
    stats: BenchmarkStats
    records: list[ImageRecord]
    prompts: list[dict[str, Any]]
    config: GenEvalConfig
    images: Tensor | None = None
    wall_time_s: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        records: list[ImageRecord],
        prompts: list[dict[str, Any]],
        config: GenEvalConfig,
        *,
        images: Tensor | None = None,
        wall_time_s: float = 0.0,
        model: dict[str, Any] | None = None,
    ) -> GenEvalReport:
        """The report of ``records``: GenEval's summary and the intervals computed from them."""
        return cls(
            summary=summarize([r.result for r in records]), stats=benchmark_stats(verdicts_of(records)),
            records=records, prompts=prompts, config=config, images=images, wall_time_s=wall_time_s,
            model=dict(model or {}),
        )  # fmt: skip

    @property
    def results(self) -> list[GenEvalResult]:
        return [r.result for r in self.records]

    @property
    def verdicts(self) -> Verdicts:
        """The per-image verdicts, for :mod:`flowalign.eval.stats`."""
        return verdicts_of(self.records)


def verdicts_of(records: Sequence[ImageRecord]) -> Verdicts:
    """:class:`~flowalign.eval.stats.Verdicts` of prompt-major image records."""
    return Verdicts.from_images(
        [r.prompt_index for r in records],
        [r.result.tag for r in records],
        [r.result.correct for r in records],
    )


def load_geneval_prompts(path: str | Path, detector: Any = None) -> list[dict[str, Any]]:
    """Read a GenEval metadata jsonl and check every line against GenEval's schema and the vocabulary of
    ``detector`` (its ``classes`` / ``colors``; default the shapes detector): a prompt naming a class the
    detector cannot see is an error naming the file and line, not a failed image."""
    detector = detector if detector is not None else ShapesDetector()
    classes, colors = getattr(detector, "classes", None), getattr(detector, "colors", None)
    prompts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                metadata = json.loads(line)
                validate_metadata(metadata, classes=classes, colors=colors)
            except (json.JSONDecodeError, MetadataError) as err:
                hint = (
                    " (the shapes detector knows only the shapes world; pick a real-image detector with "
                    "--detector / eval.detector)"
                    if isinstance(detector, ShapesDetector)
                    else ""
                )
                raise ValueError(
                    f"{path}:{line_no}: not a GenEval prompt for this detector: {err}{hint}"
                ) from None
            prompts.append(metadata)
    if not prompts:
        raise ValueError(
            f"prompt file {str(path)!r} holds no prompts; write one GenEval metadata object per line."
        )
    return prompts


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` (see the module docstring)."""
    return seed * 1_000_003 + prompt_index * 1_009 + image_index


def balanced_images_per_prompt(
    tags: Sequence[str], *, images_per_prompt: int = 4, min_images_per_task: int = 96
) -> list[int]:
    """Images per prompt so that every task is measured on at least ``min_images_per_task`` images: for a
    prompt of a task with ``P`` prompts, ``max(images_per_prompt, ceil(min_images_per_task / P))``.
    ``min_images_per_task=0`` gives GenEval's uniform protocol. On the shapes test split (2 single_object,
    3 two_object, 6 counting, 12 colors, 12 position, 93 color_attr prompts) the defaults give 48, 32, 16,
    8, 8 and 4 images per prompt. Raises ``ValueError`` naming a negative or non-integer argument."""
    _require_int("images_per_prompt", images_per_prompt)
    _require_int("min_images_per_task", min_images_per_task, least=0)
    prompts_of = Counter(tags)
    return [max(images_per_prompt, math.ceil(min_images_per_task / prompts_of[tag])) for tag in tags]


def balanced_subset(
    tags: Sequence[str], images_per_task: int, *, images_per_prompt: int = 1
) -> list[tuple[int, int]]:
    """A subset of prompts on which every task is measured on exactly ``images_per_task`` images (the
    training-time evaluation, ``eval.images_per_task``): per task, ``m = min(P, max(1, images_per_task //
    images_per_prompt))`` of its ``P`` prompts, spread evenly over their order in the file (the ``k``-th
    chosen is prompt ``k * P // m`` of the task), share the images as evenly as possible (the earlier ones
    get one more). Returns ``(index into tags, images)`` pairs in file order. On the shapes test split,
    ``images_per_task=16, images_per_prompt=2`` gives single_object 2 prompts x 8, two_object 3 x 5-6,
    counting 6 x 2-3 and 8 x 2 for the others: 96 images."""
    _require_int("images_per_task", images_per_task)
    _require_int("images_per_prompt", images_per_prompt)
    by_task: dict[str, list[int]] = {}
    for index, tag in enumerate(tags):
        by_task.setdefault(tag, []).append(index)
    chosen: list[tuple[int, int]] = []
    for indices in by_task.values():
        m = min(len(indices), max(1, images_per_task // images_per_prompt))
        base, extra = divmod(images_per_task, m)
        chosen += [(indices[k * len(indices) // m], base + (k < extra)) for k in range(m)]
    return sorted(chosen)


def run_geneval(
    model: Any,
    prompts: Sequence[Mapping[str, Any]],
    *,
    images_per_prompt: int | Sequence[int] = 4,
    steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    levels: Sequence[float] | None = None,
    detector: Detector | Callable[[Tensor], list[list[Detection]]] | None = None,
    keep_images: bool = True,
    progress: bool = True,
    jobs: Sequence[tuple[int, int]] | None = None,
) -> GenEvalReport:
    """Benchmark ``model`` (a :class:`~flowalign.models.ModelAdapter`) on GenEval metadata ``prompts``.

    ``images_per_prompt`` is one count for every prompt or one count per prompt (e.g.
    :func:`balanced_images_per_prompt`); ``records`` are prompt-major either way. ``jobs``: only these
    ``(prompt index, image index)`` images (a process's share; :func:`merge_reports` joins the shares). ``steps``/``guidance``/
    ``resolution`` default to the model's own defaults; ``levels``: the steps' explicit noise levels (flow
    sigmas / diffusion timesteps, as :func:`~flowalign.samplers.generate` takes them). Raises ``ValueError`` naming the bad argument or
    prompt (with its index) before any sampling.
    """
    from tqdm.auto import tqdm

    from flowalign.samplers import generate, seeded_generators

    detector = detector if detector is not None else ShapesDetector()
    prompts = check_prompts(prompts, detector)
    config = GenEvalConfig(
        images_per_prompt=_counts_per_prompt(images_per_prompt, len(prompts)),
        steps=steps if steps is not None else len(levels) if levels is not None else model.default_steps,
        levels=tuple(levels) if levels is not None else None,
        guidance=float(guidance if guidance is not None else model.default_guidance),
        resolution=resolution if resolution is not None else model.default_resolution,
        seed=seed,
        batch_size=batch_size,
    )
    _check_config(config)

    if jobs is None:
        jobs = [(i, j) for i, n in enumerate(config.images_per_prompt) for j in range(n)]
    else:  # a share of the benchmark (one process's): its images, with the seeds they have in the whole
        jobs = [(int(i), int(j)) for i, j in jobs]
        if any(not 0 <= i < len(prompts) or not 0 <= j < config.images_per_prompt[i] for i, j in jobs):
            raise ValueError("jobs name an image outside the prompts and images_per_prompt given.")
    records: list[ImageRecord] = []
    kept: list[Tensor] = []
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="geneval", unit="img", disable=not progress)
    for begin in range(0, len(jobs), batch_size):
        batch = jobs[begin : begin + batch_size]
        texts = [prompts[i]["prompt"] for i, _ in batch]
        generators = seeded_generators([image_seed(seed, i, j) for i, j in batch], model.device)
        with torch.no_grad():
            images = generate(
                model,
                texts,
                generators,
                steps=config.steps,
                guidance=config.guidance,
                resolution=config.resolution,
                levels=config.levels,
            ).images.float()
        detections = detector(images.cpu())
        for (i, j), dets in zip(batch, detections, strict=True):
            records.append(ImageRecord(i, j, evaluate(dets, prompts[i]), list(dets)))
        if keep_images:
            kept.append(images.cpu())
        bar.update(len(batch))
        bar.set_postfix(correct=f"{sum(r.result.correct for r in records) / len(records):.2f}")
    bar.close()
    images = torch.cat(kept) if keep_images else None
    return GenEvalReport.of(records, prompts, config, images=images, wall_time_s=time.perf_counter() - start)


def judge_images(
    images: Tensor,
    prompts: Sequence[Mapping[str, Any]],
    config: GenEvalConfig,
    detector: Detector | Callable[[Tensor], list[list[Detection]]] | None = None,
    batch_size: int = 256,
) -> GenEvalReport:
    """Judge already generated ``images`` (prompt-major, ``config.images_per_prompt`` per prompt, as
    :func:`run_geneval` orders them): re-judge a saved benchmark with another detector or judge version."""
    detector = detector if detector is not None else ShapesDetector()
    if len(prompts) != len(config.images_per_prompt):
        raise ValueError(
            f"judge_images: {len(prompts)} prompts but config.images_per_prompt has {len(config.images_per_prompt)} counts."
        )
    prompts = check_prompts(prompts, detector)
    jobs = [(i, j) for i, n in enumerate(config.images_per_prompt) for j in range(n)]
    if len(jobs) != len(images):
        raise ValueError(f"judge_images: {len(images)} images for {len(jobs)} benchmark images.")
    detections: list[list[Detection]] = []
    for begin in range(0, len(images), batch_size):
        detections += detector(images[begin : begin + batch_size])
    records = [
        ImageRecord(i, j, evaluate(d, prompts[i]), list(d))
        for (i, j), d in zip(jobs, detections, strict=True)
    ]
    return GenEvalReport.of(records, prompts, config, images=images)


def merge_reports(parts: Sequence[GenEvalReport]) -> GenEvalReport:
    """One report from the reports of disjoint shares of one benchmark (:func:`run_geneval` with ``jobs``):
    records prompt-major, summary and intervals over all of them, images joined when every share kept
    its own (else None), wall time the longest share's."""
    first = parts[0]
    indexed = sorted(
        (
            (r.prompt_index, r.image_index, n, k)
            for n, part in enumerate(parts)
            for k, r in enumerate(part.records)
        )
    )
    records = [parts[n].records[k] for _, _, n, k in indexed]
    images = None
    if all(part.images is not None for part in parts):
        images = torch.stack([parts[n].images[k] for _, _, n, k in indexed]) if records else None
    return GenEvalReport.of(
        records, first.prompts, first.config, images=images,
        wall_time_s=max(part.wall_time_s for part in parts), model=first.model,
    )  # fmt: skip


def _counts_per_prompt(images_per_prompt: int | Sequence[int], n_prompts: int) -> tuple[int, ...]:
    """One count per prompt from an integer or a sequence; ``ValueError`` names a bad count."""
    per_prompt = isinstance(images_per_prompt, Sequence)
    counts = tuple(images_per_prompt) if per_prompt else (images_per_prompt,) * n_prompts
    if len(counts) != n_prompts:
        raise ValueError(
            f"images_per_prompt has {len(counts)} counts for {n_prompts} prompts; pass one count per prompt "
            "(e.g. balanced_images_per_prompt(tags)) or a single integer."
        )
    for index, value in enumerate(counts):
        _require_int("images_per_prompt", value, where=f" for prompt {index}" if per_prompt else "")
    return counts


def _require_int(name: str, value: Any, least: int = 1, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name} must be {kind}, got {value!r}{where}.")


def _check_config(config: GenEvalConfig) -> None:
    for name in ("steps", "batch_size", "resolution"):
        _require_int(name, getattr(config, name))
    if not math.isfinite(config.guidance) or config.guidance < 1:
        raise ValueError(f"guidance must be a finite number >= 1 (1: no guidance), got {config.guidance!r}.")


def check_prompts(prompts: Sequence[Mapping[str, Any]], detector: Any) -> list[dict[str, Any]]:
    """Copies of ``prompts`` after checking each against GenEval's schema and ``detector``'s vocabulary
    (``classes`` / ``colors``); ``ValueError`` names the first bad prompt by index."""
    if isinstance(prompts, (str, Path)) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a list of GenEval metadata dicts, got {type(prompts).__name__}; read a jsonl "
            "file with flowalign.worlds.shapes.load_prompts(path)."
        )
    if not prompts:
        raise ValueError("prompts is empty: the benchmark needs at least one GenEval metadata dict.")
    classes, colors = getattr(detector, "classes", None), getattr(detector, "colors", None)
    checked = []
    for index, metadata in enumerate(prompts):
        try:
            validate_metadata(metadata, classes=classes, colors=colors)
        except MetadataError as err:
            raise ValueError(
                f"prompt {index} is not a GenEval prompt this detector can judge: {err}"
            ) from None
        if not isinstance(metadata.get("prompt"), str) or not metadata["prompt"]:
            raise ValueError(f"prompt {index} has no 'prompt' text: {dict(metadata)}.")
        checked.append(dict(metadata))
    return checked


# --- writing ------------------------------------------------------------------------------------------


def write_report(
    report: GenEvalReport,
    out_dir: str | Path,
    *,
    command: str | None = None,
    extra: Mapping[str, Any] | None = None,
    max_grid_prompts: int = 128,
    max_grid_columns: int = 16,
) -> dict[str, Path]:
    """Write ``results.json`` (config, command, summary, ``stats``: the accuracies with their intervals and
    per-task counts, per-image verdicts), ``summary.md`` (a markdown table) and, when the report kept its
    images, ``grids/<task>.png`` (one row per prompt, green border = correct, red = wrong; at most
    ``max_grid_prompts`` rows per task and ``max_grid_columns`` images per row). Returns the paths
    written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory; pass a directory path.")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    payload = {
        "benchmark": "geneval",
        "command": command,
        "model": report.model,
        "config": asdict(report.config),
        "n_prompts": len(report.prompts),
        "n_images": len(report.records),
        "wall_time_s": round(report.wall_time_s, 2),
        "summary": asdict(report.summary),
        "stats": report.stats.as_json(),
        "images": [r.as_json() for r in report.records],
        **(dict(extra) if extra else {}),
    }
    paths["results"] = _atomic_write(out / "results.json", json.dumps(payload, indent=1) + "\n")
    paths["summary"] = _atomic_write(out / "summary.md", summary_markdown(report, command))
    if report.images is not None:
        grids = out / "grids"
        grids.mkdir(exist_ok=True)
        for tag in report.summary.task_accuracy:
            paths[f"grid_{tag}"] = _write_grid(
                report, tag, grids / f"{tag}.png", max_grid_prompts, max_grid_columns
            )
    return paths


def summary_markdown(report: GenEvalReport, command: str | None = None) -> str:
    """The summary as a markdown table (tasks in GenEval's order): per task its prompts, images per prompt,
    images, accuracy and 95% interval; the overall with its interval; the interval method and the run's
    settings."""
    s, c, st = report.summary, report.config, report.stats
    lines = ["# GenEval-style benchmark", ""]
    if report.model:
        lines += [f"Model: `{json.dumps(report.model)}`", ""]
    lines += [
        f"{s.n_prompts} prompts, {s.n_images} images; {c.steps} Euler steps, guidance {c.guidance}, "
        f"seed {c.seed}, {c.resolution}x{c.resolution}; {report.wall_time_s:.1f} s.",
        "",
        "| task | prompts | images / prompt | images | correct | accuracy | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag, cells in _task_rows(st):
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    lines += [
        f"| **overall** (mean of tasks) | {s.n_prompts} | | {s.n_images} | | **{st.overall.estimate:.3f}** | "
        f"{_bounds(st.overall)} |",
        "",
        f"Intervals: {st.method}.",
        "",
        f"- % correct images: {s.image_accuracy:.1%} (95% interval {_bounds(st.image_accuracy, '.1%')})",
        f"- % correct prompts (at least one correct image): {s.prompt_accuracy:.1%}",
        f"- mean partial-credit score: {s.mean_score:.3f}",
    ]
    if command:
        lines += ["", "Command:", "", "```", command, "```"]
    lines += ["", "```", format_summary(s), "```", ""]
    return "\n".join(lines)


def stats_text(stats: BenchmarkStats) -> str:
    """The accuracies with their intervals as a plain-text table (what ``flowalign bench`` prints)."""
    header = ("prompts", "img/prompt", "images", "correct", "accuracy", "95% interval")
    lines = [f"{'task':<24}" + "".join(f"{h:>12}" for h in header[:-1]) + f"  {header[-1]}"]
    for tag, cells in _task_rows(stats):
        lines.append(f"{tag:<24}" + "".join(f"{c:>12}" for c in cells[:-1]) + f"  {cells[-1]}")
    images = sum(task.images for task in stats.tasks.values())
    prompts = sum(task.prompts for task in stats.tasks.values())
    o, i = stats.overall, stats.image_accuracy
    lines += [
        f"{'overall (mean of tasks)':<24}{prompts:>12}{'':>12}{images:>12}{'':>12}{o.estimate:>12.3f}  {_bounds(o)}",
        f"{'% correct images':<24}{'':>36}{round(i.estimate * images):>12}{i.estimate:>12.3f}  {_bounds(i)}",
        f"({stats.method})",
    ]
    return "\n".join(lines)


def _task_rows(stats: BenchmarkStats) -> list[tuple[str, tuple[str, ...]]]:
    """Per task in GenEval's order: prompts, images per prompt, images, correct, accuracy, interval."""
    rows = []
    for tag in sorted(stats.tasks, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS)):
        t = stats.tasks[tag]
        fewest, most = t.images_per_prompt
        per_prompt = str(fewest) if fewest == most else f"{fewest}-{most}"
        cells = (str(t.prompts), per_prompt, str(t.images), str(t.correct), f"{t.accuracy.estimate:.3f}")
        rows.append((tag, (*cells, _bounds(t.accuracy))))
    return rows


def _bounds(interval: Interval, spec: str = ".3f") -> str:
    return f"[{interval.low:{spec}}, {interval.high:{spec}}]"


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _write_grid(report: GenEvalReport, tag: str, path: Path, max_prompts: int, max_columns: int) -> Path:
    """One row per prompt of ``tag``: its first ``max_columns`` images with a 2-px green (correct) or red
    (wrong) border, then how many of all its images are correct and the prompt text."""
    from PIL import Image, ImageDraw

    by_prompt: dict[int, list[int]] = {}
    for k, record in enumerate(report.records):
        if record.result.tag == tag:
            by_prompt.setdefault(record.prompt_index, []).append(k)
    rows = list(by_prompt.items())[:max_prompts]
    n = min(max_columns, max(len(indices) for _, indices in rows))
    side = report.images.shape[-1]
    cell, text_width = side + 6, 8 * max(len(report.prompts[i]["prompt"]) for i, _ in rows) + 12
    canvas = Image.new("RGB", (n * cell + text_width, len(rows) * cell), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for r, (prompt_index, indices) in enumerate(rows):
        for c, k in enumerate(indices[:n]):
            ok = report.records[k].result.correct
            border = (0, 200, 0) if ok else (220, 0, 0)
            x0, y0 = c * cell + 1, r * cell + 1
            draw.rectangle([x0, y0, x0 + side + 3, y0 + side + 3], fill=border)
            pixels = (report.images[k].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels), (x0 + 2, y0 + 2))
        n_ok = sum(report.records[k].result.correct for k in indices)
        draw.text(
            (n * cell + 6, r * cell + cell // 2 - 6),
            f"{n_ok}/{len(indices)}  {report.prompts[prompt_index]['prompt']}",
            fill=(230, 230, 230),
        )
    tmp = path.with_name(path.name + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path
