"""Peak memory of one reward-backprop step against the number of sampling steps T.

Configurations: full backprop without checkpointing, full backprop with per-step checkpointing, and a
last-K=1 window with checkpointing. Each measurement runs in a fresh process (peak RSS only grows) and
reports the growth of the peak over the resident size just before the step: process RSS on CPU, CUDA max
allocated on a GPU. The model is an SD3-architecture transformer with random weights, large enough that
activations dominate (4 MMDiT blocks, width 128, 256 image tokens), batch 2.

    python benchmarks/perf/backprop_memory.py --out benchmarks/results/backprop_memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "full, no checkpointing": {"grad": "all", "checkpoint": False},
    "full, per-step checkpointing": {"grad": "all", "checkpoint": True},
    "last-K=1, checkpointing": {"grad": "last_k", "checkpoint": True},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(grad: str, checkpoint: bool, steps: int, device: str) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from flowalign.models.sd3 import SD3Adapter
    from flowalign.models.tiny import tiny_pipeline
    from flowalign.samplers import SamplingPlan, rollout

    torch.manual_seed(0)
    pipeline = tiny_pipeline("sd3")
    pipeline.transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32,
        pos_embed_max_size=32,
    )  # fmt: skip
    model = SD3Adapter(pipeline, device=device)
    model.add_lora(rank=8, init="gaussian")
    cond = model.encode(["a photo of a red circle"] * 2, cfg=False)
    noise = model.initial_noise(2, 64, 64, torch.Generator(device).manual_seed(0))
    schedule = model.schedule(steps, noise.shape[1:])
    plan = SamplingPlan.build(steps, sde="none", grad=grad, k=1, checkpoint=checkpoint)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mb()
    start = time.perf_counter()
    out = rollout(model, cond, noise, schedule, plan)
    reward = out.images[:, 0].mean() - out.images[:, 1:].mean()
    (-reward).backward()
    seconds = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_increase_mb": peak - before, "before_mb": before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="directory for results.json, results.md and memory.png")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        grad, checkpoint, steps = args.child.split(":")
        print(json.dumps(measure(grad, checkpoint == "1", int(steps), args.device)))
        return
    rows = []
    for name, cfg in CONFIGS.items():
        for steps in args.steps:
            child = f"{cfg['grad']}:{int(cfg['checkpoint'])}:{steps}"
            result = subprocess.run(
                [sys.executable, __file__, "--child", child, "--device", args.device],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row = {"config": name, "steps": steps, **json.loads(result.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(
                f"{name:32s} T={steps:3d}  peak +{row['peak_increase_mb']:8.1f} MB  {row['seconds']:6.2f} s",
                flush=True,
            )
    summary = _summary(rows, args.steps)
    print(json.dumps(summary, indent=2))
    if args.out:
        _write(Path(args.out), rows, summary, args)


def _summary(rows: list[dict], steps: list[int]) -> dict:
    def peak(name, t):
        return next(r["peak_increase_mb"] for r in rows if r["config"] == name and r["steps"] == t)

    lo, hi = min(steps), max(steps)
    out = {
        f"last_k1_ratio_T{hi}_over_T{lo}": peak("last-K=1, checkpointing", hi)
        / peak("last-K=1, checkpointing", lo)
    }
    if 16 in steps:
        out["full_no_ckpt_over_ckpt_T16"] = peak("full, no checkpointing", 16) / peak(
            "full, per-step checkpointing", 16
        )
    return out


def _write(out: Path, rows: list[dict], summary: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/perf/backprop_memory.py " + " ".join(sys.argv[1:])
    (out / "results.json").write_text(
        json.dumps({"command": command, "rows": rows, "summary": summary}, indent=2)
    )
    lines = [
        f"Command: `{command}`",
        "",
        "| config | T | peak increase (MB) | step time (s) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['config']} | {r['steps']} | {r['peak_increase_mb']:.1f} | {r['seconds']:.2f} |" for r in rows
    ]
    lines += ["", *(f"- {k}: {v:.2f}" for k, v in summary.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in CONFIGS:
        pts = [(r["steps"], r["peak_increase_mb"]) for r in rows if r["config"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("sampling steps T")
    ax.set_ylabel(f"peak memory increase (MB, {args.device})")
    ax.set_xscale("log", base=2)
    ax.set_title("one reward-backprop step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)


if __name__ == "__main__":
    main()
