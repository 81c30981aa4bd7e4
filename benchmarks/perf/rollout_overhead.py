"""Overhead of the rollout: time of an SDE rollout with log-probs / time of the bare model calls.

The bare calls are the same ``model.predict`` calls (same states, timesteps, CFG batch) without the step
math, log-probs, noise draws and trajectory bookkeeping. Target: ratio <= 1.05.

    python benchmarks/perf/rollout_overhead.py [--family sd3] [--steps 10] [--batch 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from flowalign.models import load_model
from flowalign.samplers import SamplingPlan, rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3", choices=["sd3", "flux", "sd", "sdxl"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(2)
    model = load_model(f"tiny-{args.family}")
    cond = model.encode(["a photo of a red circle"]).repeat(args.batch)
    noise = model.initial_noise(args.batch, 32, 32, torch.Generator().manual_seed(0))
    schedule = model.schedule(args.steps, noise.shape[1:])
    plan = SamplingPlan.build(
        args.steps, sde="all", dynamics="ddim" if model.kind == "diffusion" else "flow_grpo"
    )

    with torch.no_grad():
        states = rollout(model, cond, noise, schedule, plan, guidance=args.guidance, decode=False).latents

        def bare() -> None:
            for i in range(args.steps):
                model.predict(states[:, i], schedule.timesteps[i].expand(args.batch), cond, args.guidance)

        def full() -> None:
            rollout(
                model,
                cond,
                noise,
                schedule,
                plan,
                guidance=args.guidance,
                generator=torch.Generator().manual_seed(1),
                decode=False,
            )

        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        for fn in (bare, full):  # warm-up
            fn()
        # Interleave the two so that machine noise hits both alike; report medians.
        bare_times, full_times = [], []
        for _ in range(args.repeats):
            bare_times.append(timed(bare))
            full_times.append(timed(full))
    result = {
        "family": args.family,
        "steps": args.steps,
        "batch": args.batch,
        "guidance": args.guidance,
        "bare_model_calls_s": statistics.median(bare_times),
        "sde_rollout_with_log_probs_s": statistics.median(full_times),
        "ratio": statistics.median(full_times) / statistics.median(bare_times),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
