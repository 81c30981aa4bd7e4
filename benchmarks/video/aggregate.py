"""Pool the gains of several ``benchmarks/video/evidence.py`` runs (training seeds) of one recipe: per metric
(identity, motion, correct) the mean over seeds of ``tuned - base`` with a paired bootstrap interval
(:func:`flowalign.eval.stats.pooled_gain`), the per-seed gains and the train minutes.

    python benchmarks/video/aggregate.py benchmarks/results/moving_shapes_ipro/seed* --out benchmarks/results/moving_shapes_ipro
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowalign.eval.stats import Verdicts, benchmark_stats, pooled_gain
from flowalign.eval.video import METRICS


def verdicts(bench_dir: Path, metric: str) -> Verdicts:
    videos = sorted(
        json.loads((bench_dir / "results.json").read_text())["videos"],
        key=lambda v: (v["prompt_index"], v["video"]),
    )
    return Verdicts.from_images(
        [v["prompt_index"] for v in videos], [v["tag"] for v in videos], [v[metric] for v in videos]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evidence.py --out directories (one per seed)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summaries = [json.loads((run / "results.json").read_text()) for run in args.runs]
    pooled = {}
    seeds = ", ".join(str(s["seed"]) for s in summaries)
    minutes = ", ".join(f"{s['train_minutes']:.1f}" for s in summaries)
    lines = [
        f"# {summaries[0]['config']}: {len(args.runs)} seeds ({seeds}), {minutes} train minutes\n",
        "| metric | base [95% CI] | pooled gain [95% CI] | excludes 0 | per seed [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for metric in METRICS:
        pairs = [(verdicts(run / "before", metric), verdicts(run / "after", metric)) for run in args.runs]
        gain = pooled_gain(pairs)
        base = benchmark_stats(pairs[0][0]).overall
        differences = [s["metrics"][metric]["difference"] for s in summaries]
        pooled[metric] = {
            "base": base.estimate,
            "base_interval": [base.low, base.high],
            "gain": gain.overall.as_json(difference=True),
            "per_seed": list(gain.per_seed),
        }
        per_seed = ", ".join(f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for d in differences)
        lines.append(
            f"| {metric} | {base.estimate:.3f} [{base.low:.3f}, {base.high:.3f}] | {gain.overall.estimate:+.3f} "
            f"[{gain.overall.low:+.3f}, {gain.overall.high:+.3f}] | {'yes' if gain.overall.excludes_zero else 'no'} "
            f"| {per_seed} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pooled.json").write_text(
        json.dumps({"runs": [str(r) for r in args.runs], "metrics": pooled}, indent=1) + "\n"
    )
    (args.out / "pooled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
