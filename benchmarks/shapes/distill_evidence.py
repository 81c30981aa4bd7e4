"""Evidence for a distilled few-step student on the shapes world (issue 16): accuracy, speed, diversity and
distribution matching against its teacher.

For every split, on the balanced benchmark protocol (every test / unseen prompt, every task on >= 96
images, the same per-image noise for every model):

- the **teacher** at its default sampling (20 steps, guidance 1.5, the guidance it scores best with), the
  teacher sampled with the student's step count (Euler, at guidance 1.0 and 1.5), and the **student**
  (its LoRA, its step count, guidance 1.0);
- GenEval accuracy per task and overall with 95% intervals, and the paired differences student - teacher
  and student - teacher-at-K-steps with their paired-bootstrap intervals (same prompts and seeds);
- **diversity**: the mean pairwise RMS pixel distance between the images of one prompt, averaged over the
  prompts (collapse onto one image per prompt would drive it to 0), with a bootstrap interval over prompts;
- **distribution matching**: total-variation distance between the teacher's and each model's distribution
  of detected scene statistics (objects per image; colour, shape and 3x3 position cell of each detected
  object), pooled over the split;
- **speed**: seconds per image of the teacher (20 steps, CFG) and the student (K steps, no CFG), measured
  alternately in this one process on the same batch, median of ``--timing-repeats``.

    python benchmarks/shapes/distill_evidence.py --student runs/dmd4/lora --student-steps 4 \\
        --out benchmarks/results/shapes_dmd_4step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flowalign.eval.geneval import (  # noqa: E402
    balanced_images_per_prompt,
    load_geneval_prompts,
    run_geneval,
    write_report,
)
from flowalign.eval.stats import paired_comparison  # noqa: E402
from flowalign.models import load_model  # noqa: E402
from flowalign.samplers import generate, seeded_generators  # noqa: E402

SPLITS = {"test": "assets/shapes/prompts/test.jsonl", "unseen": "assets/shapes/prompts/unseen.jsonl"}


def scene_statistics(records) -> dict[str, Counter]:
    """Histograms of what the detector saw: objects per image, and colour, shape and 3x3 cell per object."""
    stats = {"objects": Counter(), "color": Counter(), "shape": Counter(), "cell": Counter()}
    for r in records:
        stats["objects"][len(r.detections)] += 1
        for d in r.detections:
            x0, y0, x1, y1 = d.bbox
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            stats["color"][d.color] += 1
            stats["shape"][d.class_name] += 1
            stats["cell"][(min(int(cy // (32 / 3)), 2), min(int(cx // (32 / 3)), 2))] += 1
    return stats


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    if na == 0 or nb == 0:
        return 1.0 if na != nb else 0.0
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def diversity(report, rng: np.random.Generator, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean over prompts of the mean pairwise RMS pixel distance within the prompt; 95% bootstrap over prompts."""
    images = report.images.flatten(1).double()
    per_prompt = []
    start = 0
    for count in report.config.images_per_prompt:
        block = images[start : start + count]
        start += count
        if count < 2:
            continue
        d = torch.cdist(block, block) / block.shape[1] ** 0.5
        per_prompt.append(float(d.sum() / (count * (count - 1))))
    values = np.array(per_prompt)
    boots = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    return float(values.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def diversity_cell(diversity) -> str:
    """``estimate [low, high]`` of :func:`diversity`'s bootstrap, for a markdown table."""
    return f"{diversity[0]:.4f} [{diversity[1]:.4f}, {diversity[2]:.4f}]"


def seconds_per_image(model, prompts, steps, guidance, context, repeats, batch=64):
    """Wall seconds per image of ``repeats`` sampling calls of ``batch`` images within ``context()``."""
    times = []
    for _ in range(repeats):
        gens = seeded_generators(range(batch), model.device)
        with torch.no_grad(), context():
            start = time.perf_counter()
            generate(model, prompts[:batch], gens, steps=steps, guidance=guidance, resolution=32)
            times.append((time.perf_counter() - start) / batch)
    return times


def full_weights(path: str | Path) -> bool:
    """Whether ``path`` is a full fine-tuning checkpoint (``trainable.safetensors`` inside) or one of its
    weight files (e.g. ``trainable_ema.safetensors``), rather than a LoRA directory."""
    path = Path(path)
    return path.suffix == ".safetensors" or (path / "trainable.safetensors").is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--student",
        required=True,
        help="the student's LoRA directory, or a checkpoint of full fine-tuning (lora_rank 0)",
    )
    parser.add_argument("--student-steps", type=int, required=True)
    parser.add_argument("--student-guidance", type=float, default=1.0)
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--teacher-guidance", type=float, default=1.5)
    parser.add_argument("--splits", nargs="+", default=["test", "unseen"], choices=sorted(SPLITS))
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts (smoke runs)")
    parser.add_argument("--min-images-per-task", type=int, default=96)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("shapes")
    student_path = Path(args.student)
    if full_weights(student_path):  # full fine-tuning: the base is the teacher
        teacher_model = load_model("shapes")
        model.load_weights(student_path)
    else:
        model.load_lora(args.student)
        teacher_model = None

    def teaching():
        """The teacher: the base model (the student's LoRA disabled, or the untouched copy)."""
        return model.reference() if teacher_model is None else contextlib.nullcontext()

    out: dict = {"command": "python " + " ".join(sys.argv), "splits": {}}
    k = args.student_steps
    runs = {
        "teacher": (args.teacher_steps, args.teacher_guidance, False),
        f"teacher_{k}step_g1.0": (k, 1.0, False),
        f"teacher_{k}step_g{args.teacher_guidance}": (k, args.teacher_guidance, False),
        f"student_{k}step": (k, args.student_guidance, True),
    }
    lines = [
        f"# A {k}-step DMD student against its teacher (shapes world)",
        "",
        f"Command: `{out['command']}`",
        "",
    ]
    for split in args.splits:
        prompts = load_geneval_prompts(ROOT / SPLITS[split])[: args.max_prompts]
        counts = balanced_images_per_prompt(
            [p["tag"] for p in prompts], min_images_per_task=args.min_images_per_task
        )
        reports = {}
        for name, (steps, guidance, student) in runs.items():
            with contextlib.nullcontext() if student else teaching():
                report = run_geneval(
                    model if student or teacher_model is None else teacher_model, prompts, images_per_prompt=counts, steps=steps, guidance=guidance, resolution=32,
                    seed=0, batch_size=64, progress=False,
                )  # fmt: skip
            report.model = {"model": "shapes", "lora": args.student if student else None}
            write_report(report, args.out / split / name, command=out["command"])
            reports[name] = report
        teacher = reports["teacher"]
        teacher_stats = scene_statistics(teacher.records)
        rng = np.random.default_rng(0)
        rows = {}
        for name, report in reports.items():
            s = report.stats.overall
            row = {"overall": report.summary.overall, "interval": [s.low, s.high]}
            row["diversity"] = diversity(report, rng)
            stats = scene_statistics(report.records)
            row["tv_to_teacher"] = {key: total_variation(teacher_stats[key], stats[key]) for key in stats}
            if name != "teacher":
                diff = paired_comparison(teacher.verdicts, report.verdicts)
                row["minus_teacher"] = [diff.overall.estimate, diff.overall.low, diff.overall.high]
            rows[name] = row
        student_name = f"student_{k}step"
        rows[student_name]["minus_teacher_same_steps"] = {}
        for name in runs:  # the teacher at the student's step count, at each guidance
            if name.startswith(f"teacher_{k}step"):
                diff = paired_comparison(reports[name].verdicts, reports[student_name].verdicts)
                rows[student_name]["minus_teacher_same_steps"][name] = [
                    diff.overall.estimate, diff.overall.low, diff.overall.high,
                ]  # fmt: skip
        out["splits"][split] = rows
        lines += [
            f"## {split} ({len(prompts)} prompts, {sum(counts)} images per model)",
            "",
            "| model | steps | guidance | overall [95%] | minus teacher [95%] | diversity [95%] | TV objects / colour / shape / cell |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, (steps, guidance, _) in runs.items():
            r = rows[name]
            minus = r.get("minus_teacher")
            minus_text = f"{minus[0]:+.3f} [{minus[1]:+.3f}, {minus[2]:+.3f}]" if minus else "—"
            tv = r["tv_to_teacher"]
            lines.append(
                f"| {name} | {steps} | {guidance} | {r['overall']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] "
                f"| {minus_text} | {diversity_cell(r['diversity'])} "
                f"| {tv['objects']:.3f} / {tv['color']:.3f} / {tv['shape']:.3f} / {tv['cell']:.3f} |"
            )
        lines.append("")
        for name, same in rows[student_name]["minus_teacher_same_steps"].items():
            lines.append(f"- Student minus {name} (paired): {same[0]:+.3f} [{same[1]:+.3f}, {same[2]:+.3f}].")
        lines.append("")
    prompts = [p["prompt"] for p in load_geneval_prompts(ROOT / SPLITS["test"])] * 2
    teacher_times, student_times = [], []
    for _ in range(args.timing_repeats):  # alternate, so that machine load hits both alike
        teacher_times += seconds_per_image(
            teacher_model or model, prompts, args.teacher_steps, args.teacher_guidance, teaching, 1
        )
        student_times += seconds_per_image(
            model, prompts, k, args.student_guidance, contextlib.nullcontext, 1
        )
    t, s = statistics.median(teacher_times), statistics.median(student_times)
    out["timing"] = {"teacher_s_per_image": teacher_times, "student_s_per_image": student_times, "speedup": t / s,
                     "threads": torch.get_num_threads()}  # fmt: skip
    lines += [
        "## Speed",
        "",
        f"Seconds per image, batch 64, median of {args.timing_repeats} alternating runs in one process "
        f"({torch.get_num_threads()} torch threads): teacher ({args.teacher_steps} steps, CFG "
        f"{args.teacher_guidance}) {t * 1e3:.2f} ms, student ({k} steps, guidance {args.student_guidance}) "
        f"{s * 1e3:.2f} ms: **{t / s:.1f}x faster**.",
        "",
        "Diversity: mean pairwise RMS pixel distance between the images of one prompt (95% bootstrap over prompts). "
        "TV: total-variation distance to the teacher's distribution of detected objects per image, and of the "
        "colour, shape and 3x3 position cell of each detected object.",
    ]
    write_results(args.out, out, lines)


def write_results(folder: Path, out: dict, lines: list[str]) -> None:
    """``results.json`` (``out``) and ``results.md`` (``lines``) under ``folder``; the table is printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
