"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

# The shipped shapes-world model (assets/shapes/model, see its README.md); load_model resolves the name.
DEFAULT_MODEL = "shapes"


class UsageError(ValueError):
    """A bad command-line value or input file: ``flowalign`` prints it as one line (exit status 2)."""


def check_int(flag: str, value: int | None, least: int = 1, hint: str = "") -> None:
    """``value`` (None: the default) must be an integer >= ``least``; else a :class:`UsageError`."""
    if value is not None and value < least:
        raise UsageError(f"{flag} must be an integer >= {least}{hint}, got {value}.")


def check_float(
    flag: str, value: float | None, least: float | None = None, greater: float | None = None, hint: str = ""
) -> None:
    """``value`` (None: the default) must be finite, ``>= least`` and ``> greater`` where given."""
    if value is None:
        return
    if (
        not math.isfinite(value)
        or (least is not None and value < least)
        or (greater is not None and value <= greater)
    ):
        bounds = [
            f">= {least:g}" if least is not None else "",
            f"> {greater:g}" if greater is not None else "",
        ]
        wanted = " and ".join(b for b in bounds if b)
        raise UsageError(
            f"{flag} must be a finite number{' ' + wanted if wanted else ''}{hint}, got {value}."
        )


def check_output_file(flag: str, path: str | None, suffixes: tuple[str, ...] = ()) -> None:
    """An output file path: not an existing directory and, when ``suffixes`` are given, with one of them
    (checked before work starts, so a long run does not fail at its last line)."""
    if path is None:
        return
    if Path(path).is_dir():
        example = f"{path.rstrip('/')}/out{suffixes[0] if suffixes else ''}"
        raise UsageError(f"{flag} {path!r} is a directory; pass a file path such as {example}.")
    if suffixes and Path(path).suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path!r} must end with {' or '.join(suffixes)}.")


def check_output_dir(flag: str, path: str | None) -> None:
    """An output directory path: not an existing file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} exists and is not a directory; pass a directory path.")


GUIDANCE_HINT = " (1: no guidance; CFG needs a scale above 1)"


def add_level_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sigmas`` / ``--timesteps``: the sampling steps' explicit noise levels (a student's own)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--sigmas", type=float, nargs="+", default=None, metavar="S",
        help="flow models: the steps' noise levels, as the stock pipeline's sigmas= (e.g. 1.0 0.75 0.5 0.25); "
        "sets --steps",
    )  # fmt: skip
    group.add_argument(
        "--timesteps", type=int, nargs="+", default=None, metavar="T",
        help="diffusion models: the steps' timesteps, as the stock pipeline's timesteps= (e.g. 999 749 499 249); "
        "sets --steps",
    )  # fmt: skip


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """The sampling options every generating command shares, checked before the model loads. Explicit
    ``--sigmas`` / ``--timesteps`` become ``args.levels`` (None without them) and set ``args.steps``."""
    check_int("--steps", getattr(args, "steps", None))
    check_float("--guidance", getattr(args, "guidance", None), least=1, hint=GUIDANCE_HINT)
    for flag in ("resolution", "height", "width", "micro_batch_size", "batch_size"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag, None))
    from flowalign.samplers.schedules import check_levels

    args.levels = None
    for name, kind in (("sigmas", "flow"), ("timesteps", "diffusion")):
        levels = getattr(args, name, None)
        if levels is None:
            continue
        steps = getattr(args, "steps", None)
        if steps is not None and steps != len(levels):
            raise UsageError(
                f"--steps {steps} but {len(levels)} --{name}; give one per step (or omit --steps)."
            )
        try:
            args.levels = check_levels(levels, len(levels), kind)
        except ValueError as err:
            raise UsageError(f"--{name}: {err}") from None
        args.steps = len(levels)


def check_levels_fit(args: argparse.Namespace, model) -> None:
    """``--sigmas`` is for flow models and ``--timesteps`` for diffusion models (checked once loaded)."""
    for name, kind in (("sigmas", "flow"), ("timesteps", "diffusion")):
        if getattr(args, name, None) is not None and model.kind != kind:
            other = "timesteps" if name == "sigmas" else "sigmas"
            raise UsageError(f"--{name} is for {kind} models; this is a {model.kind} model: use --{other}.")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="diffusers directory, hub id, tiny-<family>, or shapes: the shipped shapes-world model. Default: the "
        "model the --weights / --lora checkpoint was trained from (its state.json), else shapes",
    )
    parser.add_argument(
        "--family",
        default=None,
        help="adapter family (sd3, flux, sd, sdxl, shapes, wan, moving_shapes); read from the model directory if omitted",
    )
    parser.add_argument("--lora", default=None, help="directory of a diffusers-format LoRA to load")
    parser.add_argument(
        "--weights", default=None,
        help="a full fine-tuning checkpoint (model.lora_rank: 0; <run>/checkpoints/step-N) to load into the "
        "denoiser, or one of its files (step-N/trainable_ema.safetensors: the EMA, with train.ema_decay)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def check_device(flag: str, value: str) -> None:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` (N below the device count), ``mps``."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"{flag} {value!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {value!r}: this machine has no CUDA device; use {flag} cpu.")
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"{flag} {value!r}: this machine has {count} CUDA device(s) (cuda:0-{count - 1})."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {value!r}: MPS is not available on this machine; use {flag} cpu.")


def load_model_from_args(args: argparse.Namespace):
    """The model of ``--model`` with ``--weights`` / ``--lora`` loaded. A distilled student (a ``train.algorithm:
    dmd`` checkpoint) samples by default at the steps, levels and guidance it was distilled for; other values
    given on the command line are used, with a warning (:func:`fit_student_sampling`)."""
    from flowalign.models import load_model
    from flowalign.models.base import ModelLoadError

    check_device("--device", args.device)
    origin = None
    if args.model is None:
        origin = trained_model(args)
        args.model = DEFAULT_MODEL if origin is None else origin[0]
        if origin is not None and args.family is None:
            args.family = origin[2]
    try:
        model = load_model(
            args.model, family=args.family, device=args.device, dtype=getattr(torch, args.dtype)
        )
    except ModelLoadError as err:
        if origin is None:
            raise
        raise UsageError(f"--model {args.model} ({origin[1]}) does not load: {err} Pass --model.") from None
    check_levels_fit(args, model)
    if getattr(args, "weights", None):
        model.load_weights(args.weights)
        fit_student_sampling(args, "--weights", args.weights)
    if args.lora:
        model.load_lora(args.lora)
        fit_student_sampling(args, "--lora", args.lora)
    return model


def checkpoint_of(path: str | Path) -> Path:
    """The checkpoint directory of ``path``: the directory itself when it holds a ``state.json``, else its
    parent (``lora/``, ``lora_ema/`` or a weight file inside a checkpoint)."""
    path = Path(path)
    return path if (path / "state.json").is_file() else path.parent


def trained_model(args: argparse.Namespace) -> tuple[str, str, str | None] | None:
    """``(model.path, where it was read, model.family)`` of the run that wrote the ``--weights`` / ``--lora`` checkpoint (the
    checkpoint directory, its ``lora/`` or ``lora_ema/``, or one of its weight files), said in one line; None
    when neither is a checkpoint with a ``state.json``. Two checkpoints of runs on different models are refused."""
    import sys

    import yaml

    from flowalign.config import saved_setting

    found = []
    for flag in ("--weights", "--lora"):
        path = getattr(args, flag[2:], None)
        if not path:
            continue
        checkpoint = checkpoint_of(path)
        try:
            model = saved_setting(checkpoint, "model.path")
        except (ValueError, yaml.YAMLError):  # a state.json that does not read names no model
            model = None
        if model is not None:
            where = f"the model of the {flag} checkpoint's run, {checkpoint / 'state.json'}"
            found.append((str(model), where, saved_setting(checkpoint, "model.family")))
    if len({model for model, _, _ in found}) > 1:
        raise UsageError(
            f"--weights and --lora come from runs on different models ({found[0][0]} and {found[1][0]}); pass "
            "--model to choose the base."
        )
    if not found:
        return None
    print(f"--model {found[0][0]}: {found[0][1]}; pass --model to load another.", file=sys.stderr)
    return found[0]


def distilled_student(path: str | Path) -> dict | None:
    """What a distilled student was trained to sample with, from the config its checkpoint was written with
    (:func:`flowalign.config.saved_setting`): ``{"steps", "levels", "levels_flag", "guidance", "resolution",
    "frames", "state"}`` for a
    checkpoint of a ``train.algorithm: dmd`` run, given as the checkpoint directory, its ``lora/`` or
    ``lora_ema/``, or one of its weight files. None for other runs and for a LoRA copied out of its checkpoint."""
    import yaml

    from flowalign.config import saved_setting

    checkpoint = checkpoint_of(path)
    try:
        if saved_setting(checkpoint, "train.algorithm") != "dmd":
            return None
        sigmas, timesteps = (saved_setting(checkpoint, f"sampling.{k}") for k in ("sigmas", "timesteps"))
        steps, guidance = (saved_setting(checkpoint, f"sampling.{k}") for k in ("steps", "guidance"))
        resolution, frames = (saved_setting(checkpoint, f"model.{k}") for k in ("resolution", "num_frames"))
    except (ValueError, yaml.YAMLError):  # a state.json that does not read: not a student's settings
        return None
    levels = list(sigmas or timesteps or []) or None
    return {
        "steps": steps,
        "levels": levels,
        "levels_flag": "--sigmas" if sigmas else "--timesteps" if timesteps else None,
        "guidance": guidance,
        "resolution": resolution,
        "frames": frames,
        "state": checkpoint / "state.json",
    }


def fit_student_sampling(args: argparse.Namespace, flag: str, path: str) -> None:
    """A distilled student samples at the step count, levels, guidance, image size and frame count it was
    distilled for: they are the defaults of ``--steps`` / ``--sigmas`` / ``--timesteps`` / ``--guidance`` /
    ``--resolution`` (or ``--height`` and ``--width``) / ``--frames``, said in one line (``--steps`` equal to
    the student's takes its levels too). A step count, levels, size or frame count given otherwise are kept,
    with one warning line each, since the student was not trained for them (e.g. a 4-step student at 1 step);
    another ``--guidance`` is a documented choice and kept silently."""
    import sys

    student = distilled_student(path)
    if student is None or not student["steps"]:
        return
    steps, levels = student["steps"], student["levels"]
    where = f"{flag} {path} is a {steps}-step DMD student (its run's sampling settings, {student['state']})"
    shown = lambda values: " ".join(f"{v:g}" for v in values)  # noqa: E731
    chosen = []
    if getattr(args, "levels", None) is None and getattr(args, "steps", None) in (None, steps):
        args.steps, args.levels = steps, (list(levels) if levels else None)
        chosen.append(f"{student['levels_flag']} {shown(levels)}" if levels else f"--steps {steps}")
    elif args.steps != steps:
        print(f"warning: --steps {args.steps}: {where}; at {args.steps} steps it samples outside its training.",
              file=sys.stderr)  # fmt: skip
    elif levels and [float(v) for v in args.levels] != [float(v) for v in levels]:
        print(f"warning: {student['levels_flag']} {shown(args.levels)}: {where}, distilled at {shown(levels)}.",
              file=sys.stderr)  # fmt: skip
    if getattr(args, "guidance", None) is None and student["guidance"] is not None:
        args.guidance = student["guidance"]
        chosen.append(f"--guidance {args.guidance:g}")
    size, frames = student["resolution"], student["frames"]
    sides = (
        ("resolution",)
        if hasattr(args, "resolution")
        else ("height", "width")
        if hasattr(args, "height")
        else ()
    )
    given = [getattr(args, side) for side in sides]
    if size and sides and all(value is None for value in given):
        for side in sides:
            setattr(args, side, size)
        chosen.append(" ".join(f"--{side} {size}" for side in sides))
    elif size and sides and any(value not in (None, size) for value in given):
        shown_size = " ".join(f"--{side} {value}" for side, value in zip(sides, given, strict=True) if value)
        print(
            f"warning: {shown_size}: {where}, distilled at {size}x{size} (model.resolution).", file=sys.stderr
        )
    if frames and hasattr(args, "frames"):
        if args.frames is None:
            args.frames = frames
            chosen.append(f"--frames {frames}")
        elif args.frames != frames:
            print(f"warning: --frames {args.frames}: {where}, distilled at {frames} frames.", file=sys.stderr)
    if chosen:
        print(f"{where}: sampling it with {' '.join(chosen)}; pass these options to choose otherwise.",
              file=sys.stderr)  # fmt: skip


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """``--image`` / ``--frames``: image-to-video models' first frames and frame count."""
    parser.add_argument(
        "--image", action="append", default=None, metavar="PNG",
        help="image-to-video models: the first frame (an RGB image of the video's size); one for all prompts, "
        "or one per --prompt in order",
    )  # fmt: skip
    parser.add_argument(
        "--frames", type=int, default=None, help="image-to-video models: frames per video (Wan: 4k + 1)"
    )


def first_frames(args: argparse.Namespace, model) -> torch.Tensor | None:
    """``[P, 3, H, W]``: the first frame of each ``--prompt``'s videos (``--image``, ``--frames``), checked
    against the model; None for a text-to-image model (which refuses both flags) or a text-to-video model
    (which refuses ``--image``)."""
    from flowalign.data.prompts import load_image

    if not model.is_video:
        for flag, value in (("--image", args.image), ("--frames", args.frames)):
            if value:
                raise UsageError(
                    f"{flag}: the {model.family} model is text-to-image; first frames and frame counts are for "
                    "video models (families wan and moving_shapes)."
                )
        return None
    if args.frames is not None:
        try:
            model.num_frames = args.frames
        except ValueError as err:
            raise UsageError(f"--frames: {err}") from None
    if not model.takes_images:
        if args.image:
            raise UsageError(
                f"--image: the {model.family} model is text-to-video and takes no first frame; drop --image."
            )
        return None
    if not args.image:
        raise UsageError("--image: this image-to-video model needs a first frame: --image first_frame.png.")
    if len(args.image) not in (1, len(args.prompt)):
        raise UsageError(
            f"--image: got {len(args.image)} images for {len(args.prompt)} prompts; give one for all or one per prompt."
        )
    if getattr(args, "height", None) or getattr(args, "width", None):
        raise UsageError("--height/--width: a video has its first frame's size; resize the --image instead.")
    frames = [load_image(path, "--image") for path in args.image]
    if len({tuple(f.shape) for f in frames}) > 1:
        raise UsageError(
            f"--image: the first frames have different sizes {[tuple(f.shape[1:]) for f in frames]}."
        )
    try:
        model.latent_shape(*frames[0].shape[1:])
    except ValueError as err:
        raise UsageError(f"--image: {err}") from None
    images = torch.stack(frames)
    return images.expand(len(args.prompt), -1, -1, -1) if len(frames) == 1 else images
