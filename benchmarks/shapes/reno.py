"""ReNO on the shapes world: GenEval-style accuracy of the best iterate after 0, 10, 25 and 50 iterations,
on the teacher and, with ``--student``, on a distilled few-step student (ReNO's original setting: a
one-step generator) side by side.

The frozen model samples with few steps; the initial noise of each test prompt is optimized for a
differentiable reward (``shapes_match`` by default) with ReNO's settings (SGD lr 5, Nesterov 0.9,
gradient-norm clip 0.1, chi-norm regularizer 0.01). The exact GenEval judge (shapes detector) scores the
best-so-far images at each checkpoint.

``--min-images-per-task N`` optimizes several noises per prompt (image ``j`` of prompt ``i`` starts from the
noise of ``flowalign bench``'s image ``j``) so that every task has at least ``N`` images, as the balanced
benchmark does; by default each prompt has one.

Seconds are the wall time of the optimization alone (not the judging), per image (one optimized noise).
The models take turns batch by batch in one process, from the same prompts and initial noises, so machine
load falls on both alike. The seconds at a checkpoint ``k`` are ``k / iterations`` of the total, each
iteration costing the same (one rollout with gradient, and a backward pass except the last).

    python benchmarks/shapes/reno.py --out benchmarks/results/shapes_reno
    python benchmarks/shapes/reno.py --steps 4 --guidance 1.5 \\
        --student runs/dmd_shapes_1step/checkpoints/step-000600 --student-steps 1 --min-images-per-task 32 \\
        --out bench/reno_1step
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    """One model under ReNO: its name, adapter, steps and guidance, and what it gathered."""

    name: str
    model: object
    steps: int
    guidance: float
    verdicts: dict[int, list] = field(default_factory=dict)
    before_after: list = field(default_factory=list)
    seconds: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument(
        "--student", default=None,
        help="a distilled student (checkpoint of a full fine-tuning run, or a LoRA directory), optimized alongside",
    )  # fmt: skip
    parser.add_argument("--student-steps", type=int, default=1)
    parser.add_argument("--student-guidance", type=float, default=1.0)
    parser.add_argument(
        "--min-images-per-task", type=int, default=0,
        help="images per prompt so that every task has at least this many (flowalign bench's balanced protocol; "
        "0: one image per prompt)",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--reward", action="append", default=None, metavar="NAME[=WEIGHT]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from torchvision.utils import save_image

    from flowalign.algorithms.noise_opt import optimize_noise
    from flowalign.eval.geneval import balanced_images_per_prompt, image_seed
    from flowalign.eval.stats import Verdicts, benchmark_stats, paired_comparison
    from flowalign.models import load_model
    from flowalign.samplers import SamplingPlan, generate, seeded_generators
    from flowalign.worlds.shapes import load_prompts
    from rewards import WeightedReward
    from rewards.geneval import evaluate, summarize
    from rewards.shapes import detect_batch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(args.model)
    guidance = teacher.default_guidance if args.guidance is None else args.guidance
    runs = [Run("teacher", teacher, args.steps, guidance)]
    if args.student:
        from distill_compare import student_model  # benchmarks/shapes: the student on its teacher's model

        student = student_model(args.student, base=args.model)
        runs.append(Run("student", student, args.student_steps, args.student_guidance))
    reward = WeightedReward.from_specs(args.reward or ["shapes_match=1"], {})
    prompts = load_prompts(ROOT / "assets" / "shapes" / "prompts" / f"{args.split}.jsonl")[: args.max_prompts]
    checkpoints = tuple(k for k in (0, 10, 25, 50) if k <= args.iterations)
    for run in runs:
        run.verdicts = {k: [] for k in checkpoints}
    counts = balanced_images_per_prompt(
        [p["tag"] for p in prompts], images_per_prompt=1, min_images_per_task=args.min_images_per_task
    )
    jobs = [(i, j) for i, count in enumerate(counts) for j in range(count)]  # prompt-major
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        chunk = [prompts[i] for i, _ in batch]
        texts = [p["prompt"] for p in chunk]

        def reward_fn(images, texts=texts, chunk=chunk):
            return reward(images, texts, chunk).scores

        for run in runs:  # the models take turns on each batch, from the same initial noise
            model = run.model
            cond = model.encode(texts, cfg=run.guidance > 1)
            gens = seeded_generators([image_seed(args.seed, i, j) for i, j in batch], model.device)
            noise = model.initial_noise(len(chunk), model.default_resolution, model.default_resolution, gens)
            plan = SamplingPlan.build(run.steps, sde="none", grad="all", checkpoint=False)

            def generate_from(z, model=model, cond=cond, plan=plan, run=run):
                out = generate(model, None, z, cond=cond, steps=run.steps, guidance=run.guidance, plan=plan)
                return out.images

            began = time.perf_counter()
            result = optimize_noise(
                generate_from, reward_fn, noise, iterations=args.iterations, snapshot_at=checkpoints
            )
            run.seconds += time.perf_counter() - began
            for k in checkpoints:
                detections = detect_batch(result.snapshots[k])
                run.verdicts[k] += [evaluate(d, meta) for d, meta in zip(detections, chunk)]
            run.before_after.append(
                torch.stack([result.initial_images, result.best_images], dim=1).flatten(0, 1)
            )

    # 95% intervals (flowalign.eval.stats); the paired differences are against the same
    # model's initial noise (iteration 0) and, with a student, student minus teacher on the same prompts.
    def judged(run: Run, k: int) -> Verdicts:
        v = run.verdicts[k]
        return Verdicts.from_images([i for i, _ in jobs], [r.tag for r in v], [r.correct for r in v])

    command = "python benchmarks/shapes/reno.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict = {
        "command": command, "prompts": len(prompts), "images": len(jobs), "iterations": args.iterations, "runs": {}
    }  # fmt: skip
    lines = [f"Command: `{command}`", "", f"{len(prompts)} {args.split} prompts, {len(jobs)} images, {args.iterations} "
             "iterations. Seconds: optimization wall time per image (not the judging), the models taking turns "
             "batch by batch in one process.", ""]  # fmt: skip
    for run in runs:
        summaries = {k: summarize(v) for k, v in run.verdicts.items()}
        stats = {k: benchmark_stats(judged(run, k)) for k in checkpoints}
        gains = {k: paired_comparison(judged(run, 0), judged(run, k)) for k in checkpoints if k}
        per_iteration = run.seconds / len(jobs) / args.iterations
        per_second = {k: g.overall.estimate / (k * per_iteration) for k, g in gains.items()}
        save_image(torch.cat(run.before_after)[:64], out / f"before_after_{run.name}.png", nrow=8, padding=1)
        results["runs"][run.name] = {
            "steps": run.steps,
            "guidance": run.guidance,
            "seconds_per_image": run.seconds / len(jobs),
            "accuracy": {
                k: {"overall": s.overall, "tasks": s.task_accuracy, "stats": stats[k].as_json()}
                for k, s in summaries.items()
            },
            "gain_over_iteration_0": {k: g.as_json() for k, g in gains.items()},
            "gain_per_second": per_second,
        }
        tasks = list(summaries[0].task_accuracy)
        lines += [f"## {run.name}: {run.steps} steps, guidance {run.guidance}; "
                  f"{run.seconds / len(jobs):.2f} s per image for {args.iterations} iterations", "",
                  "| iterations | seconds per image | overall [95%] | gain over iteration 0 [paired 95%] | "
                  "gain per second | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 5) + "|"]  # fmt: skip
        for k, s in summaries.items():
            o = stats[k].overall
            gain = rate = ""
            if k:
                g = gains[k].overall
                gain, rate = f"{g.estimate:+.3f} [{g.low:+.3f}, {g.high:+.3f}]", f"{per_second[k]:+.4f}"
            lines.append(
                f"| {k} | {k * per_iteration:.2f} | {s.overall:.3f} [{o.low:.3f}, {o.high:.3f}] | {gain} | "
                f"{rate} | " + " | ".join(f"{s.task_accuracy[t]:.3f}" for t in tasks) + " |"
            )
        lines.append("")
    if args.student:
        teacher_run, student_run = runs
        lines += ["## Student minus teacher, same prompts and initial noise [paired 95%]", "",
                  "| iterations | student minus teacher |", "|---|---|"]  # fmt: skip
        results["student_minus_teacher"] = {}
        for k in checkpoints:
            d = paired_comparison(judged(teacher_run, k), judged(student_run, k))
            results["student_minus_teacher"][k] = d.as_json()
            lines.append(f"| {k} | {d.overall.estimate:+.3f} [{d.overall.low:+.3f}, {d.overall.high:+.3f}] |")
        lines += ["", f"The student's iteration costs {student_run.seconds / teacher_run.seconds:.3f} of the "
                  "teacher's.", ""]  # fmt: skip
    lines.append(benchmark_stats(judged(runs[0], 0)).method)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
