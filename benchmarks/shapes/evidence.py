"""Evidence on the shapes world: train a recipe, then benchmark base and tuned models on held-out prompts.

1. The base model's GenEval-style benchmark on the test and unseen splits (4 images per prompt).
2. Training with the given config for at most ``--minutes`` (periodic evaluation on a fixed test subset
   gives the accuracy curve).
3. The tuned model (the final LoRA, its EMA when the run keeps one) on the same splits with the same noise.

Writes ``results.json`` / ``results.md`` (per-task accuracy before/after, gains, wall time, accuracy gained
per minute), ``curve.png`` (training reward and held-out accuracy against wall time) and before/after PNG
grids per split. Example:

    python benchmarks/shapes/evidence.py configs/grpo/shapes.yaml --minutes 60 --out benchmarks/results/shapes_grpo
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def benchmark(model, split: str, images_per_prompt: int, seed: int, config, out: Path, label: str):
    from flowalign.eval.geneval import run_geneval, write_report
    from flowalign.worlds.shapes import load_prompts

    prompts = [dict(p) for p in load_prompts(ROOT / "assets" / "shapes" / "prompts" / f"{split}.jsonl")]
    report = run_geneval(
        model, prompts, images_per_prompt=images_per_prompt, steps=config.eval.steps or config.sampling.steps,
        guidance=config.sampling.guidance if config.eval.guidance is None else config.eval.guidance,
        resolution=config.model.resolution, seed=seed,
    )  # fmt: skip
    write_report(report, out / f"{label}_{split}")
    return report


def compare(before, after) -> dict[str, float]:
    """Win rate of the tuned model against the base under the GenEval judge (same prompt and noise per
    image: a win when only the tuned image is correct, a tie 0.5 when both agree) and the drift from the
    base: mean absolute pixel difference of the paired images."""
    wins = [
        1.0
        if a.result.correct and not b.result.correct
        else 0.5
        if a.result.correct == b.result.correct
        else 0.0
        for b, a in zip(before.records, after.records)
    ]
    drift = (after.images - before.images).abs().mean().item()
    return {"win_rate": sum(wins) / len(wins), "pixel_drift": drift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    from flowalign.config import load_config
    from flowalign.models import load_model
    from flowalign.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, f"train.output_dir={out / 'run'}", f"train.max_minutes={args.minutes}"]
    config = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(config.model.path, family=config.model.family)
    splits = ("test", "unseen")
    before = {
        s: benchmark(base, s, args.images_per_prompt, config.train.seed, config, out, "before")
        for s in splits
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
    after = {
        s: benchmark(tuned, s, args.images_per_prompt, config.train.seed, config, out, "after")
        for s in splits
    }
    versus = {s: compare(before[s], after[s]) for s in splits}
    before = {s: r.summary for s, r in before.items()}
    after = {s: r.summary for s, r in after.items()}

    command = "python benchmarks/shapes/evidence.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = {
        "command": command,
        "config": args.config,
        "overrides": args.overrides,
        "steps_done": result.steps_done,
        "train_minutes": minutes,
        "splits": {
            split: {
                "before": vars(before[split]) | {"task_counts": None},
                "after": vars(after[split]) | {"task_counts": None},
                "gain_overall": after[split].overall - before[split].overall,
                **versus[split],
            }
            for split in ("test", "unseen")
        },
    }
    summary["gain_per_minute_test"] = summary["splits"]["test"]["gain_overall"] / max(minutes, 1e-9)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(_markdown(summary, before, after, versus))
    _curve(out / "run" / "metrics.jsonl", out / "curve.png", before["test"].overall, after["test"].overall)
    print((out / "results.md").read_text())


def _markdown(summary, before, after, versus) -> str:
    lines = [
        f"Command: `{summary['command']}`",
        "",
        f"Training: {summary['steps_done']} iterations in {summary['train_minutes']:.1f} minutes on this machine.",
        "",
    ]
    for split in ("test", "unseen"):
        b, a = before[split], after[split]
        tasks = list(b.task_accuracy)
        lines += [f"### {split} split ({b.n_prompts} prompts, {b.n_images} images)", ""]
        lines += ["| | overall | " + " | ".join(tasks) + " | % images | % prompts |"]
        lines += ["|---" * (len(tasks) + 4) + "|"]
        for name, s in (("base", b), ("tuned", a)):
            cells = " | ".join(f"{s.task_accuracy[t]:.3f}" for t in tasks)
            lines += [
                f"| {name} | {s.overall:.3f} | {cells} | {s.image_accuracy:.3f} | {s.prompt_accuracy:.3f} |"
            ]
        lines += [
            "",
            f"Gain in overall accuracy: {a.overall - b.overall:+.3f}; win rate against the base (GenEval judge, "
            f"same prompt and noise): {versus[split]['win_rate']:.3f}; mean pixel drift from the base: "
            f"{versus[split]['pixel_drift']:.4f}",
            "",
        ]
    lines += [f"Accuracy gained per training minute (test overall): {summary['gain_per_minute_test']:+.4f}"]
    return "\n".join(lines) + "\n"


def _curve(metrics_path: Path, png: Path, base: float, final: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    evals = [(m, r["eval/geneval_overall"]) for m, r in zip(elapsed, rows) if "eval/geneval_overall" in r]
    ax2.plot(*zip(*evals), color="tab:red", marker="o", label="held-out GenEval overall (eval subset)")
    ax2.axhline(base, color="black", linestyle="--", label=f"base, full test split: {base:.3f}")
    ax2.axhline(final, color="tab:red", linestyle=":", label=f"tuned, full test split: {final:.3f}")
    ax2.set_ylabel("GenEval overall accuracy")
    fig.legend(loc="upper center", ncol=2, fontsize=7, bbox_to_anchor=(0.5, 1.0))
    fig.subplots_adjust(top=0.85)
    fig.savefig(png, dpi=120, bbox_inches="tight")


def replot(out: Path) -> None:
    """Redraw ``curve.png`` of a finished run from its ``results.json`` and metrics."""
    summary = json.loads((out / "results.json").read_text())
    test = summary["splits"]["test"]
    _curve(
        out / "run" / "metrics.jsonl", out / "curve.png", test["before"]["overall"], test["after"]["overall"]
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:
        replot(Path(sys.argv[2]))
    else:
        main()
