"""``flowalign train CONFIG.yaml [key=value ...]``: run a training recipe from a YAML config.

Works under ``accelerate launch`` unchanged (``accelerate launch -m flowalign train ...``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=20")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from flowalign.config import load_config
    from flowalign.train import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    state = "interrupted" if result.interrupted else "finished"
    if PartialState().is_main_process:  # one line, not one per process
        print(f"{state} after {result.steps_done} steps; outputs in {result.output_dir}")
    return 0
