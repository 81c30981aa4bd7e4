"""ReNO on the shapes world: GenEval-style accuracy of the best iterate after 0, 10, 25 and 50 iterations.

The frozen shapes model samples with few steps; the initial noise of each test prompt is optimized for a
differentiable reward (``shapes_match`` by default) with ReNO's settings (SGD lr 5, Nesterov 0.9,
gradient-norm clip 0.1, chi-norm regularizer 0.01). The exact GenEval judge (shapes detector) scores the
best-so-far images at each checkpoint; seconds per prompt are wall time on this machine.

    python benchmarks/shapes/reno.py --out benchmarks/results/shapes_reno
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--reward", action="append", default=None, metavar="NAME[=WEIGHT]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from torchvision.utils import save_image

    from flowalign.algorithms.noise_opt import optimize_noise
    from flowalign.models import load_model
    from flowalign.samplers import SamplingPlan, generate, seeded_generators
    from flowalign.worlds.shapes import load_prompts
    from rewards import WeightedReward
    from rewards.geneval import evaluate, summarize
    from rewards.shapes import detect_batch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    reward = WeightedReward.from_specs(args.reward or ["shapes_match=1"], {})
    prompts = load_prompts(ROOT / "assets" / "shapes" / "prompts" / f"{args.split}.jsonl")[: args.max_prompts]
    guidance = model.default_guidance if args.guidance is None else args.guidance
    checkpoints = tuple(k for k in (0, 10, 25, 50) if k <= args.iterations)
    verdicts: dict[int, list] = {k: [] for k in checkpoints}
    before_after = []
    started = time.time()
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        texts = [p["prompt"] for p in chunk]
        cond = model.encode(texts, cfg=guidance > 1)
        gens = seeded_generators([args.seed * 100_003 + start + i for i in range(len(chunk))], model.device)
        noise = model.initial_noise(len(chunk), model.default_resolution, model.default_resolution, gens)
        plan = SamplingPlan.build(args.steps, sde="none", grad="all", checkpoint=False)

        def generate_from(z, cond=cond, plan=plan):
            return generate(model, None, z, cond=cond, steps=args.steps, guidance=guidance, plan=plan).images

        def reward_fn(images, texts=texts, chunk=chunk):
            return reward(images, texts, chunk).scores

        result = optimize_noise(
            generate_from, reward_fn, noise, iterations=args.iterations, snapshot_at=checkpoints
        )
        for k in checkpoints:
            detections = detect_batch(result.snapshots[k])
            verdicts[k] += [evaluate(d, meta) for d, meta in zip(detections, chunk)]
        before_after.append(torch.stack([result.initial_images, result.best_images], dim=1).flatten(0, 1))
    seconds = time.time() - started
    summaries = {k: summarize(v) for k, v in verdicts.items()}
    # 95% intervals (flowalign.eval.stats): one image per prompt; the paired difference is against the
    # initial noise (iteration 0) of the same prompts.
    from flowalign.eval.stats import Verdicts, benchmark_stats, paired_comparison

    judged = {
        k: Verdicts.from_images(list(range(len(v))), [r.tag for r in v], [r.correct for r in v])
        for k, v in verdicts.items()
    }
    stats = {k: benchmark_stats(v) for k, v in judged.items()}
    gains = {k: paired_comparison(judged[0], v) for k, v in judged.items() if k}
    save_image(torch.cat(before_after)[:64], out / "before_after.png", nrow=8, padding=1)
    command = "python benchmarks/shapes/reno.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = {
        "command": command,
        "prompts": len(prompts),
        "steps": args.steps,
        "guidance": guidance,
        "seconds_per_prompt": seconds / len(prompts),
        "accuracy": {
            k: {
                "overall": s.overall,
                "images": s.image_accuracy,
                "tasks": s.task_accuracy,
                "stats": stats[k].as_json(),
            }
            for k, s in summaries.items()
        },
        "gain_over_iteration_0": {k: g.as_json() for k, g in gains.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    tasks = list(summaries[0].task_accuracy)
    lines = [f"Command: `{command}`", "", f"{len(prompts)} {args.split} prompts, {args.steps} sampling steps, guidance {guidance}; "
             f"{seconds / len(prompts):.1f} s per prompt ({args.iterations} iterations) on this machine.", "",
             "| iterations | overall [95% CI] | gain over iteration 0 [paired 95% CI] | " + " | ".join(tasks) + " |",
             "|---" * (len(tasks) + 3) + "|"]  # fmt: skip
    for k, s in summaries.items():
        o = stats[k].overall
        gain = (
            f"{gains[k].overall.estimate:+.3f} [{gains[k].overall.low:+.3f}, {gains[k].overall.high:+.3f}]"
            if k
            else ""
        )
        lines.append(
            f"| {k} | {s.overall:.3f} [{o.low:.3f}, {o.high:.3f}] | {gain} | "
            + " | ".join(f"{s.task_accuracy[t]:.3f}" for t in tasks)
            + " |"
        )
    lines += ["", stats[0].method]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
