"""``flowalign sample``: prompts in, a PNG grid out (one row per prompt)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowalign.commands.common import add_model_arguments, load_model_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png", help="output PNG path (default samples.png)")


def run(args: argparse.Namespace) -> int:
    from torchvision.utils import save_image

    from flowalign.samplers import SamplingPlan, rollout

    if args.num_images < 1:
        raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
    model = load_model_from_args(args)
    steps = args.steps or model.default_steps
    guidance = model.default_guidance if args.guidance is None else args.guidance
    height = args.height or model.default_resolution
    width = args.width or model.default_resolution
    generator = torch.Generator(model.device).manual_seed(args.seed)
    cond = model.encode(args.prompt).repeat(args.num_images)
    noise = model.initial_noise(len(cond), height, width, generator)
    schedule = model.schedule(steps, noise.shape[1:])
    with torch.no_grad():
        images = rollout(model, cond, noise, schedule, SamplingPlan.ode(steps), guidance=guidance).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=args.num_images, padding=1)
    print(f"wrote {len(images)} images ({len(args.prompt)} prompts x {args.num_images}) to {out}")
    return 0
