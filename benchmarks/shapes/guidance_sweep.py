"""The shipped teacher's GenEval accuracy over classifier-free guidance scales (issue 16: the scale a student
is distilled toward, ``dmd.real_guidance``).

For every split, on the balanced benchmark protocol of ``distill_compare.py`` (every task on >= 96 images, the
same per-image noise at every scale): the teacher at ``--steps`` Euler steps and each ``--scales`` value;
GenEval overall with its 95% interval, the paired difference to the ``--reference`` scale (the teacher's
default, 1.5), and diversity (mean pairwise RMS pixel distance within a prompt). Writes ``results.md``,
``results.json``, ``overall.png`` and each scale's per-image verdicts (``{split}/g{scale}``) under ``--out``.

    python benchmarks/shapes/guidance_sweep.py --scales 1.0 1.5 2.0 2.5 3.0 4.0 \\
        --out benchmarks/results/shapes_teacher_guidance
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_evidence import SPLITS, diversity, diversity_cell, write_results  # noqa: E402

from flowalign.eval.geneval import (  # noqa: E402
    balanced_images_per_prompt,
    load_geneval_prompts,
    run_geneval,
    write_report,
)
from flowalign.eval.stats import benchmark_stats, paired_comparison  # noqa: E402
from flowalign.models import load_model  # noqa: E402


def sweep_split(model, prompts, scales, reference, steps, min_images_per_task, out_dir, command, rng) -> dict:
    """Per scale: overall accuracy and interval, the paired difference to ``reference`` and diversity."""
    counts = balanced_images_per_prompt([p["tag"] for p in prompts], min_images_per_task=min_images_per_task)
    reports = {}
    for scale in scales:
        report = run_geneval(
            model, prompts, images_per_prompt=counts, steps=steps, guidance=scale, resolution=32, seed=0,
            batch_size=64, progress=False,
        )  # fmt: skip
        write_report(report, out_dir / f"g{scale:g}", command=command)
        reports[scale] = report
    rows = {}
    for scale, report in reports.items():
        overall = benchmark_stats(report.verdicts).overall
        row = {"overall": overall.estimate, "interval": [overall.low, overall.high],
               "diversity": list(diversity(report, rng))}  # fmt: skip
        if scale != reference:
            d = paired_comparison(reports[reference].verdicts, report.verdicts).overall
            row["minus_reference"] = [d.estimate, d.low, d.high]
        rows[f"{scale:g}"] = row
    return {"images": sum(counts), "prompts": len(prompts), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=float, nargs="+", required=True)
    parser.add_argument("--reference", type=float, default=1.5, help="the scale others are paired with")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--splits", nargs="+", default=["test", "unseen"], choices=sorted(SPLITS))
    parser.add_argument("--min-images-per-task", type=int, default=96)
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts (smoke runs)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(set(args.scales)) != len(args.scales):
        sys.exit(f"--scales: each scale once; got {[f'{s:g}' for s in args.scales]}")
    if args.reference not in args.scales:
        sys.exit(f"--reference {args.reference:g} must be one of --scales {[f'{s:g}' for s in args.scales]}")
    torch.manual_seed(0)
    command = "python " + " ".join(sys.argv)
    model = load_model("shapes")
    rng = np.random.default_rng(0)
    out: dict = {"command": command, "steps": args.steps, "reference": args.reference, "splits": {}}
    lines = [f"# The teacher over guidance scales, {args.steps} Euler steps (shapes world)", "",
             f"Command: `{command}`", ""]  # fmt: skip
    for split in args.splits:
        prompts = load_geneval_prompts(ROOT / SPLITS[split])[: args.max_prompts]
        result = sweep_split(model, prompts, args.scales, args.reference, args.steps, args.min_images_per_task,
                             args.out / split, command, rng)  # fmt: skip
        out["splits"][split] = result
        lines += [
            f"## {split} ({result['prompts']} prompts, {result['images']} images per scale)",
            "",
            f"| guidance | overall [95%] | minus g{args.reference:g} [95%] | diversity [95%] |",
            "|---|---|---|---|",
        ]
        for scale, r in result["rows"].items():
            d = r.get("minus_reference")
            diff = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "—"
            lines.append(f"| {scale} | {r['overall']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] | "
                         f"{diff} | {diversity_cell(r['diversity'])} |")  # fmt: skip
        lines.append("")
    lines.append(
        "Intervals: Wilson per task, stratified bootstrap for the overall; differences are paired bootstraps over "
        "prompts on the same images' seeds. Diversity: mean pairwise RMS pixel distance within a prompt."
    )
    write_results(args.out, out, lines)
    _plot(out, args.out / "overall.png")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for split, result in out["splits"].items():
        scales = [float(s) for s in result["rows"]]
        rows = list(result["rows"].values())
        values = np.array([r["overall"] for r in rows])
        err = [values - [r["interval"][0] for r in rows], [r["interval"][1] for r in rows] - values]
        ax.errorbar(scales, values, yerr=err, marker="o", capsize=3, label=split)
    ax.axvline(out["reference"], color="#aaa", linestyle=":", label=f"default g{out['reference']:g}")
    ax.set_xlabel("classifier-free guidance")
    ax.set_ylabel("GenEval overall (95% interval)")
    ax.set_title(f"Teacher, {out['steps']} Euler steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
