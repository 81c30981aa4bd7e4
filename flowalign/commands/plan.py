"""``flowalign plan CONFIG.yaml [key=value ...] --gpu-memory 80 --processes 8``: the largest micro-batch that fits.

Prints, per micro-batch size (powers of two), the estimated memory per process of the config at real size
(:mod:`flowalign.memory`: weights, trainable state, policy copies, activations, 10% margin) and the largest
that fits ``--gpu-memory`` GiB; set it as ``train.micro_batch_size``. A config that does not fit even one
sample per call is an error that says what to change.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. model.gradient_checkpointing=false"
    )
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--processes", type=int, default=8, help="processes (GPUs) of the run (default 8)")
    parser.add_argument(
        "--extra-gb", type=float, default=0.0, help="GiB for what is not counted (reward models)"
    )


def run(args: argparse.Namespace) -> int:
    from flowalign.commands.common import check_float, check_int
    from flowalign.config import load_config
    from flowalign.memory import ARCHITECTURES, MARGIN, largest_micro_batch

    check_float("--gpu-memory", args.gpu_memory, greater=0)
    check_int("--processes", args.processes)
    check_float("--extra-gb", args.extra_gb, least=0)
    config = load_config(args.config, args.overrides)
    best, rows = largest_micro_batch(config, args.gpu_memory, args.processes, args.extra_gb)
    m = config.model
    first = rows[0]
    print(
        f"{args.config}: {m.family} denoiser {first.denoiser_params / 1e9:.2f}B parameters, "
        f"{first.trainable_params / 1e6:.1f}M trainable, {m.dtype}, {m.resolution or ARCHITECTURES[m.family].resolution}px"
        f"{f' x {m.num_frames or 81} frames' if m.family == 'wan' else ''}, gradient "
        f"checkpointing {'on' if m.gradient_checkpointing else 'off'}, sharding {config.train.sharding}, "
        f"{args.processes} processes"
    )
    print(f"architecture: {first.architecture}")
    names = list(first.parts)
    print("micro-batch | " + " | ".join(names) + f" | total (+{MARGIN:.0%}) GiB")
    for row in rows:
        cells = " | ".join(f"{row.parts[n]:.1f}" for n in names)
        print(f"{row.micro_batch:>11} | {cells} | {row.total:.1f}")
    if best is None:
        raise SystemExit(
            f"error: {args.config} does not fit {args.gpu_memory:g} GiB even at train.micro_batch_size=1 "
            f"({rows[0].total:.1f} GiB estimated); turn on model.gradient_checkpointing, lower model.resolution, "
            "train a LoRA, or shard with train.sharding=fsdp."
        )
    print(f"largest micro-batch that fits {args.gpu_memory:g} GiB: train.micro_batch_size={best}")
    return 0
