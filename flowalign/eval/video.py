"""The moving-shapes video benchmark: generate each prompt record's videos from its first frame and judge them.

:func:`run_video_bench` samples ``videos_per_prompt`` videos per record (seeds keyed by ``(seed, prompt,
video)`` as the GenEval benchmark's, so a video never depends on the batch it was drawn in) with the ODE,
judges each with :func:`flowalign.worlds.moving_shapes.judge_video`, and reports three accuracies --
*identity*, *motion* and *correct* (both) -- per task (``move``, ``move_stay``) with Wilson 95% intervals
and overall (the unweighted mean of the tasks, as GenEval's overall) with a stratified bootstrap interval
(:func:`flowalign.eval.stats.benchmark_stats`). :meth:`VideoReport.save` writes ``results.json`` (every
video's verdict and reason), ``summary.md`` and ``grids/<task>.png``: each video's frame strip, framed green
when correct and red when not.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.eval.stats import BenchmarkStats, Verdicts, benchmark_stats

__all__ = ["METRICS", "VideoReport", "run_video_bench"]

METRICS = ("correct", "identity", "motion")


@dataclass
class VideoReport:
    """Per-video verdicts and the accuracies of one run (see the module docstring)."""

    records: list[dict[str, Any]]
    videos: list[dict[str, Any]]
    stats: dict[str, BenchmarkStats]
    settings: dict[str, Any]
    strips: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "stats": {k: v.as_json() for k, v in self.stats.items()},
            "videos": self.videos,
        }

    def markdown(self) -> str:
        lines = [
            "| metric | overall [95% CI] | " + " | ".join(self.stats["correct"].tasks) + " |",
            "|---|---|" + "---|" * len(self.stats["correct"].tasks),
        ]
        for metric in METRICS:
            s = self.stats[metric]
            tasks = " | ".join(
                f"{t.accuracy.estimate:.3f} [{t.accuracy.low:.3f}, {t.accuracy.high:.3f}] ({t.correct}/{t.images})"
                for t in s.tasks.values()
            )
            lines.append(
                f"| {metric} | **{s.overall.estimate:.3f}** [{s.overall.low:.3f}, {s.overall.high:.3f}] | {tasks} |"
            )
        settings = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        return (
            "# Moving-shapes video benchmark\n\n"
            + "\n".join(lines)
            + f"\n\nSettings: {settings}. Intervals: Wilson per task; the overall is the mean of the tasks with a "
            "stratified bootstrap interval.\n"
        )

    def save(self, out: str | Path) -> Path:
        from torchvision.utils import save_image

        out = Path(out)
        (out / "grids").mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.as_json(), indent=1) + "\n")
        (out / "summary.md").write_text(self.markdown())
        for task, strips in self.strips.items():
            save_image(torch.stack(strips), out / "grids" / f"{task}.png", nrow=1, padding=1)
        return out


def _framed(video: Tensor, correct: bool) -> Tensor:
    """One row: the video's frames side by side inside a 1-px green (correct) or red frame."""
    strip = torch.cat(list(video), dim=2)
    colour = torch.tensor([0.0, 0.8, 0.0] if correct else [0.9, 0.0, 0.0]).view(3, 1, 1)
    framed = colour.expand(3, strip.shape[1] + 2, strip.shape[2] + 2).clone()
    framed[:, 1:-1, 1:-1] = strip
    return framed


def run_video_bench(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    videos_per_prompt: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    keep_strips: int = 32,
    levels: Sequence[float] | None = None,
) -> VideoReport:
    """Benchmark ``model`` (an image-to-video adapter) on moving-shapes prompt ``records`` (each with its
    ``image``, ``scene``, ``mover``, ``direction`` and ``tag``); ``keep_strips`` videos per task go to the grids.
    ``levels``: the steps' explicit noise levels (flow sigmas / diffusion timesteps, a distilled student's
    own), None: the scheduler's."""
    from tqdm.auto import tqdm

    from flowalign.data.prompts import condition_images
    from flowalign.eval.geneval import image_seed
    from flowalign.samplers import generate, seeded_generators
    from flowalign.worlds.moving_shapes import judge_video, spec_from_record
    from rewards.shapes.detector import detect_batch

    if not records:
        raise ValueError("run_video_bench: no prompt records.")
    specs = [spec_from_record(r) for r in records]
    steps = steps or (len(levels) if levels is not None else model.default_steps)
    guidance = model.default_guidance if guidance is None else guidance
    jobs = [(i, j) for i in range(len(records)) for j in range(videos_per_prompt)]
    videos, strips = [], {}
    with (
        torch.no_grad(),
        tqdm(total=len(jobs), desc="bench video", unit="video", disable=not progress) as bar,
    ):
        for start in range(0, len(jobs), batch_size):
            part = jobs[start : start + batch_size]
            frames = generate(
                model, [records[i]["prompt"] for i, _ in part],
                seeded_generators([image_seed(seed, i, j) for i, j in part], model.device),
                steps=steps, guidance=guidance, images=condition_images([records[i] for i, _ in part], "--prompts"),
                levels=levels,
            ).images.cpu()  # fmt: skip
            detections = detect_batch(frames.flatten(0, 1))
            for k, (i, j) in enumerate(part):
                frame_dets = detections[k * frames.shape[1] : (k + 1) * frames.shape[1]]
                verdict = judge_video(frames[k], specs[i], frame_dets)
                tag = specs[i].task
                videos.append({
                    "prompt_index": i, "video": j, "prompt": records[i]["prompt"], "tag": tag,
                    "identity": verdict.identity, "motion": verdict.motion, "correct": verdict.correct,
                    "reason": verdict.reason,
                })  # fmt: skip
                if len(strips.setdefault(tag, [])) < keep_strips:
                    strips[tag].append(_framed(frames[k], verdict.correct))
            bar.update(len(part))
    stats = {
        metric: benchmark_stats(
            Verdicts.from_images(
                [v["prompt_index"] for v in videos], [v["tag"] for v in videos], [v[metric] for v in videos]
            )
        )
        for metric in METRICS
    }
    settings = {
        "steps": steps,
        "guidance": guidance,
        "levels": list(levels) if levels is not None else None,
        "seed": seed,
        "videos_per_prompt": videos_per_prompt,
        "prompts": len(records),
    }
    return VideoReport([dict(r) for r in records], videos, stats, settings, strips)


def compare_video_runs(
    a_dir: str | Path, b_dir: str | Path, *, seed: int = 0, ignore: Collection[str] = ()
) -> dict[str, Any]:
    """``B - A`` of two ``flowalign bench video`` runs on the same prompts, seed, steps and guidance: for
    each metric (identity, motion, correct) the paired bootstrap difference of the overall and per task
    with 95% intervals and McNemar's exact p (:func:`flowalign.eval.stats.paired_comparison`). ``ignore``:
    settings allowed to differ (:data:`flowalign.eval.compare.SAMPLER_SETTINGS` for a few-step student against
    its teacher)."""
    from flowalign.eval.stats import paired_comparison

    runs = []
    for directory in (a_dir, b_dir):
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise ValueError(
                f"{str(directory)!r} holds no results.json; pass the --out directory of a bench video run."
            )
        runs.append(json.loads(path.read_text()))
    keys = ("prompts", "seed", "steps", "guidance", "levels", "videos_per_prompt")
    for key in keys:
        if key not in ignore and runs[0]["settings"].get(key) != runs[1]["settings"].get(key):
            raise ValueError(
                f"cannot pair {str(a_dir)!r} and {str(b_dir)!r}: they differ in {key} "
                f"({runs[0]['settings'].get(key)!r} vs {runs[1]['settings'].get(key)!r})."
            )
    out: dict[str, Any] = {"a": str(a_dir), "b": str(b_dir), "metrics": {}}
    for metric in METRICS:
        verdicts = []
        for run in runs:
            videos = sorted(run["videos"], key=lambda v: (v["prompt_index"], v["video"]))
            verdicts.append(
                Verdicts.from_images(
                    [v["prompt_index"] for v in videos],
                    [v["tag"] for v in videos],
                    [v[metric] for v in videos],
                )
            )
        diff = paired_comparison(verdicts[0], verdicts[1], seed=seed)
        a, b = (benchmark_stats(v).overall for v in verdicts)
        out["metrics"][metric] = {
            "a": a.estimate,
            "b": b.estimate,
            "a_interval": [a.low, a.high],
            "b_interval": [b.low, b.high],
            "difference": diff.overall.as_json(difference=True),
            "tasks": {
                tag: {**t.difference.as_json(difference=True), "mcnemar_p": t.mcnemar_p}
                for tag, t in diff.tasks.items()
            },
        }
    return out


def comparison_rows(comparison: dict[str, Any]) -> list[str]:
    """One markdown row per metric: ``| metric | A [95%] | B [95%] | B - A [95%] | excludes 0 |``."""
    rows = []
    for metric, row in comparison["metrics"].items():
        d = row["difference"]
        a, b = row["a_interval"], row["b_interval"]
        rows.append(
            f"| {metric} | {row['a']:.3f} [{a[0]:.3f}, {a[1]:.3f}] | {row['b']:.3f} [{b[0]:.3f}, {b[1]:.3f}] | "
            f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {'yes' if d['excludes_zero'] else 'no'} |"
        )
    return rows


def comparison_text(comparison: dict[str, Any]) -> str:
    lines = ["| metric | A [95% CI] | B [95% CI] | B - A [95% CI] | excludes 0 |", "|---|---|---|---|---|"]
    return (
        f"A = {comparison['a']}, B = {comparison['b']} (A, B: stratified bootstrap; B - A: paired stratified "
        "bootstrap)\n\n" + "\n".join(lines + comparison_rows(comparison)) + "\n"
    )
