"""Training-time evaluation: deterministic ODE samples on held-out prompts, scored by the training rewards.

Uses the EMA weights when the run keeps an EMA. Writes a PNG grid per evaluation under
``<output_dir>/eval/`` and returns ``eval/reward_<name>`` metrics.
"""

from __future__ import annotations

import contextlib

import torch

from flowalign.data.prompts import load_prompt_set
from flowalign.samplers import SamplingPlan, rollout
from flowalign.train.loop import TrainContext

__all__ = ["evaluate_rewards"]


@torch.no_grad()
def evaluate_rewards(ctx: TrainContext, step: int) -> dict[str, float]:
    config, model, acc = ctx.config, ctx.model, ctx.accelerator
    e = config.eval
    records = load_prompt_set(e.prompts)[: e.max_prompts]
    mine = records[acc.process_index :: acc.num_processes]
    if not mine:
        return {}
    prompts = [r.prompt for r in mine for _ in range(e.images_per_prompt)]
    metadata = [dict(r.metadata) for r in mine for _ in range(e.images_per_prompt)]
    steps = e.steps or config.sampling.steps
    guidance = config.sampling.guidance if e.guidance is None else e.guidance
    size = config.model.resolution or model.default_resolution
    # The same noise at every evaluation, so curves compare like with like.
    generator = torch.Generator(model.device).manual_seed(config.train.seed * 7919 + acc.process_index)
    noise = model.initial_noise(len(prompts), size, size, generator)
    cond = model.encode(prompts, cfg=guidance > 1)
    schedule = model.schedule(steps, noise.shape[1:])
    ema = ctx.emas.get("ema")
    with ema.applied() if ema is not None else contextlib.nullcontext():
        images = rollout(model, cond, noise, schedule, SamplingPlan.ode(steps), guidance=guidance).images
    scored = ctx.reward(images, prompts, metadata)
    out = {
        f"eval/reward_{k}": acc.gather(v.float().contiguous()).mean().item()
        for k, v in scored.components.items()
    }
    if acc.is_main_process:
        from torchvision.utils import save_image

        directory = ctx.output_dir / "eval"
        directory.mkdir(parents=True, exist_ok=True)
        save_image(
            images[: 8 * e.images_per_prompt],
            directory / f"step-{step:06d}.png",
            nrow=e.images_per_prompt * 4,
            padding=1,
        )
    return out
