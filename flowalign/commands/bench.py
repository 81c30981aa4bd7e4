"""``flowalign bench``: GenEval-style benchmark of a model (or a LoRA), and paired comparison of two runs.

Examples::

    flowalign bench geneval --prompts assets/shapes/prompts/test.jsonl --out bench/base
    flowalign bench geneval --lora runs/grpo_shapes/checkpoints/step-100/lora --out bench/tuned
    flowalign bench compare bench/base bench/tuned --out bench/tuned_vs_base
    flowalign bench video --out bench/video_base

``video`` runs the moving-shapes image-to-video benchmark (:mod:`flowalign.eval.video`): identity, motion
and correct (both) per task and overall with 95% intervals, ``results.json``, ``summary.md`` and frame-strip
grids marked pass (green) / fail (red).

``geneval`` writes ``results.json``, ``summary.md`` and ``grids/<task>.png`` to ``--out`` (see
:mod:`flowalign.eval.geneval`). By default every task is measured on at least 96 images (tasks with few
prompts get more images per prompt, never fewer than ``--images-per-prompt``); ``--min-images-per-task 0``
is GenEval's uniform protocol. Every accuracy comes with its 95% interval. ``compare`` reads two such runs
made on the same prompts, seed and settings and reports ``B - A`` per task and overall with paired 95%
intervals (:mod:`flowalign.eval.compare`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from flowalign.commands.common import (
    UsageError,
    add_level_arguments,
    add_model_arguments,
    check_device,
    check_int,
    check_output_dir,
    check_sampling_arguments,
    load_model_from_args,
)

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = "assets/shapes/prompts/test.jsonl"
DEFAULT_VIDEO_PROMPTS = "assets/moving_shapes/prompts/test.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    geneval = sub.add_parser(
        "geneval", help="GenEval-style benchmark with 95%% intervals", description="GenEval-style benchmark"
    )
    add_model_arguments(geneval)
    geneval.add_argument(
        "--prompts",
        default=DEFAULT_PROMPTS,
        help=f"GenEval metadata jsonl (default {DEFAULT_PROMPTS}, relative to the repository if not found here)",
    )
    geneval.add_argument(
        "--images-per-prompt",
        type=int,
        default=4,
        help="images per prompt, the least any prompt gets (default 4)",
    )
    geneval.add_argument(
        "--min-images-per-task",
        type=int,
        default=96,
        help="give the prompts of a task enough images for at least this many per task (default 96; 0: "
        "GenEval's uniform --images-per-prompt)",
    )
    geneval.add_argument(
        "--steps",
        type=int,
        default=None,
        help="ODE sampling steps (default: the model's; a distilled student's own)",
    )
    add_level_arguments(geneval)
    geneval.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    geneval.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    geneval.add_argument("--seed", type=int, default=0, help="base seed of the per-image noise (default 0)")
    geneval.add_argument("--batch-size", type=int, default=32, help="images per sampler call (default 32)")
    geneval.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    geneval.add_argument(
        "--detector", default="shapes", choices=["shapes", "mask2former", "owlv2"],
        help="GenEval detector: the shapes world's (default), or Mask2Former / OWLv2 (+ CLIP colour) from "
        "user weights given with --detector-arg model_path=DIR --detector-arg clip_path=DIR",
    )  # fmt: skip
    geneval.add_argument(
        "--detector-arg", action="append", default=[], metavar="KEY=VALUE",
        help="an option of the detector (repeatable), e.g. model_path=/path/to/mask2former",
    )  # fmt: skip
    geneval.add_argument("--out", required=True, help="output directory")
    geneval.add_argument("--no-progress", action="store_true", help="no progress bar")

    video = sub.add_parser(
        "video", help="moving-shapes image-to-video benchmark with 95%% intervals",
        description="Moving-shapes image-to-video benchmark: identity, motion and both, with 95% intervals",
    )  # fmt: skip
    add_model_arguments(video)
    video.set_defaults(model="moving_shapes")
    video.add_argument(
        "--prompts", default=DEFAULT_VIDEO_PROMPTS,
        help=f"moving-shapes prompt records (default {DEFAULT_VIDEO_PROMPTS}: 96 videos per task)",
    )  # fmt: skip
    video.add_argument(
        "--videos-per-prompt", type=int, default=1, help="videos per prompt record (default 1)"
    )
    video.add_argument(
        "--steps",
        type=int,
        default=None,
        help="ODE sampling steps (default: the model's; a distilled student's own)",
    )
    add_level_arguments(video)
    video.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    video.add_argument("--seed", type=int, default=0, help="base seed of the per-video noise (default 0)")
    video.add_argument("--batch-size", type=int, default=32, help="videos per sampler call (default 32)")
    video.add_argument("--out", required=True, help="output directory")
    video.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = sub.add_parser(
        "compare",
        help="paired difference B - A of two geneval runs on the same prompts and noise",
        description="Paired difference B - A of two `flowalign bench geneval` runs made on the same prompts, "
        "seed and settings: per task and overall, with 95% intervals and whether they exclude zero.",
    )
    compare.add_argument("a", metavar="A_DIR", help="--out directory of the reference run")
    compare.add_argument("b", metavar="B_DIR", help="--out directory of the run compared with it")
    compare.add_argument("--out", default=None, help="also write comparison.json and comparison.md here")
    compare.add_argument(
        "--across-samplers",
        action="store_true",
        help="pair runs that differ in steps or guidance (a few-step student against its teacher): the "
        "prompts, seed and so every image's initial noise must still match",
    )


def run(args: argparse.Namespace) -> int:
    return {"compare": _compare, "video": _video}.get(args.benchmark, _geneval)(args)


def _video(args: argparse.Namespace) -> int:
    from flowalign.data.prompts import load_prompt_set
    from flowalign.eval.video import run_video_bench

    check_sampling_arguments(args)
    check_int("--videos-per-prompt", args.videos_per_prompt)
    check_output_dir("--out", args.out)
    path = _resolve_prompts(args.prompts)
    try:
        records = [{"prompt": r.prompt, **r.metadata} for r in load_prompt_set(path)]
    except ValueError as err:
        raise UsageError(f"flowalign bench video: {err}") from None
    model = load_model_from_args(args)
    if not model.takes_images:
        raise UsageError(
            f"--model {args.model}: the video benchmark needs an image-to-video model (moving_shapes, wan)."
        )
    try:
        report = run_video_bench(
            model, records, videos_per_prompt=args.videos_per_prompt, steps=args.steps, guidance=args.guidance,
            seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress, levels=args.levels,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(f"flowalign bench video: {err}") from None
    report.settings.update(
        model=str(args.model), lora=args.lora, weights=args.weights, prompts=str(args.prompts)
    )
    command = ["flowalign", "bench", "video", "--model", str(args.model)]
    for flag, value in (("--lora", args.lora), ("--weights", args.weights)):
        if value:
            command += [flag, value]
    command += ["--prompts", str(args.prompts), "--videos-per-prompt", str(args.videos_per_prompt)]
    command += ["--steps", str(report.settings["steps"]), *_level_flags(model, report.settings["levels"])]
    command += [
        "--guidance",
        str(report.settings["guidance"]),
        "--seed",
        str(args.seed),
        "--out",
        str(args.out),
    ]
    report.settings["command"] = " ".join(shlex.quote(c) for c in command)
    out = report.save(args.out)
    print(report.markdown(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and {out / 'grids'}")
    return 0


def _resolve_prompts(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    fallback = _REPO / path
    if not candidate.is_absolute() and fallback.exists():
        return fallback
    raise UsageError(f"prompt file {path!r} not found (looked in the current directory and in {_REPO}).")


def _detector_options(items: list[str]) -> dict:
    """``["model_path=DIR", "min_confidence=0.5"]`` -> options (values read as YAML scalars)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"flowalign bench geneval: --detector-arg {item!r} must look like KEY=VALUE.")
        options[key] = yaml.safe_load(value)
    return options


def _geneval(args: argparse.Namespace) -> int:
    from flowalign.eval.geneval import (
        balanced_images_per_prompt,
        load_geneval_prompts,
        run_geneval,
        stats_text,
        write_report,
    )
    from rewards.geneval_reward import load_detector

    check_sampling_arguments(args)
    check_device("--device", args.device)
    check_output_dir("--out", args.out)
    check_int("--max-prompts", args.max_prompts)
    check_int("--images-per-prompt", args.images_per_prompt)
    check_int(
        "--min-images-per-task", args.min_images_per_task, least=0, hint=" (0: GenEval's uniform protocol)"
    )
    prompts_path = _resolve_prompts(args.prompts)
    try:
        detector = load_detector(args.detector, args.device, **_detector_options(args.detector_arg))
        prompts = load_geneval_prompts(prompts_path, detector)
    except (ValueError, OSError) as err:
        raise UsageError(f"flowalign bench geneval: {err}") from None
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    counts = balanced_images_per_prompt(
        [p["tag"] for p in prompts],
        images_per_prompt=args.images_per_prompt,
        min_images_per_task=args.min_images_per_task,
    )
    model = load_model_from_args(args)
    try:
        report = run_geneval(
            model, prompts, images_per_prompt=counts, steps=args.steps, guidance=args.guidance,
            resolution=args.resolution, seed=args.seed, batch_size=args.batch_size, detector=detector,
            progress=not args.no_progress, levels=args.levels,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(f"flowalign bench geneval: {err}") from None
    report.model = {
        "model": str(args.model), "lora": args.lora, "weights": args.weights, "prompts": str(args.prompts), "detector": args.detector,
    }  # fmt: skip
    paths = write_report(report, args.out, command=_command(args, report.config, model))
    s = report.summary
    print(stats_text(report.stats))
    print(
        f"{s.prompt_accuracy:.1%} of prompts have a correct image; wrote {paths['results']} and {paths['summary']}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from flowalign.eval.compare import (
        SAMPLER_SETTINGS,
        compare_runs,
        comparison_markdown,
        load_run,
        write_comparison,
    )

    check_output_dir("--out", args.out)
    ignore = SAMPLER_SETTINGS if args.across_samplers else ()
    results = Path(args.a) / "results.json"
    if results.is_file() and "videos" in json.loads(results.read_text()):
        return _compare_video(args, ignore)
    try:
        a, b = load_run(args.a), load_run(args.b)
        comparison = compare_runs(a, b, ignore=ignore)
    except ValueError as err:
        raise UsageError(f"flowalign bench compare: {err}") from None
    print(comparison_markdown(a, b, comparison), end="")
    if args.out:
        paths = write_comparison(a, b, comparison, args.out)
        print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def _compare_video(args: argparse.Namespace, ignore: tuple[str, ...]) -> int:
    import json

    from flowalign.eval.video import compare_video_runs, comparison_text

    try:
        comparison = compare_video_runs(args.a, args.b, ignore=ignore)
    except ValueError as err:
        raise UsageError(f"flowalign bench compare: {err}") from None
    print(comparison_text(comparison), end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
        (out / "comparison.md").write_text(comparison_text(comparison))
        print(f"wrote {out / 'comparison.json'} and {out / 'comparison.md'}")
    return 0


def _level_flags(model, levels) -> list[str]:
    """``--sigmas S ...`` (flow) or ``--timesteps T ...`` (diffusion) for explicit ``levels``; [] for None."""
    if levels is None:
        return []
    if model.kind == "flow":
        return ["--sigmas", *(repr(float(v)) for v in levels)]
    return ["--timesteps", *(str(int(v)) for v in levels)]


def _command(args: argparse.Namespace, config, model) -> str:
    """The command that reproduces this run, with the model's defaults spelled out."""
    parts = ["flowalign", "bench", args.benchmark, "--model", str(args.model)]
    if args.family:
        parts += ["--family", args.family]
    if args.weights:
        parts += ["--weights", args.weights]
    if args.lora:
        parts += ["--lora", args.lora]
    parts += ["--prompts", str(args.prompts), "--images-per-prompt", str(args.images_per_prompt)]
    parts += ["--min-images-per-task", str(args.min_images_per_task)]
    parts += ["--steps", str(config.steps), "--guidance", str(config.guidance)]
    parts += _level_flags(model, config.levels)
    parts += ["--resolution", str(config.resolution), "--seed", str(config.seed)]
    parts += ["--batch-size", str(config.batch_size)]
    if args.max_prompts is not None:
        parts += ["--max-prompts", str(args.max_prompts)]
    if args.detector != "shapes":
        parts += ["--detector", args.detector]
    for item in args.detector_arg:
        parts += ["--detector-arg", item]
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)
