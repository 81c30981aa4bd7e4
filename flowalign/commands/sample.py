"""``flowalign sample``: prompts in, a PNG grid out (one row per prompt)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowalign.commands.common import (
    add_level_arguments,
    add_model_arguments,
    check_int,
    check_output_file,
    check_sampling_arguments,
    load_model_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
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
    parser.add_argument("--out", default="samples.png", help="output PNG path (default samples.png)")


def run(args: argparse.Namespace) -> int:
    from torchvision.utils import save_image

    from flowalign.eval.geneval import image_seed
    from flowalign.samplers import generate, seeded_generators

    check_int("--num-images", args.num_images)
    check_output_file("--out", args.out, (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"))
    check_sampling_arguments(args)
    model = load_model_from_args(args)
    jobs = [(i, j) for i in range(len(args.prompt)) for j in range(args.num_images)]
    with torch.no_grad():
        images = generate(
            model, [args.prompt[i] for i, _ in jobs],
            seeded_generators([image_seed(args.seed, i, j) for i, j in jobs], model.device),
            steps=args.steps or model.default_steps,
            guidance=model.default_guidance if args.guidance is None else args.guidance,
            resolution=(args.height, args.width), micro_batch_size=args.micro_batch_size, levels=args.levels,
        ).images  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=args.num_images, padding=1)
    print(f"wrote {len(images)} images ({len(args.prompt)} prompts x {args.num_images}) to {out}")
    return 0
