"""Training-time evaluation: deterministic ODE samples on held-out prompts, with the EMA weights when kept.

- Prompts with GenEval metadata (``include`` clauses, e.g. the shapes world's test split) are judged by the
  GenEval-style runner (:func:`flowalign.eval.geneval.run_geneval`) on the main process: metrics
  ``eval/geneval_overall`` with its 95% interval bounds ``eval/geneval_overall_lo`` / ``_hi`` (stratified
  bootstrap, :mod:`flowalign.eval.stats`), ``eval/geneval_<task>`` and ``eval/geneval_images``; a report
  with a pass/fail PNG grid per task under ``<output_dir>/eval/step-N/``. With ``eval.images_per_task``
  every task is measured on the same number of images (:func:`flowalign.eval.geneval.balanced_subset`).
- Other prompts are scored by the training rewards: ``eval/reward_<name>``, and a PNG grid.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from flowalign.data.prompts import load_prompt_set
from flowalign.samplers import generate, seeded_generators
from flowalign.train.loop import TrainContext

__all__ = ["Evaluation"]


@contextlib.contextmanager
def _eval_weights(ctx: TrainContext):
    """EMA weights if kept, and the unwrapped denoiser (no DDP collectives from a lone process)."""
    model = ctx.model
    wrapped = getattr(model, "_training_module", None)
    model.set_training_module(None)
    ema = ctx.ema
    try:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            yield
    finally:
        model.set_training_module(wrapped)


class Evaluation:
    """The loop's periodic evaluation. :meth:`setup` (called by the loop before the first iteration) reads
    ``eval.prompts``, builds the GenEval detector ``eval.detector`` on each process's device and checks every prompt against its vocabulary, so a prompt file the detector cannot judge stops the run
    before training, not at its first evaluation; calling it evaluates."""

    def __init__(self) -> None:
        self.records: list = []
        self.detector = None

    def setup(self, ctx: TrainContext) -> None:
        e = ctx.config.eval
        if not e.prompts or e.every <= 0:
            return
        self.records = load_prompt_set(e.prompts)[: e.max_prompts]
        if all("include" in r.metadata for r in self.records):
            from flowalign.eval.geneval import check_prompts
            from rewards.geneval_reward import load_detector

            # Every process judges its share of the images with its own detector.
            self.detector = load_detector(e.detector, ctx.accelerator.device, **e.detector_args)
            try:
                check_prompts([{"prompt": r.prompt, **r.metadata} for r in self.records], self.detector)
            except ValueError as err:
                raise ValueError(
                    f"eval.prompts {e.prompts!r} with eval.detector={e.detector}: {err}"
                ) from None
        elif e.images_per_task is not None:
            raise ValueError(
                f"eval.images_per_task balances GenEval tasks, but eval.prompts {e.prompts!r} holds prompts "
                "without GenEval metadata ('include'); set eval.images_per_task=null for this file."
            )

    @torch.no_grad()
    def __call__(self, ctx: TrainContext, step: int) -> dict[str, float]:
        if self.records and all("include" in r.metadata for r in self.records):
            return _evaluate_geneval(ctx, step, self.records, self.detector)
        return _evaluate_rewards(ctx, step, self.records)


_GATHER_IMAGE_BYTES = 512 * 2**20
"""Above this many bytes of uint8 images, a multi-process evaluation writes no PNG grids (verdicts only)."""


def _share(jobs: list[tuple[int, int]], index: int, processes: int) -> tuple[list[tuple[int, int]], int]:
    """Process ``index``'s contiguous block of ``jobs``, padded by repeating its last job so that every
    process runs the same number (the same number of model calls: a sharded model's forward is a
    collective); returns the block and how many of its jobs are real."""
    per = -(-len(jobs) // processes)
    mine = jobs[index * per : (index + 1) * per]
    real = len(mine)
    return mine + [(mine or jobs)[-1]] * (per - real), real


def _evaluate_geneval(ctx: TrainContext, step: int, records, detector) -> dict[str, float]:
    """GenEval on the held-out prompts, the images split over the processes (each judges its share with its
    own detector; the main process merges the verdicts and writes the report). Every image has the seed it
    has on one process, so the result does not depend on the number of processes."""
    from accelerate.utils import gather_object

    from flowalign.eval.geneval import balanced_subset, merge_reports, run_geneval, write_report

    config, acc = ctx.config, ctx.accelerator
    e = config.eval
    counts: int | list[int] = e.images_per_prompt
    if e.images_per_task is not None:
        tags = [r.metadata.get("tag") for r in records]
        subset = balanced_subset(tags, e.images_per_task, images_per_prompt=e.images_per_prompt)
        records, counts = [records[i] for i, _ in subset], [n for _, n in subset]
    prompts = [{"prompt": r.prompt, **r.metadata} for r in records]
    per_prompt = counts if isinstance(counts, list) else [counts] * len(prompts)
    jobs = [(i, j) for i, n in enumerate(per_prompt) for j in range(n)]
    side = config.model.resolution or ctx.model.default_resolution
    keep_images = acc.num_processes == 1 or len(jobs) * 3 * side * side <= _GATHER_IMAGE_BYTES
    mine, real = (
        _share(jobs, acc.process_index, acc.num_processes) if acc.num_processes > 1 else (jobs, len(jobs))
    )
    with _eval_weights(ctx):
        report = run_geneval(
            ctx.model, prompts, images_per_prompt=per_prompt, steps=e.steps or config.sampling.steps,
            levels=ctx.levels,  # eval.steps is the levels' count (validated)
            guidance=config.sampling.guidance if e.guidance is None else e.guidance,
            resolution=config.model.resolution, seed=config.train.seed, detector=detector,
            batch_size=config.train.micro_batch_size or 32, progress=False, jobs=mine, keep_images=keep_images,
        )  # fmt: skip
    if acc.num_processes > 1:
        report.records = report.records[:real]
        if report.images is not None:
            report.images = (report.images[:real] * 255).round().to(torch.uint8)
        parts = gather_object([report])
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return {}
        report = merge_reports(parts)
        if report.images is not None:
            report.images = report.images.float() / 255
    out: dict[str, float] = {}
    summary, overall = report.summary, report.stats.overall
    out = {
        "eval/geneval_overall": summary.overall,
        "eval/geneval_overall_lo": overall.low,
        "eval/geneval_overall_hi": overall.high,
        "eval/geneval_images": summary.image_accuracy,
    }
    out.update({f"eval/geneval_{task}": value for task, value in summary.task_accuracy.items()})
    here = ctx.output_dir / "eval" / f"step-{step:06d}"
    write_report(report, here)
    out.update(_gain_since_first_evaluation(here))
    if config.train.progress:
        from tqdm.auto import tqdm

        line = f"step {step}: held-out GenEval overall {overall.estimate:.3f} [{overall.low:.3f}, {overall.high:.3f}]"
        if "eval/geneval_gain" in out:
            line += (
                f"; gain since the first evaluation {out['eval/geneval_gain']:+.3f} "
                f"[{out['eval/geneval_gain_lo']:+.3f}, {out['eval/geneval_gain_hi']:+.3f}] (same images, 95%)"
            )
        tqdm.write(line)
    acc.wait_for_everyone()
    return out


def _gain_since_first_evaluation(here: Path) -> dict[str, float]:
    """The overall's gain of the evaluation written to ``here`` over this run's first evaluation (its
    earliest ``step-*`` sibling: before training when ``eval.at_start``), paired on the same prompts and
    noise (:func:`flowalign.eval.compare.compare_runs`), as ``eval/geneval_gain`` and its 95% interval
    ``eval/geneval_gain_lo`` / ``_hi``. Empty at the first evaluation and when the two do not pair (a
    resumed run with other eval settings)."""
    from flowalign.eval.compare import compare_runs, load_run

    first = sorted(here.parent.glob("step-*/results.json"))[0].parent
    if first == here:
        return {}
    try:
        gain = compare_runs(load_run(first), load_run(here)).overall
    except ValueError:
        return {}
    return {
        "eval/geneval_gain": gain.estimate,
        "eval/geneval_gain_lo": gain.low,
        "eval/geneval_gain_hi": gain.high,
    }


def _pointwise_scores(reward, images, prompts, metadata) -> dict[str, list[float]]:
    """Each reward part's score of each image. A groupwise part (a win rate within a group of samples)
    has no score for one image: it is scored by its pointwise judge, as ``<name>/<judge>``, or left out
    when its judge is pairwise."""
    from rewards import Reward

    scores: dict[str, list[float]] = {}
    for name, (part, _) in reward.parts.items():
        key = name
        if part.groupwise:
            judge = getattr(part, "judge", None)
            if not isinstance(judge, Reward):
                continue
            part, key = judge, f"{name}/{judge.name}"
        scores[key] = part(images, prompts, metadata).scores.float().tolist()
    return scores


def _evaluate_rewards(ctx: TrainContext, step: int, records) -> dict[str, float]:
    """Mean score of each reward part (:func:`_pointwise_scores`) over the prompts, split over processes;
    image ``j`` of prompt ``i`` starts from the noise of
    :func:`~flowalign.eval.geneval.image_seed` ``(train.seed, i, j)`` at every evaluation, so curves compare
    like with like and the images do not depend on the number of processes."""
    from accelerate.utils import gather_object

    from flowalign.eval.geneval import image_seed

    config, model, acc = ctx.config, ctx.model, ctx.accelerator
    e = config.eval
    jobs = [(i, j) for i in range(len(records)) for j in range(e.images_per_prompt)]
    mine = jobs[acc.process_index :: acc.num_processes]
    scores: dict[str, list[float]] = {}
    images = None
    if mine:
        prompts = [records[i].prompt for i, _ in mine]
        metadata = [dict(records[i].metadata) for i, _ in mine]
        with _eval_weights(ctx):
            images = generate(
                model, prompts, seeded_generators([image_seed(config.train.seed, i, j) for i, j in mine], model.device),
                steps=e.steps or config.sampling.steps,
                guidance=config.sampling.guidance if e.guidance is None else e.guidance,
                resolution=config.model.resolution, micro_batch_size=config.train.micro_batch_size,
                levels=ctx.levels,  # eval.steps is the levels' count (validated)
            ).images  # fmt: skip
        if ctx.reward is not None:
            scores = _pointwise_scores(ctx.reward, images, prompts, metadata)
    # Every process joins the gather, also one that had no prompt (no collective is skipped).
    parts = gather_object([scores]) if acc.num_processes > 1 else [scores]
    out: dict[str, float] = {}
    for name in {k for part in parts for k in part}:
        values = [v for part in parts for v in part.get(name, [])]
        out[f"eval/reward_{name}"] = sum(values) / len(values)
    if acc.is_main_process and images is not None:
        from torchvision.utils import save_image

        directory = ctx.output_dir / "eval"
        directory.mkdir(parents=True, exist_ok=True)
        grid = images[: 8 * e.images_per_prompt]
        save_image(grid, directory / f"step-{step:06d}.png", nrow=e.images_per_prompt * 4, padding=1)
    return out
