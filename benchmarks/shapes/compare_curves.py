"""Held-out accuracy curves of several training runs on one plot, and a table of their evaluations.

Reads each run's ``metrics.jsonl`` (written by the training loop; ``eval/geneval_overall`` at every
evaluation) and plots the evaluation subset's GenEval overall accuracy against the
iteration. Used for pilots that were stopped before a full benchmark. The table also gives each run's training
reward: its mean over the first and last 20 iterations, and its rise over the run fitted by least squares to the
per-iteration means, with a 95% t interval (:func:`fitted_rise`). Example:

    python benchmarks/shapes/compare_curves.py benchmarks/results/shapes_grpo_pilots/* \
        --out benchmarks/results/shapes_grpo_pilots/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_curve(run: Path) -> tuple[list[int], list[float], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "eval/geneval_overall" in r]
    accuracy = [r["eval/geneval_overall"] for r in rows if "eval/geneval_overall" in r]
    rewards = [r["reward"] for r in rows if "reward" in r]
    return steps, accuracy, rewards


def fitted_rise(values: list[float]) -> tuple[float, float, float]:
    """The rise of ``values`` (one per iteration) over the run: the least-squares slope times ``len(values) - 1``,
    with its 95% t interval (``n - 2`` degrees of freedom; iterations taken as independent, which a slowly
    drifting model only approximately makes them)."""
    from scipy import stats

    n = len(values)
    if n < 3:
        raise ValueError(f"a fitted rise needs at least 3 values, got {n}")
    fit = stats.linregress(range(n), values)
    half = stats.t.ppf(0.975, n - 2) * fit.stderr
    return fit.slope * (n - 1), (fit.slope - half) * (n - 1), (fit.slope + half) * (n - 1)


def iterations(run: Path) -> int:
    """Training iterations logged (reward-free recipes such as dmd log no reward)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if "step_time" in r), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write; a .md table goes beside it")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in args.runs if (r / "metrics.jsonl").is_file()]
    if not runs:
        parser.error("none of the given directories holds a metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = [
        "| run | iterations | eval subset: first | best | last | mean train reward: first 20 / last 20 "
        "| fitted rise of the train reward [95% t] |"
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for run in runs:
        steps, accuracy, rewards = load_curve(run)
        ax.plot(steps, accuracy, marker="o", markersize=3, label=run.name)
        head, tail = rewards[:20], rewards[-20:]
        reward = f"{sum(head) / len(head):.3f} / {sum(tail) / len(tail):.3f}" if rewards else "— (no reward)"
        rise = "{:+.3f} [{:+.3f}, {:+.3f}]".format(*fitted_rise(rewards)) if len(rewards) >= 3 else "—"
        lines.append(
            f"| {run.name} | {iterations(run)} | {accuracy[0]:.3f} | {max(accuracy):.3f} | {accuracy[-1]:.3f} | "
            f"{reward} | {rise} |"
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("GenEval overall (eval subset)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
