"""``flowalign bench geneval``: GenEval-style benchmark of a model (or a LoRA) on a prompt file.

Example::

    flowalign bench geneval --prompts assets/shapes/prompts/test.jsonl --images-per-prompt 4 --out bench/test

writes ``results.json``, ``summary.md`` and ``grids/<task>.png`` to ``--out`` (see
:mod:`flowalign.eval.geneval`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from flowalign.commands.common import add_model_arguments, load_model_from_args

BENCHMARKS = ("geneval",)
_REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = "assets/shapes/prompts/test.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark to run")
    add_model_arguments(parser)
    parser.add_argument(
        "--prompts",
        default=DEFAULT_PROMPTS,
        help=f"GenEval metadata jsonl (default {DEFAULT_PROMPTS}, relative to the repository if not found here)",
    )
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="ODE sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-image noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per sampler call (default 32)")
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_prompts(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    fallback = _REPO / path
    if not candidate.is_absolute() and fallback.exists():
        return fallback
    raise SystemExit(f"prompt file {path!r} not found (looked in the current directory and in {_REPO}).")


def run(args: argparse.Namespace) -> int:
    from flowalign.eval.geneval import run_geneval, write_report
    from flowalign.worlds.shapes.prompts import load_prompts

    prompts_path = _resolve_prompts(args.prompts)
    try:
        prompts = load_prompts(prompts_path)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    model = load_model_from_args(args)
    try:
        report = run_geneval(
            model, prompts, images_per_prompt=args.images_per_prompt, steps=args.steps, guidance=args.guidance,
            resolution=args.resolution, seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress,
        )  # fmt: skip
    except ValueError as err:
        raise SystemExit(f"flowalign bench geneval: {err}") from None
    report.model = {"model": str(args.model), "lora": args.lora, "prompts": str(args.prompts)}
    paths = write_report(report, args.out, command=_command(args, report.config))
    s = report.summary
    tasks = ", ".join(f"{t} {a:.3f}" for t, a in s.task_accuracy.items())
    print(
        f"overall {s.overall:.3f} ({tasks}); {s.image_accuracy:.1%} images, {s.prompt_accuracy:.1%} prompts correct"
    )
    print(f"wrote {paths['results']} and {paths['summary']}")
    return 0


def _command(args: argparse.Namespace, config) -> str:
    """The command that reproduces this run, with the model's defaults spelled out."""
    parts = ["flowalign", "bench", args.benchmark, "--model", str(args.model)]
    if args.family:
        parts += ["--family", args.family]
    if args.lora:
        parts += ["--lora", args.lora]
    parts += ["--prompts", str(args.prompts), "--images-per-prompt", str(config.images_per_prompt)]
    parts += [
        "--steps",
        str(config.steps),
        "--guidance",
        str(config.guidance),
        "--resolution",
        str(config.resolution),
    ]
    parts += ["--seed", str(config.seed), "--batch-size", str(config.batch_size)]
    if args.max_prompts is not None:
        parts += ["--max-prompts", str(args.max_prompts)]
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)
