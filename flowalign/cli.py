"""The ``flowalign`` command: ``flowalign <subcommand> [options]``.

Each subcommand lives in ``flowalign/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when invoked, so ``flowalign --help`` stays fast. User errors are
one line (``--debug`` anywhere on the command line shows the traceback).
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
    """Run a subcommand. A user error (a bad value, a missing file, a run directory in use, ...) is one line
    on stderr and exit status 2; ``--debug`` (or ``FLOWALIGN_DEBUG=1``) shows the traceback instead."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLOWALIGN_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    args = build_parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        ImportError,
    ) as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
