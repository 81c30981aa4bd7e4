"""The ``flowalign`` command: ``flowalign <subcommand> [options]``.

Each subcommand lives in ``flowalign/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when invoked, so ``flowalign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("flowalign.commands.sample", "generate images from prompts and save a PNG grid"),
    "bench": (
        "flowalign.commands.bench",
        "GenEval-style benchmark of a model or a LoRA, with confidence intervals; paired comparison of two runs",
    ),
    "score": ("flowalign.commands.score", "score a folder of images against prompts with rewards"),
    "train": ("flowalign.commands.train", "fine-tune a model from a YAML config (online RL, ...)"),
    "plan": (
        "flowalign.commands.plan",
        "memory per GPU of a config at real size, and the largest micro-batch that fits",
    ),
    "optimize-noise": (
        "flowalign.commands.optimize_noise",
        "ReNO: optimize the initial noise of a frozen model for differentiable rewards",
    ),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowalign", description="Reward fine-tuning of diffusion and flow models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module).add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
