"""Evidence on the moving-shapes world: train a video recipe, then benchmark base and tuned models on the
held-out test split (``assets/moving_shapes/prompts/test.jsonl``, 96 first frames per task) with the same
noise, and report the paired gain in identity, motion and both with 95% intervals.

1. ``flowalign bench video`` of the base model (cached in ``--base-cache`` when given);
2. ``flowalign train CONFIG train.seed=SEED train.max_minutes=MINUTES`` (the CPU minutes are recorded);
3. ``flowalign bench video --lora <final checkpoint>/lora`` and ``flowalign bench compare base tuned``.

Writes ``<out>/results.json`` and ``<out>/results.md`` (both models' accuracies, the paired differences,
train minutes and the gain per CPU-minute), keeps every benchmark directory, the run's ``metrics.jsonl`` and
``config.yaml`` and the final LoRA (``<out>/lora``; ``--keep-run`` keeps the whole run). Example:

    python benchmarks/video/evidence.py configs/backprop/shapes_video_ipro.yaml --minutes 10 --seed 1 \
        --base-cache runs/video_base --out benchmarks/results/video_ipro_seed1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _flowalign(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "flowalign", *args], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--base-cache", default=None, help="reuse (or write) the base benchmark here")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--keep-run", action="store_true",
        help="keep the run's checkpoints and logs (default: only metrics.jsonl, config.yaml and the final LoRA, "
        "copied to <out>/lora)",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "before"
    if args.base_cache and (Path(args.base_cache) / "results.json").is_file():
        shutil.copytree(args.base_cache, base, dirs_exist_ok=True)
    else:
        _flowalign("bench", "video", "--no-progress", "--out", str(base))
        if args.base_cache:
            shutil.copytree(base, args.base_cache, dirs_exist_ok=True)
    run = out / "run"
    start = time.perf_counter()
    _flowalign(
        "train", args.config, *args.overrides, f"train.seed={args.seed}", f"train.max_minutes={args.minutes}",
        f"train.output_dir={run}", "train.overwrite=true",
    )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    after = out / "after"
    _flowalign("bench", "video", "--no-progress", "--lora", str(checkpoint / "lora"), "--out", str(after))
    _flowalign("bench", "compare", str(base), str(after), "--out", str(out / "compare"))
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    summary = {
        "config": args.config, "overrides": args.overrides, "seed": args.seed, "train_minutes": round(minutes, 2),
        "checkpoint": checkpoint.name, "metrics": comparison["metrics"],
        "gain_per_cpu_minute": {k: v["difference"]["estimate"] / minutes for k, v in comparison["metrics"].items()},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# {Path(args.config).name}, seed {args.seed}, {minutes:.1f} train minutes ({checkpoint.name})\n",
        "| metric | base | tuned | gain [95% CI] | excludes 0 |",
        "|---|---|---|---|---|",
    ]
    for metric, row in comparison["metrics"].items():
        d = row["difference"]
        lines.append(
            f"| {metric} | {row['a']:.3f} | {row['b']:.3f} | {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
            f"{'yes' if d['excludes_zero'] else 'no'} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep_run:  # keep what a reader needs: the metrics, the config and the final LoRA
        shutil.copytree(checkpoint / "lora", out / "lora", dirs_exist_ok=True)
        for path in run.iterdir():
            if path.name not in ("metrics.jsonl", "config.yaml"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
