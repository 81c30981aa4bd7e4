"""Re-judge committed shapes-world benchmarks with the current judge.

Every benchmark directory (``results.json`` of ``flowalign bench geneval`` or of an evidence run's
``before_*`` / ``after_*``) records its model, LoRA, prompts and settings, and the evaluation noise is
seeded, so its images can be regenerated exactly and judged again. Images are cached (float32, as the
judge saw them) under ``--images-cache``, so a later judge change costs only the judging.

- A benchmark directory is rewritten in place (results.json, summary.md, grids/).
- An evidence run directory (``benchmarks/shapes/evidence.py --out``) has every benchmark rewritten; the
  tuned model is its committed LoRA (``run/lora_ema``, else ``run/lora``); its comparisons
  (results.json, results.md) are recomputed. ``curve.png`` is not: it plots the training run's own
  evaluations, made with the judge of its time.

Example (the evidence of ``benchmarks/results/shapes_alignment.md``):

    python benchmarks/shapes/rejudge.py benchmarks/results/shapes_evidence/*_s[01] \\
        benchmarks/results/shapes_base_v2/* --images-cache runs/rejudge_images
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence import ROOT, Benchmark, _markdown, benchmark_dir, compare, split_prompts  # noqa: E402


def _judge_version() -> str:
    """The commit that last changed the detector (the judge's version, stable across later commits)."""
    try:
        commit = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", "rewards/shapes/detector.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"rewards/shapes/detector.py as of commit {commit or 'unknown'}"


def _prompts(model: dict) -> list[dict]:
    from flowalign.eval.geneval import load_geneval_prompts

    if model.get("prompts"):
        return load_geneval_prompts(ROOT / model["prompts"])
    return split_prompts(model["split"])


def rejudge_benchmark(directory: Path, lora: Path | None, cache: Path) -> Benchmark:
    """Regenerate (or load) ``directory``'s images, judge them, rewrite the benchmark in place."""
    from flowalign.eval.geneval import GenEvalConfig, judge_images, run_geneval, write_report
    from flowalign.models import load_model

    old = json.loads((directory / "results.json").read_text())
    settings = dict(old["config"])
    config = GenEvalConfig(**(settings | {"images_per_prompt": tuple(settings["images_per_prompt"])}))
    model = dict(old["model"])
    if lora is not None:
        model["lora"] = str(lora.relative_to(ROOT) if lora.is_absolute() else lora)
    elif model.get("lora") and not (ROOT / model["lora"]).exists():
        raise FileNotFoundError(f"{directory}: its LoRA {model['lora']} is not in this checkout.")
    prompts = _prompts(model)
    if len(prompts) != old["n_prompts"]:
        raise ValueError(f"{directory}: {len(prompts)} prompts now, {old['n_prompts']} when it was made.")
    key = json.dumps(
        {"model": model, "prompts": [p["prompt"] for p in prompts], "config": settings}, sort_keys=True
    )
    entry = cache / hashlib.sha256(key.encode()).hexdigest()[:16] / "images.pt"
    if entry.is_file():
        print(f"{directory}: judging cached images {entry}")
        report = judge_images(torch.load(entry, weights_only=True), prompts, config)
    else:
        print(f"{directory}: regenerating {sum(config.images_per_prompt)} images")
        net = load_model(model["model"], family=model.get("family"))
        if model.get("weights"):
            net.load_weights(ROOT / model["weights"])
        if model.get("lora"):
            net.load_lora(ROOT / model["lora"])
        report = run_geneval(
            net, prompts, images_per_prompt=config.images_per_prompt, steps=config.steps,
            guidance=config.guidance, resolution=config.resolution, seed=config.seed,
            batch_size=config.batch_size, levels=config.levels,
        )  # fmt: skip
        entry.parent.mkdir(parents=True, exist_ok=True)
        torch.save(report.images, entry)
        (entry.parent / "key.json").write_text(key)
    report.model = model
    standard = {"benchmark", "command", "model", "config", "n_prompts", "n_images", "wall_time_s", "summary",
                "stats", "images"}  # fmt: skip
    extra = {k: v for k, v in old.items() if k not in standard} | {"judge": _judge_version()}
    write_report(report, directory, command=old.get("command"), extra=extra)
    return Benchmark(directory, report.images)


def rejudge_evidence(run: Path, cache: Path) -> None:
    summary = json.loads((run / "results.json").read_text())
    lora = next((run / "run" / name for name in ("lora_ema", "lora") if (run / "run" / name).is_dir()), None)
    if lora is None:
        raise FileNotFoundError(f"{run}: no committed LoRA in {run / 'run'} (lora_ema or lora).")
    for e in summary["evaluations"]:
        split, guidance = e["split"], e["guidance"]
        before = rejudge_benchmark(run / benchmark_dir("before", split, guidance), None, cache)
        after = rejudge_benchmark(run / benchmark_dir("after", split, guidance), lora, cache)
        e.update(compare(before, after))
    summary["judge"] = _judge_version()
    (run / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (run / "results.md").write_text(_markdown(summary) + f"\nJudged with {summary['judge']} (re-judged).\n")
    print((run / "results.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="evidence run or benchmark directories")
    parser.add_argument(
        "--images-cache", default="runs/rejudge_images", help="where generated images are kept"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.images_cache)
    for path in map(Path, args.paths):
        if not (path / "results.json").is_file():
            raise SystemExit(f"{path}: no results.json; pass evidence run or benchmark directories.")
        if "evaluations" in json.loads((path / "results.json").read_text()):
            rejudge_evidence(path, cache)
        else:
            rejudge_benchmark(path, None, cache)


if __name__ == "__main__":
    main()
