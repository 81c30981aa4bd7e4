"""``flowalign optimize-noise``: ReNO at inference time — optimize the initial noise of a frozen (few-step)
model for a weighted sum of differentiable rewards, and write before/after images and the reward trace.

    flowalign optimize-noise --prompt "a photo of two red circles" --reward shapes_match=1 --out reno/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowalign.commands.common import (
    UsageError,
    add_level_arguments,
    add_model_arguments,
    add_video_arguments,
    check_device,
    check_float,
    check_int,
    check_output_dir,
    check_sampling_arguments,
    first_frames,
    load_model_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-code", action="store_true",
        help="let --reward name code by dotted path (package.module:ClassName): it is imported and must be a "
        "rewards.Reward subclass; off by default",
    )  # fmt: skip
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help="differentiable reward; repeat",
    )
    parser.add_argument(
        "--reward-arg",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="reward constructor argument",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps of the generator (default 4; a distilled student's own)",
    )
    add_level_arguments(parser)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--iterations", type=int, default=50, help="optimization iterations (ReNO: 50)")
    parser.add_argument("--lr", type=float, default=5.0, help="SGD learning rate (ReNO: 5)")
    parser.add_argument(
        "--grad-clip", type=float, default=0.1, help="per-sample gradient-norm clip (ReNO: 0.1)"
    )
    parser.add_argument(
        "--reg-weight", type=float, default=0.01, help="chi-norm regularizer weight (ReNO: 0.01)"
    )
    parser.add_argument(
        "--checkpoint", action="store_true", help="checkpoint each step's model call (less memory)"
    )
    parser.add_argument("--resolution", type=int, default=None)
    add_video_arguments(parser)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="prompt i starts from the noise of image 0 of prompt i in flowalign sample",
    )
    parser.add_argument("--out", default="noise_opt", help="output directory")


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    from flowalign.algorithms.noise_opt import optimize_noise
    from flowalign.commands.score import parse_reward_args
    from flowalign.eval.geneval import image_seed
    from flowalign.samplers import SamplingPlan, generate, seeded_generators
    from rewards import WeightedReward, parse_reward_spec

    check_sampling_arguments(args)
    check_device("--device", args.device)
    check_output_dir("--out", args.out)
    check_int("--iterations", args.iterations)
    check_float("--lr", args.lr, least=0)
    check_float("--grad-clip", args.grad_clip, greater=0)
    check_float("--reg-weight", args.reg_weight, least=0)
    reward_args = parse_reward_args(args.reward_arg)
    for spec in args.reward:
        reward_args.setdefault(parse_reward_spec(spec)[0], {}).setdefault("device", args.device)
    reward = WeightedReward.from_specs(args.reward, reward_args, allow_code=args.allow_code)
    if not reward.differentiable:
        names = [n for n, (r, _) in reward.parts.items() if not r.differentiable]
        raise UsageError(f"noise optimization needs differentiable rewards; {names} are not.")
    model = load_model_from_args(args)
    args.steps = args.steps or 4  # a distilled student's own count, set as it loads, comes first
    images = first_frames(args, model)
    if images is not None and args.resolution:
        raise UsageError("--resolution: a video has its first frame's size; resize the --image instead.")
    guidance = model.default_guidance if args.guidance is None else args.guidance
    prompts = list(args.prompt)
    cond = model.encode(prompts, cfg=guidance > 1, images=images)
    size = model.resolution_of(cond) or (args.resolution or model.default_resolution,) * 2
    # Prompt i starts from the noise `flowalign sample` and `bench geneval` give its first image (video).
    seeds = [image_seed(args.seed, i, 0) for i in range(len(prompts))]
    noise = model.initial_noise(len(prompts), *size, seeded_generators(seeds, model.device))
    plan = SamplingPlan.build(args.steps, sde="none", grad="all", checkpoint=args.checkpoint)

    def generate_from(z):
        return generate(
            model,
            None,
            z,
            cond=cond,
            steps=args.steps,
            guidance=guidance,
            resolution=tuple(size),
            plan=plan,
            levels=args.levels,
        ).images

    def reward_fn(images):
        return reward(images, prompts).scores

    result = optimize_noise(
        generate_from, reward_fn, noise, iterations=args.iterations, lr=args.lr, grad_clip=args.grad_clip,
        reg_weight=args.reg_weight,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before, after = result.initial_images, result.best_images
    row = 1
    if before.ndim == 5:  # videos: each row a video's frames (frame strips)
        row = before.shape[1]
        before, after = before.flatten(0, 1), after.flatten(0, 1)
    save_image(before, out / "before.png", nrow=row, padding=1)
    save_image(after, out / "after.png", nrow=row, padding=1)
    pairs = torch.stack(
        [before.view(len(prompts), row, *before.shape[1:]), after.view(len(prompts), row, *after.shape[1:])],
        dim=1,
    )
    save_image(pairs.flatten(0, 2), out / "before_after.png", nrow=row, padding=1)
    summary = {
        "prompts": prompts,
        "rewards": args.reward,
        "initial_reward": result.initial_rewards.tolist(),
        "best_reward": result.best_rewards.tolist(),
        "best_iteration": result.best_iteration.tolist(),
        "trace": result.trace,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
    }
    (out / "trace.json").write_text(json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b, prompt in enumerate(prompts):
        ax.plot([row["reward"][b] for row in result.trace], label=prompt[:40])
    ax.set_xlabel("iteration")
    ax.set_ylabel("weighted reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trace.png", dpi=120)
    for prompt, before, after in zip(prompts, result.initial_rewards.tolist(), result.best_rewards.tolist()):
        print(f"{before:8.4f} -> {after:8.4f}  {prompt}")
    print(f"wrote before.png, after.png, before_after.png, trace.json, trace.png to {out}")
    return 0
