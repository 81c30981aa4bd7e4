"""Memory per GPU of every shipped full-size config at real size, and a check of the activation count.

For each config under configs/ with a real model family (SD3.5-Medium, FLUX.1-dev, SDXL, SD1.5, Wan), prints
and writes (``--out``) the estimate of :mod:`flowalign.memory` per micro-batch on ``--processes`` GPUs of
``--gpu-memory`` GiB and the largest micro-batch that fits (``flowalign plan`` per config).

The check: the activation count runs the architecture on the ``meta`` device. The same count on real
tensors (the SD1.5 UNet with random weights on the CPU, float32, at ``--check-resolution``) must agree
with it, and the resident memory the forward adds (RSS after minus before, the graph alive) must be close
to it; both are printed and written.

    python benchmarks/perf/memory_table.py --out benchmarks/results/memory
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def check_against_cpu(resolution: int) -> dict:
    """Meta count vs real count vs RSS growth of one SD1.5 UNet training forward (to_q trainable)."""
    import psutil

    from flowalign.memory import _sd15_unet, activation_bytes

    def mark(net):
        net.requires_grad_(False)
        for name, p in net.named_parameters():
            p.requires_grad_("to_q." in name)
        return net

    with torch.device("meta"):
        meta = mark(_sd15_unet())
    counted_meta = activation_bytes("sd", meta, 1, resolution, torch.float32, False)
    torch.manual_seed(0)
    real = mark(_sd15_unet())
    process = psutil.Process()
    from flowalign.memory import _forward

    counted_real = activation_bytes("sd", real, 1, resolution, torch.float32, False, device="cpu")
    gc.collect()
    before = process.memory_info().rss
    kept = [_forward("sd", real, 1, resolution, torch.float32, device="cpu")()]  # the graph stays alive
    gc.collect()
    grown = process.memory_info().rss - before
    del kept
    return {"resolution": resolution, "meta_count_mb": counted_meta / 2**20, "real_count_mb": counted_real / 2**20,
            "rss_growth_mb": grown / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", type=float, default=80.0)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--check-resolution", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from flowalign.config import load_config
    from flowalign.memory import ARCHITECTURES, MARGIN, largest_micro_batch

    sys.path.insert(0, str(ROOT / "tests"))
    from shipped_configs import PLACEHOLDER_FILES

    lines = [
        "# Memory per GPU at real size (estimate)",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        "",
        f"{args.processes} processes, {args.gpu_memory:g} GiB per GPU, GiB per process (weights in model.dtype; "
        f"trainable weights, gradients and AdamW in float32; activations counted on the meta device; total "
        f"includes a {MARGIN:.0%} margin). Reward models are not counted. Micro-batches are tried in powers "
        "of two up to 256 (256: the largest tried fits). Trainable state includes the kept policy copies and, for "
        "dmd, the fake score (and a full-weight student's teacher copy).",
        "",
        "| config | family | LoRA rank | resolution | checkpointing | weights | trainable state | activations / sample | VAE decode / sample | total at micro-batch 1 | largest micro-batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.parent.name == "accelerate":
            continue
        # placeholders the config check resolves (dmd.gan_real must be a file) get the tests' stand-ins; none
        # of them changes the memory
        config = load_config(path, PLACEHOLDER_FILES.get(str(path.relative_to(ROOT / "configs")), []))
        if config.model.family not in ARCHITECTURES:
            continue
        best, rows = largest_micro_batch(config, args.gpu_memory, args.processes)
        one = rows[0]
        name = str(path.relative_to(ROOT / "configs"))
        weights = (
            one.parts["denoiser weights"]
            + one.parts["text encoders + VAE"]
            + one.parts.get("other expert weights", 0.0)
        )
        state = (
            one.parts["trainable (fp32) + grads + AdamW"]
            + one.parts["policy copies (EMA, old, reference)"]
            + one.parts.get("DMD fake score (+ teacher copy)", 0.0)
        )
        per_sample = one.parts["activations"]
        m = config.model
        lines.append(
            f"| {name} | {m.family} | {m.lora_rank} | {m.resolution} | {m.gradient_checkpointing} | {weights:.1f} | "
            f"{state:.1f} | {per_sample:.2f} | {one.parts['VAE decode']:.2f} | {one.total:.1f} | {best} |"
        )
        results[name] = {
            "largest_micro_batch": best,
            "rows": [{"micro_batch": r.micro_batch, **r.parts, "total": r.total} for r in rows],
        }
        print(lines[-1], flush=True)
    check = check_against_cpu(args.check_resolution)
    results["cpu_check"] = check
    lines += [
        "",
        f"## Check of the activation count (SD1.5 UNet, float32, {check['resolution']} px, batch 1, CPU)",
        "",
        f"- counted on the meta device: {check['meta_count_mb']:.0f} MiB",
        f"- counted on real tensors: {check['real_count_mb']:.0f} MiB",
        f"- resident memory added by the forward (graph alive): {check['rss_growth_mb']:.0f} MiB",
        "",
        "The meta count equals the count on real tensors (attention counted as the fused kernels keep it: q, k, "
        "v, output and log-sum-exp), and the resident memory the forward adds is within the 10% margin of it.",
    ]
    print("\n".join(lines[-8:]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("\n".join(lines) + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
