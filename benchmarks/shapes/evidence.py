"""Evidence on the shapes world: train a recipe, then benchmark base and tuned models on held-out prompts.

1. The base model's GenEval-style benchmark on the test and unseen splits, at each ``--guidance``, with
   the balanced protocol of ``flowalign bench geneval`` (at least ``--min-images-per-task`` images per
   task, at least ``--images-per-prompt`` per prompt). The noise seed is fixed (``EVAL_SEED``),
   independent of ``train.seed``, so the base benchmark is the same for every training seed:
   ``--base-cache DIR`` stores it once and reuses it whenever the model, prompts, settings and image
   counts match.
2. Training with the given config for at most ``--minutes`` (periodic evaluation on the balanced test
   subset, ``eval.images_per_task``, gives the accuracy curve).
3. The tuned model (the final LoRA, its EMA when the run keeps one) on the same splits with the same noise.

Writes ``results.json`` / ``results.md``: per split and guidance, both models' accuracies with 95%
intervals, the gain (tuned - base) with its paired 95% interval and whether it excludes zero (per task
too, with McNemar's test), the win rate, the pixel drift, train minutes and gain per CPU-minute; every
benchmark's own ``results.json`` with per-image verdicts in ``before_<split>_g<guidance>/`` and
``after_<split>_g<guidance>/`` (what ``benchmarks/shapes/aggregate.py`` pools over seeds); ``curve.png``
(training reward and held-out accuracy against wall time). Example:

    python benchmarks/shapes/evidence.py configs/grpo/shapes.yaml --minutes 60 --seed 1 --guidance 1.0 1.5 \
        --base-cache runs/base_cache --out benchmarks/results/shapes_grpo_seed1
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("test", "unseen")
EVAL_SEED = 0


@dataclass
class Benchmark:
    """One model on one split at one guidance: its run read back from ``directory`` and, when available,
    its images ``[U, 3, H, W]`` (for the pixel drift)."""

    directory: Path
    images: torch.Tensor | None


def benchmark_dir(label: str, split: str, guidance: float) -> str:
    """``before_test_g1.5``: where one benchmark of an evidence run lives."""
    return f"{label}_{split}_g{guidance:g}"


def benchmark(
    model, model_desc: dict, split: str, guidance: float, protocol: dict, config, out: Path
) -> Benchmark:
    """Benchmark ``model`` on ``split`` at ``guidance`` into ``out`` (results.json, summary.md, grids)."""
    from flowalign.eval.geneval import balanced_images_per_prompt, run_geneval, write_report

    prompts = split_prompts(split)
    report = run_geneval(
        model, prompts, guidance=guidance, steps=config.eval.steps or config.sampling.steps,
        images_per_prompt=balanced_images_per_prompt([p["tag"] for p in prompts], **protocol),
        resolution=config.model.resolution, seed=EVAL_SEED,
    )  # fmt: skip
    report.model = model_desc | {"split": split}
    write_report(report, out, extra={"protocol": protocol})
    return Benchmark(out, report.images)


def split_prompts(split: str) -> list[dict]:
    from flowalign.worlds.shapes import load_prompts

    return [dict(p) for p in load_prompts(ROOT / "assets" / "shapes" / "prompts" / f"{split}.jsonl")]


def base_benchmark(
    model, model_desc, split, guidance, protocol, config, out: Path, cache: Path | None
) -> Benchmark:
    """The base model's benchmark: copied from ``cache`` when an entry there was made with the same model,
    prompts, settings and image counts, else computed (and stored in ``cache`` when given)."""
    from flowalign.eval.compare import Protocol, load_run
    from flowalign.eval.geneval import balanced_images_per_prompt

    entry = cache / out.name if cache is not None else None
    if entry is not None and (entry / "results.json").is_file():
        prompts = split_prompts(split)
        cached = load_run(entry)
        expected = Protocol(
            prompts=tuple(p["prompt"] for p in prompts),
            images_per_prompt=tuple(balanced_images_per_prompt([p["tag"] for p in prompts], **protocol)),
            steps=config.eval.steps or config.sampling.steps,
            guidance=guidance,
            resolution=config.model.resolution or model.default_resolution,
            seed=EVAL_SEED,
        )
        if cached.model == model_desc | {"split": split} and cached.protocol.mismatch(expected) is None:
            print(f"base benchmark {out.name}: reusing {entry}")
            shutil.copytree(entry, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("images.pt"))
            images = entry / "images.pt"
            return Benchmark(out, torch.load(images, weights_only=True).float() if images.is_file() else None)
        print(f"base benchmark {out.name}: the cached one in {entry} does not match; recomputing it")
    result = benchmark(model, model_desc, split, guidance, protocol, config, out)
    if entry is not None:
        shutil.copytree(out, entry, dirs_exist_ok=True)
        if result.images is not None:
            torch.save(result.images.half(), entry / "images.pt")
    return result


def compare(before: Benchmark, after: Benchmark) -> dict:
    """The paired comparison of the tuned model with the base on the same prompts and noise: the gain with
    its interval per task and overall (:func:`flowalign.eval.stats.paired_comparison`), both models'
    accuracies with intervals, the win rate under the GenEval judge (a win when only the tuned image is
    correct, a tie 0.5 when both agree) and the mean absolute pixel difference of the paired images."""
    from flowalign.eval.compare import compare_runs, load_run
    from flowalign.eval.stats import benchmark_stats

    base, tuned = load_run(before.directory), load_run(after.directory)
    gain = compare_runs(base, tuned)
    n = len(base.verdicts.correct)
    win_rate = 0.5 + sum(t.b_only - t.a_only for t in gain.tasks.values()) / (2 * n)
    drift = None
    if before.images is not None and after.images is not None:
        drift = (after.images - before.images).abs().mean().item()
    return {
        "base_dir": before.directory.name,
        "tuned_dir": after.directory.name,
        "images": n,
        "base": benchmark_stats(base.verdicts).as_json(),
        "tuned": benchmark_stats(tuned.verdicts).as_json(),
        "gain": gain.as_json(),
        "win_rate": win_rate,
        "pixel_drift": drift,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="train.seed (the evaluation noise is fixed)")
    parser.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=None,
        help="guidance scales to benchmark at (default: eval's)",
    )
    parser.add_argument("--images-per-prompt", type=int, default=4, help="the fewest images per prompt")
    parser.add_argument("--min-images-per-task", type=int, default=96, help="the fewest images per task")
    parser.add_argument("--base-cache", default=None, help="directory to reuse / store base benchmarks in")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    from flowalign.config import load_config
    from flowalign.models import load_model
    from flowalign.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, f"train.output_dir={out / 'run'}", f"train.max_minutes={args.minutes}"]
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    config = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    guidances = args.guidance or [
        config.sampling.guidance if config.eval.guidance is None else config.eval.guidance
    ]
    protocol = {"images_per_prompt": args.images_per_prompt, "min_images_per_task": args.min_images_per_task}
    cache = Path(args.base_cache) if args.base_cache else None
    model_desc = {"model": config.model.path, "family": config.model.family}
    base = load_model(config.model.path, family=config.model.family)
    before = {
        (s, g): base_benchmark(
            base, model_desc, s, g, protocol, config, out / benchmark_dir("before", s, g), cache
        )
        for s in SPLITS
        for g in guidances
    }
    del base

    started = time.time()
    result = train(config)
    minutes = (time.time() - started) / 60

    tuned = load_model(config.model.path, family=config.model.family)
    checkpoints = sorted((out / "run" / "checkpoints").glob("step-*"))
    # The EMA weights when the run keeps them (train.ema_decay): they are what its evaluations used.
    lora = checkpoints[-1] / "lora_ema"
    tuned.load_lora(lora if lora.is_dir() else checkpoints[-1] / "lora")
    tuned_desc = model_desc | {"lora": str(lora if lora.is_dir() else checkpoints[-1] / "lora")}
    evaluations = []
    for (split, guidance), base_run in before.items():
        after = benchmark(
            tuned,
            tuned_desc,
            split,
            guidance,
            protocol,
            config,
            out / benchmark_dir("after", split, guidance),
        )
        evaluations.append({"split": split, "guidance": guidance, **compare(base_run, after)})

    threads = torch.get_num_threads()
    summary = {
        "command": "python benchmarks/shapes/evidence.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "config": args.config,
        "overrides": args.overrides,
        "train_seed": config.train.seed,
        "eval_seed": EVAL_SEED,
        "protocol": protocol,
        "steps_done": result.steps_done,
        "train_minutes": minutes,
        "threads": threads,
        "cpu_minutes": minutes * threads,
        "evaluations": evaluations,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(_markdown(summary))
    test = next(e for e in evaluations if e["split"] == "test")
    _curve(out / "run" / "metrics.jsonl", out / "curve.png", test)
    print((out / "results.md").read_text())


def _markdown(summary: dict) -> str:
    lines = [
        f"Command: `{summary['command']}`",
        "",
        f"Training: {summary['steps_done']} iterations in {summary['train_minutes']:.1f} minutes "
        f"({summary['threads']} threads, {summary['cpu_minutes']:.1f} CPU-minutes), train.seed "
        f"{summary['train_seed']}; evaluation noise seed {summary['eval_seed']}, at least "
        f"{summary['protocol']['min_images_per_task']} images per task and "
        f"{summary['protocol']['images_per_prompt']} per prompt.",
        "",
    ]
    for e in summary["evaluations"]:
        base, tuned, gain = e["base"], e["tuned"], e["gain"]
        tasks = list(base["tasks"])
        images = sum(t["images"] for t in base["tasks"].values())
        lines += [f"### {e['split']} split, guidance {e['guidance']:g} ({images} paired images)", ""]
        lines += ["| | " + " | ".join(tasks) + " | **overall** | % images |", "|---" * (len(tasks) + 3) + "|"]
        lines += ["| prompts x images | " + " | ".join(_layout(base["tasks"][t]) for t in tasks) + " | | |"]
        for name, s in (("base", base), ("tuned", tuned)):
            cells = [_accuracy(s["tasks"][t]) for t in tasks]
            lines += [
                f"| {name} | "
                + " | ".join(cells)
                + f" | **{_ci(s['overall'])}** | {_ci(s['image_accuracy'])} |"
            ]
        cells = [_gain(gain["tasks"][t]) for t in tasks]
        lines += [
            "| gain | "
            + " | ".join(cells)
            + f" | **{_gain(gain['overall'])}** | {_gain(gain['image_accuracy'])} |",
            "| McNemar p | " + " | ".join(f"{gain['tasks'][t]['mcnemar_p']:.2g}" for t in tasks) + " | | |",
            "",
            f"Gain in overall accuracy: {gain['overall']['estimate']:+.3f} (95% paired interval "
            f"[{gain['overall']['low']:+.3f}, {gain['overall']['high']:+.3f}], "
            f"{'excludes' if gain['overall']['excludes_zero'] else 'does not exclude'} zero); win rate against "
            f"the base (GenEval judge, same prompt and noise): {e['win_rate']:.3f}"
            + (
                f"; mean pixel drift from the base: {e['pixel_drift']:.4f}"
                if e["pixel_drift"] is not None
                else ""
            ),
            "",
        ]
    lines += [
        "Intervals: per task Wilson (accuracies) and the paired stratified bootstrap (gains, 2000 resamples of "
        "the images within each prompt, the same images for both models); * marks a gain whose interval "
        "excludes zero."
    ]
    return "\n".join(lines) + "\n"


def _layout(task: dict) -> str:
    per_prompt = task["images_per_prompt"]
    per_prompt = per_prompt if isinstance(per_prompt, int) else "-".join(map(str, per_prompt))
    return f"{task['prompts']} x {per_prompt}"


def _accuracy(task: dict) -> str:
    return f"{task['accuracy']:.3f} [{task['accuracy_low']:.2f}, {task['accuracy_high']:.2f}]"


def _ci(interval: dict) -> str:
    return f"{interval['estimate']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def _gain(interval: dict) -> str:
    star = "*" if interval["excludes_zero"] else ""
    return f"{interval['estimate']:+.3f}{star} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def _curve(metrics_path: Path, png: Path, test: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, final = test["base"]["overall"]["estimate"], test["tuned"]["overall"]["estimate"]
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    elapsed, total = [], 0.0
    for row in rows:
        total += row.get("step_time", 0.0)
        elapsed.append(total / 60)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rewards = [r.get("reward", float("nan")) for r in rows]
    ax.plot(elapsed, rewards, color="tab:blue", alpha=0.25, label="train reward")
    window = 10
    smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
              for i in range(len(rewards))]  # fmt: skip
    ax.plot(elapsed, smooth, color="tab:blue", label=f"train reward, mean of {window} iterations")
    ax.set_xlabel("training minutes (evaluation time excluded)")
    ax.set_ylabel("mean train reward")
    ax2 = ax.twinx()
    evals = [(m, r) for m, r in zip(elapsed, rows) if "eval/geneval_overall" in r]
    ax2.plot([m for m, _ in evals], [r["eval/geneval_overall"] for _, r in evals], color="tab:red", marker="o",
             label="held-out GenEval overall (balanced eval subset)")  # fmt: skip
    banded = [(m, r) for m, r in evals if "eval/geneval_overall_lo" in r]
    if banded:
        ax2.fill_between([m for m, _ in banded], [r["eval/geneval_overall_lo"] for _, r in banded],
                         [r["eval/geneval_overall_hi"] for _, r in banded], color="tab:red", alpha=0.15,
                         label="95% interval")  # fmt: skip
    guidance = test["guidance"]
    ax2.axhline(
        base, color="black", linestyle="--", label=f"base, full test split (g {guidance:g}): {base:.3f}"
    )
    ax2.axhline(
        final, color="tab:red", linestyle=":", label=f"tuned, full test split (g {guidance:g}): {final:.3f}"
    )
    ax2.set_ylabel("GenEval overall accuracy")
    fig.legend(loc="upper center", ncol=2, fontsize=7, bbox_to_anchor=(0.5, 1.0))
    fig.subplots_adjust(top=0.85)
    fig.savefig(png, dpi=120, bbox_inches="tight")


def replot(out: Path) -> None:
    """Redraw ``curve.png`` of a finished run from its ``results.json`` and metrics."""
    summary = json.loads((out / "results.json").read_text())
    test = next(e for e in summary["evaluations"] if e["split"] == "test")
    _curve(out / "run" / "metrics.jsonl", out / "curve.png", test)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:
        replot(Path(sys.argv[2]))
    else:
        main()
