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

``--rejudge DIR...`` measures committed runs again with the current judge (after a judge change): both
benchmarks are regenerated from the recorded base model and ``DIR/lora`` with the same seeded noise, and
the comparison and summary are rewritten; the training and its minutes are kept.

    python benchmarks/video/evidence.py --rejudge benchmarks/results/moving_shapes_ipro/seed*
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
sys.path.insert(0, str(ROOT))

from flowalign.eval.video import comparison_rows  # noqa: E402


def _flowalign(*args: str | Path) -> None:
    """Run a ``flowalign`` command in the repository root; paths inside it are passed relative to it."""
    relative = [
        str(a.relative_to(ROOT)) if isinstance(a, Path) and a.is_relative_to(ROOT) else str(a) for a in args
    ]
    subprocess.run([sys.executable, "-m", "flowalign", *relative], check=True, cwd=ROOT)


def measure(out: Path, base: Path, lora: Path, run: dict) -> None:
    """Benchmark ``lora`` into ``out/after``, then :func:`summarize`."""
    _flowalign("bench", "video", "--no-progress", "--lora", lora, "--out", out / "after")
    summarize(out, base, run)


def summarize(out: Path, base: Path, run: dict) -> None:
    """Compare ``out/after`` with ``base``, write ``out/results.json`` / ``.md`` (``run``: config, overrides,
    seed, train_minutes, checkpoint)."""
    _flowalign("bench", "compare", base, out / "after", "--out", out / "compare")
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    minutes = run["train_minutes"]
    summary = run | {
        "metrics": comparison["metrics"],
        "gain_per_cpu_minute": {
            k: v["difference"]["estimate"] / minutes for k, v in comparison["metrics"].items()
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# {Path(run['config']).name}, seed {run['seed']}, {minutes:.1f} train minutes ({run['checkpoint']})\n",
        "| metric | base [95% CI] | tuned [95% CI] | gain [95% CI] | excludes 0 |",
        "|---|---|---|---|---|",
        *comparison_rows(comparison),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def rejudge(outs: list[Path]) -> None:
    """Measure committed evidence runs again with the current judge (see the module docstring)."""
    base = None
    for out in outs:
        run = json.loads((out / "results.json").read_text())
        if not (out / "lora").is_dir():
            sys.exit(f"{out}: no committed LoRA in {out / 'lora'}; --rejudge needs it.")
        if base is None:  # every run's base is the same benchmark of the same model and noise
            base = out / "before"
            _flowalign("bench", "video", "--no-progress", "--out", base)
        elif base != out / "before":
            shutil.copytree(base, out / "before", dirs_exist_ok=True)
        keep = ("config", "overrides", "seed", "train_minutes", "checkpoint")
        measure(out, out / "before", out / "lora", {k: run[k] for k in keep})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--minutes", type=float, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--base-cache", default=None, help="reuse (or write) the base benchmark here")
    parser.add_argument("--out")
    parser.add_argument(
        "--keep-run", action="store_true",
        help="keep the run's checkpoints and logs (default: only metrics.jsonl, config.yaml and the final LoRA, "
        "copied to <out>/lora)",
    )  # fmt: skip
    parser.add_argument("--rejudge", nargs="+", type=Path, metavar="DIR", help="measure committed runs again")
    args = parser.parse_args()
    if args.rejudge:
        if args.config or args.out:
            parser.error("--rejudge takes only the run directories")
        return rejudge([p.resolve() for p in args.rejudge])
    if not args.config or args.minutes is None or not args.out:
        parser.error("a training run needs CONFIG, --minutes and --out")
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
    measure(out, base, checkpoint / "lora", {
        "config": args.config, "overrides": args.overrides, "seed": args.seed, "train_minutes": round(minutes, 2),
        "checkpoint": checkpoint.name,
    })  # fmt: skip
    if not args.keep_run:  # keep what a reader needs: the metrics, the config and the final LoRA
        shutil.copytree(checkpoint / "lora", out / "lora", dirs_exist_ok=True)
        for path in run.iterdir():
            if path.name not in ("metrics.jsonl", "config.yaml"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
