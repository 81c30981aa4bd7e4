"""Does a one-step student that fits the teacher's map make the teacher's scenes? Judged on the regression pairs.

The regression probe (``regression_probe.py``) fits its training pairs to MSE 0.017 while its held-out error stays
near 0.06, and it scores 0.18 below the teacher on test. This asks which of the two matters: on the probe's cached
pair sets (``pairs_train``, the noises the student was fitted on; ``pairs_heldout_train``, other noises of the
same prompts; ``pairs_heldout_test``), the exact GenEval judge scores the pairs' targets (the teacher's samples at
20 steps and guidance 1.5, or those of the probe's ``--source``) and each student's one-step sample from the very
same noise. If a student is near the targets on its training noises and far on held-out ones, fitting the map
closely would make correct scenes and what is missing is generalisation over noise (more pairs); if it is far on
both, squared error is the wrong fit.

Per pair set and student: overall accuracy with its 95% interval (the stratified bootstrap over prompts of
``flowalign.eval.stats``), the paired difference to the pairs' targets (same prompts and noises), and the
student's MSE and ``shapes_lpips`` distance (``flowalign.algorithms.perceptual``, on the unclamped images, as
``regression_probe.py --loss shapes_lpips`` trains it) to them. Every pair set of the folder is judged (an
``--online`` probe has no ``pairs_train``).
Writes ``results.md`` and ``results.json`` under ``--out``.

    python benchmarks/shapes/pair_accuracy.py --pairs runs/ev/regression_probe --count 1024 \\
        --students regression=runs/ev/regression_probe/step-008000 --out benchmarks/results/x
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_compare import student_model  # noqa: E402
from regression_probe import PROMPTS, pixels, student_samples  # noqa: E402

from flowalign.algorithms.perceptual import ShapesLPIPS  # noqa: E402
from flowalign.eval.geneval import GenEvalConfig, judge_images  # noqa: E402
from flowalign.eval.stats import Verdicts, benchmark_stats, paired_comparison  # noqa: E402
from flowalign.worlds.shapes import load_prompts  # noqa: E402

SETS = {
    "train": ("train", "the noises it was fitted on"),
    "heldout_train": ("train", "other noises of the training prompts"),
    "heldout_test": ("test", "noises of the test prompts"),
}


def load_pairs(folder: Path, name: str, count: int) -> dict:
    """The first ``count`` pairs of ``folder/pairs_<name>``, reordered prompt-major (what the judge's statistics
    need), with their prompts' records."""
    saved = load_file(str(folder / f"pairs_{name}.safetensors"))
    prompts = json.loads((folder / f"pairs_{name}.json").read_text())["prompts"][:count]
    split = SETS[name][0]
    records = {r["prompt"]: (i, r) for i, r in enumerate(load_prompts(PROMPTS / f"{split}.jsonl"))}
    missing = sorted({p for p in prompts if p not in records})
    if missing:
        sys.exit(
            f"{folder}/pairs_{name}.json: {len(missing)} prompts not in the {split} split, e.g. {missing[0]!r}"
        )
    order = sorted(range(len(prompts)), key=lambda k: (records[prompts[k]][0], k))
    return {
        "prompts": [prompts[k] for k in order],
        "meta": [records[prompts[k]][1] for k in order],
        "prompt_index": [records[prompts[k]][0] for k in order],
        "noise": saved["noise"][:count][order],
        "targets": saved["targets"][:count][order],
    }


def judged(images: torch.Tensor, pairs: dict) -> Verdicts:
    """The exact GenEval judge's verdicts on prompt-major ``images`` of the pairs (:func:`judge_images`)."""
    records = list(dict.fromkeys(pairs["prompt_index"]))  # the prompts in order, each once
    counts = tuple(pairs["prompt_index"].count(i) for i in records)
    metas = {i: m for i, m in zip(pairs["prompt_index"], pairs["meta"], strict=True)}
    return judge_images(images, [metas[i] for i in records], GenEvalConfig(images_per_prompt=counts)).verdicts


def interval(iv, spec: str = "+.3f") -> str:
    return f"{iv.estimate:{spec}} [{iv.low:{spec}}, {iv.high:{spec}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, required=True, help="a regression_probe.py --out folder")
    parser.add_argument("--count", type=int, default=1024, help="pairs judged per set (the first ones)")
    parser.add_argument("--students", nargs="+", required=True, metavar="NAME=WEIGHTS")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if any("=" not in spec for spec in args.students):
        sys.exit(f"--students takes NAME=WEIGHTS pairs, got {args.students}")
    present = [name for name in SETS if (args.pairs / f"pairs_{name}.safetensors").is_file()]
    if not present:
        sys.exit(f"--pairs {args.pairs}: no pairs_*.safetensors of regression_probe.py there")
    made = json.loads((args.pairs / f"pairs_{present[0]}.json").read_text())
    source = f"{made.get('source', 'the teacher')}, {made['steps']} steps, guidance {made['guidance']}"
    args.out.mkdir(parents=True, exist_ok=True)
    students = {name: student_model(path) for name, path in (s.split("=", 1) for s in args.students)}
    perceptual = ShapesLPIPS()
    command = "python benchmarks/shapes/pair_accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict = {"command": command, "source": source, "sets": {}}
    lines = [f"Command: `{command}`", "", f"The pairs' targets: {source}.", ""]
    for name in present:
        pairs = load_pairs(args.pairs, name, args.count)
        decode = next(iter(students.values())).decode
        targets = judged(decode(pairs["targets"].float()), pairs)
        target_stats = benchmark_stats(targets)
        rows = {"targets": {"overall": target_stats.overall.as_json()}}
        lines += [
            f"## `pairs_{name}`: {len(pairs['prompts'])} pairs, {SETS[name][1]}",
            "",
            "| model | overall [95%] | minus the targets, paired [95%] | MSE to them | shapes_lpips to them |",
            "|---|---|---|---|---|",
            f"| the pairs' targets | {interval(target_stats.overall, '.3f')} | — | 0 | 0 |",
        ]
        for student, model in students.items():
            latents = student_samples(model, pairs["prompts"], pairs["noise"])
            mse = F.mse_loss(latents, pairs["targets"].float()).item()
            with torch.no_grad():
                lpips = perceptual(pixels(model, latents), pixels(model, pairs["targets"])).mean().item()
            verdicts = judged(model.decode(latents), pairs)
            stats = benchmark_stats(verdicts)
            diff = paired_comparison(targets, verdicts).overall
            rows[student] = {
                "overall": stats.overall.as_json(),
                "minus_targets": diff.as_json(True),
                "mse": mse,
                "shapes_lpips": lpips,
            }
            row = f"{interval(stats.overall, '.3f')} | {interval(diff)} | {mse:.3f} | {lpips:.3f}"
            lines.append(f"| {student} (1 step) | {row} |")
            print(f"{name} {student}: {row}", flush=True)
        results["sets"][name] = rows
        lines.append("")
    lines.append(target_stats.method)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
