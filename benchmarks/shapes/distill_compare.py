"""Several few-step students of one teacher side by side on the shapes world (issue 16): f-distill's
divergences against DMD2 on the same budget, a reward-tilted student against the plain one.

For every split, on the balanced benchmark protocol (every test / unseen prompt, every task on >= 96 images,
the same per-image noise for every model): the teacher once (20 steps, guidance 1.5), then each student
(its own step count, guidance ``--student-guidance``, 1.0 by default); GenEval overall with its 95% interval, the paired difference to the
teacher and to the ``--baseline`` student (paired bootstrap over prompts, same seeds), diversity (mean
pairwise RMS pixel distance within a prompt) and the total-variation distance of detected scene statistics
to the teacher's. Writes ``results.md``, ``results.json`` and ``overall.png`` under ``--out``.

    python benchmarks/shapes/distill_compare.py --students dmd2=runs/a/checkpoints/step-000451 \\
        js=runs/b/checkpoints/step-000451 --baseline dmd2 --student-steps 4 --out benchmarks/results/x

A student benchmarked earlier under the same protocol can stand in as a row from its committed per-image
verdicts, ``--stored NAME=DIR`` with ``{split}`` in ``DIR`` (its ``results.json``, e.g.
``benchmarks/results/shapes_dmd_4step_full_regression/{split}/student_4step``), when its checkpoint is gone.
Such a row is paired like the others (same prompts, same per-image seeds); it has no diversity or scene
statistics (its images are not stored). The protocol is checked: the teacher's verdicts regenerated here must
equal the ones stored next to it (``DIR/../teacher``), image for image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_evidence import (  # noqa: E402
    SPLITS,
    diversity,
    diversity_cell,
    full_weights,
    scene_statistics,
    total_variation,
    write_results,
)

from flowalign.eval.geneval import (  # noqa: E402
    balanced_images_per_prompt,
    load_geneval_prompts,
    run_geneval,
    write_report,
)
from flowalign.eval.stats import Verdicts, benchmark_stats, paired_comparison  # noqa: E402
from flowalign.models import load_model  # noqa: E402


def student_model(path: str, base: str = "shapes"):
    """The model ``base`` (the teacher's, or a grown copy of it) with a student's LoRA directory, full fine-tuning checkpoint or weight file
    (``<checkpoint>/trainable_ema.safetensors``) loaded."""
    model = load_model(base)
    if full_weights(path):
        model.load_weights(path)
    else:
        model.load_lora(path)
    return model


def stored_verdicts(path: Path) -> Verdicts:
    """The per-image verdicts of a committed benchmark folder (its ``results.json``)."""
    images = json.loads((path / "results.json").read_text())["images"]
    return Verdicts.from_images(
        [r["prompt_index"] for r in images], [r["tag"] for r in images], [r["correct"] for r in images]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--baseline", required=True, help="the student the others are compared with (paired)")
    parser.add_argument("--student-steps", type=int, required=True)
    parser.add_argument(
        "--student-guidance", type=float, default=1.0, help="the students' CFG scale (default 1.0: CFG-free)"
    )
    parser.add_argument(
        "--student-sigmas", type=float, nargs="+", default=None,
        help="the students' own noise levels (sampling.sigmas of their training), one per step",
    )  # fmt: skip
    parser.add_argument(
        "--student-model", default="shapes",
        help="the model the students' weights belong to (a grown student: benchmarks/shapes/grow_student.py)",
    )  # fmt: skip
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--teacher-guidance", type=float, default=1.5)
    parser.add_argument("--splits", nargs="+", default=["test", "unseen"], choices=sorted(SPLITS))
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts (smoke runs)")
    parser.add_argument(
        "--min-images-per-task", type=int, default=96, help="images per task at least (the balanced protocol)"
    )
    parser.add_argument(
        "--stored", nargs="*", default=[], metavar="NAME=DIR",
        help="students benchmarked earlier, from their committed verdicts (DIR with {split}; module docstring)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if any("=" not in spec for spec in args.students):
        sys.exit(f"--students takes NAME=PATH pairs, got {args.students}")
    students = dict(spec.split("=", 1) for spec in args.students)
    if any("=" not in spec or "{split}" not in spec for spec in args.stored):
        sys.exit(f"--stored takes NAME=DIR pairs with {{split}} in DIR, got {args.stored}")
    stored = dict(spec.split("=", 1) for spec in args.stored)
    if set(stored) & (set(students) | {"teacher"}):
        sys.exit(
            f"--stored: names {sorted(stored)} must differ from the teacher's and --students' {sorted(students)}"
        )
    if "teacher" in students:
        sys.exit("--students: 'teacher' names the teacher's row; call the student something else")
    if args.student_sigmas is not None and len(args.student_sigmas) != args.student_steps:
        sys.exit(f"--student-sigmas: {args.student_steps} steps need {args.student_steps} sigmas")
    if args.baseline not in students and args.baseline not in stored:
        sys.exit(
            f"--baseline {args.baseline!r} is not one of --students / --stored {sorted(students | stored)}"
        )
    torch.manual_seed(0)
    command = "python " + " ".join(sys.argv)
    out: dict = {"command": command, "students": students, "splits": {}}
    lines = [f"# {args.student_steps}-step students of one teacher, side by side (shapes world)", "",
             f"Command: `{command}`", ""]  # fmt: skip
    teacher = load_model("shapes")
    models = {name: student_model(path, args.student_model) for name, path in students.items()}
    for split in args.splits:
        prompts = load_geneval_prompts(ROOT / SPLITS[split])[: args.max_prompts]
        counts = balanced_images_per_prompt(
            [p["tag"] for p in prompts], min_images_per_task=args.min_images_per_task
        )
        reports = {}
        runs = {"teacher": (teacher, args.teacher_steps, args.teacher_guidance)}
        runs.update(
            {name: (model, args.student_steps, args.student_guidance) for name, model in models.items()}
        )
        for name, (model, steps, guidance) in runs.items():
            report = run_geneval(
                model, prompts, images_per_prompt=counts, steps=steps, guidance=guidance, resolution=32, seed=0,
                batch_size=64, progress=False, levels=None if name == "teacher" else args.student_sigmas,
            )  # fmt: skip
            path = students.get(name)
            kind = "weights" if path and full_weights(path) else "lora"
            report.model = {"model": "shapes", kind: path} if path else {"model": "shapes"}
            write_report(report, args.out / split / name, command=command)
            reports[name] = report
        verdicts = {name: report.verdicts for name, report in reports.items()}
        stored_steps = {}  # a stored row's own step count (a 4-step source beside 1-step students)
        for name, folder in stored.items():
            folder = Path(folder.format(split=split))
            teacher_then = stored_verdicts(folder.parent / "teacher")
            if not np.array_equal(teacher_then.correct, verdicts["teacher"].correct):
                sys.exit(f"--stored {name}: the teacher's verdicts in {folder.parent / 'teacher'} differ from the "
                         "ones regenerated here: a different protocol or judge, so its rows cannot be paired")  # fmt: skip
            verdicts[name] = stored_verdicts(folder)
            stored_steps[name] = json.loads((folder / "results.json").read_text())["config"]["steps"]
        rng = np.random.default_rng(0)
        teacher_stats = scene_statistics(reports["teacher"].records)
        rows = {}
        for name, verdict in verdicts.items():
            s = benchmark_stats(verdict).overall
            row = {"steps": runs[name][1] if name in runs else stored_steps[name], "overall": s.estimate,
                   "interval": [s.low, s.high], "stored": stored.get(name)}  # fmt: skip
            if name in reports:
                row["diversity"] = diversity(reports[name], rng)
                stats = scene_statistics(reports[name].records)
                row["tv_to_teacher"] = {k: total_variation(teacher_stats[k], stats[k]) for k in stats}
            for other, key in (("teacher", "minus_teacher"), (args.baseline, "minus_baseline")):
                if name != other and (other == "teacher" or name != "teacher"):
                    d = paired_comparison(verdicts[other], verdict).overall
                    row[key] = [d.estimate, d.low, d.high]
            rows[name] = row
        out["splits"][split] = rows
        lines += [
            f"## {split} ({len(prompts)} prompts, {sum(counts)} images per model)",
            "",
            f"| model | steps | overall [95%] | minus teacher [95%] | minus {args.baseline} [95%] | diversity [95%] | TV objects / colour / shape / cell |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            cell = lambda v: f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" if v else "—"  # noqa: E731
            tv = r.get("tv_to_teacher")
            tv = (
                f"{tv['objects']:.3f} / {tv['color']:.3f} / {tv['shape']:.3f} / {tv['cell']:.3f}"
                if tv
                else "— (stored)"
            )
            spread = diversity_cell(r["diversity"]) if "diversity" in r else "— (stored)"
            lines.append(
                f"| {name} | {r['steps']} | {r['overall']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] "
                f"| {cell(r.get('minus_teacher'))} | {cell(r.get('minus_baseline'))} | {spread} | {tv} |"
            )
        lines.append("")
    lines += [
        "Intervals: Wilson per task, stratified bootstrap for the overall; differences are paired bootstraps over "
        "prompts on the same images' seeds. Diversity: mean pairwise RMS pixel distance within a prompt. TV: "
        "total-variation distance to the teacher's distribution of detected objects per image and of each "
        "object's colour, shape and 3x3 cell.",
    ]
    write_results(args.out, out, lines)
    _plot(out, args.out / "overall.png")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(out["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        rows = out["splits"][split]
        names = list(rows)
        values = [rows[n]["overall"] for n in names]
        low = [rows[n]["overall"] - rows[n]["interval"][0] for n in names]
        high = [rows[n]["interval"][1] - rows[n]["overall"] for n in names]
        ax.bar(names, values, yerr=[low, high], capsize=4, color=["#888"] + ["#4a7"] * (len(names) - 1))
        ax.set_title(f"{split}: GenEval overall, 95% interval")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
