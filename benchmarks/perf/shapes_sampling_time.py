"""Wall time of sampling 16 images with the shipped shapes model at its default settings.

``python benchmarks/perf/shapes_sampling_time.py [--model DIR] [--threads 2] [--repeats 5]``

Times the whole path a user calls -- encode (cache cleared), initial noise, the ODE rollout with
classifier-free guidance, decode -- for 16 prompts of the test split, after one warm-up run, and reports
the median and the minimum over ``--repeats`` runs (the minimum is the least disturbed by other processes
on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flowalign.commands.common import DEFAULT_MODEL
from flowalign.models import load_model
from flowalign.samplers import SamplingPlan, rollout
from flowalign.worlds.shapes import load_prompts

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    steps = args.steps or model.default_steps
    guidance = model.default_guidance if args.guidance is None else args.guidance
    prompts = [m["prompt"] for m in load_prompts(ROOT / "assets/shapes/prompts/test.jsonl")][::8][:16]

    def sample() -> None:
        model._cache.clear()
        noise = model.initial_noise(len(prompts), 32, 32, torch.Generator().manual_seed(0))
        with torch.no_grad():
            cond = model.encode(prompts, cfg=guidance > 1)
            rollout(model, cond, noise, model.schedule(steps), SamplingPlan.ode(steps), guidance=guidance)

    sample()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sample()
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "images": len(prompts), "steps": steps, "guidance": guidance, "threads": args.threads,
                "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                "all_s": [round(t, 3) for t in times],
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
