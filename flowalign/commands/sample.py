"""``flowalign sample``: prompts in, a PNG grid out (one row per prompt).

Image-to-video models (``--model`` of family ``wan``) take a first frame per prompt (``--image``) and
write an animated GIF of the grid (each GIF frame is the grid of that video frame) and a frame strip PNG
beside it (``<out>_frames.png``: one row per video, one column per frame)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowalign.commands.common import (
    UsageError,
    add_level_arguments,
    add_model_arguments,
    add_video_arguments,
    check_int,
    check_output_file,
    check_sampling_arguments,
    first_frames,
    load_model_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: the model's; a distilled student's own)",
    )
    add_level_arguments(parser)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument(
        "--seed", type=int, default=0,
        help="base seed: image j of prompt i starts from seed * 1000003 + i * 1009 + j, as in bench geneval",
    )  # fmt: skip
    parser.add_argument(
        "--micro-batch-size", type=int, default=None,
        help="images per model call (bounds memory; the images do not change)",
    )  # fmt: skip
    add_video_arguments(parser)
    parser.add_argument(
        "--out", default=None,
        help="output path (default samples.png; samples.gif for a video model, with samples_frames.png beside it)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from torchvision.utils import save_image

    from flowalign.eval.geneval import image_seed
    from flowalign.samplers import generate, seeded_generators

    check_int("--num-images", args.num_images)
    check_int("--frames", args.frames)
    check_output_file("--out", args.out, IMAGE_SUFFIXES)
    check_sampling_arguments(args)
    model = load_model_from_args(args)
    images = first_frames(args, model)
    out = Path(args.out or ("samples.gif" if model.is_video else "samples.png"))
    if model.is_video and out.suffix.lower() != ".gif":
        raise UsageError(
            f"--out {str(out)!r}: a video model writes an animated GIF; pass a path ending in .gif."
        )
    jobs = [(i, j) for i in range(len(args.prompt)) for j in range(args.num_images)]
    with torch.no_grad():
        samples = generate(
            model, [args.prompt[i] for i, _ in jobs],
            seeded_generators([image_seed(args.seed, i, j) for i, j in jobs], model.device),
            steps=args.steps or model.default_steps,
            guidance=model.default_guidance if args.guidance is None else args.guidance,
            resolution=None if images is not None else (args.height, args.width),
            micro_batch_size=args.micro_batch_size, levels=args.levels,
            images=None if images is None else images[[i for i, _ in jobs]],
        ).images  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"{len(args.prompt)} prompts x {args.num_images}"
    if not model.is_video:
        save_image(samples, out, nrow=args.num_images, padding=1)
        print(f"wrote {len(samples)} images ({what}) to {out}")
        return 0
    strip = out.with_name(out.stem + "_frames.png")
    save_video_grid(samples, out, nrow=args.num_images)
    save_image(samples.flatten(0, 1), strip, nrow=samples.shape[1], padding=1)
    print(
        f"wrote {len(samples)} videos of {samples.shape[1]} frames ({what}) to {out} and the frame strip {strip}"
    )
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def save_video_grid(videos: torch.Tensor, path: Path, nrow: int, fps: int = 4) -> None:
    """An animated GIF of ``[B, T, 3, H, W]`` videos in ``[0, 1]``: frame ``t`` is the grid of every video's
    frame ``t`` (``nrow`` videos per row), looping."""
    from PIL import Image
    from torchvision.utils import make_grid

    grids = [make_grid(videos[:, t], nrow=nrow, padding=1) for t in range(videos.shape[1])]
    frames = [
        Image.fromarray(g.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        for g in grids
    ]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
