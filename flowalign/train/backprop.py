"""Reward backpropagation recipe on the shared loop (AlignProp, DRaFT-K, DRaFT-LV, ReFL, + KL).

One iteration: prompts -> rollout whose plan lets gradients through a window of steps (checkpointed per
step) -> decode -> differentiable reward -> ``loss = -mean(reward) + kl_beta * |v - v_ref|^2`` ->
backward -> optimizer step -> EMA. See :mod:`flowalign.algorithms.backprop` for the methods.
"""

from __future__ import annotations

import torch

from flowalign.algorithms.backprop import draft_lv_loss, velocity_kl
from flowalign.samplers import SamplingPlan, rollout
from flowalign.train.loop import TrainContext
from flowalign.train.recipe import Recipe, register_recipe

__all__ = ["BackpropRecipe", "backprop_plan"]

_GRAD_MODES = {
    "alignprop": "random_k",
    "draft": "last_k",
    "refl": "single",
    "full": "all",
    "draft_lv": "none",
}


def backprop_plan(ctx: TrainContext, step: int) -> SamplingPlan:
    b, s = ctx.config.backprop, ctx.config.sampling
    dynamics = "ddim" if ctx.model.kind == "diffusion" else s.dynamics
    return SamplingPlan.build(
        s.steps, sde="none", grad=_GRAD_MODES[b.mode], k=b.k, k_min=b.k_min, checkpoint=b.checkpoint,
        dynamics=dynamics, generator=ctx.shared_generator(step, "window"),
    )  # fmt: skip


@register_recipe("backprop")
class BackpropRecipe(Recipe):
    """Reward backpropagation (AlignProp, DRaFT-K/LV, ReFL, + KL); no state beyond the trained weights."""

    def setup(self, ctx: TrainContext) -> None:
        if not ctx.reward.differentiable:
            raise ValueError(
                "reward backprop needs differentiable rewards; "
                f"{[name for name, (r, _) in ctx.reward.parts.items() if not r.differentiable]} are not."
            )
        super().setup(ctx)

    def iteration(self, step: int) -> dict[str, float]:
        return _backprop_iteration(self.ctx, step)


def _backprop_iteration(ctx: TrainContext, step: int) -> dict[str, float]:
    config, model = ctx.config, ctx.model
    b, s = config.backprop, config.sampling
    batch = ctx.sampler.batch(step)
    cond = model.encode(batch.prompts, cfg=s.guidance > 1)
    size = config.model.resolution or model.default_resolution
    noise = model.initial_noise(
        len(batch.prompts), size, size, ctx.sample_generators(step, "noise", batch.group_ids)
    )
    schedule = model.schedule(s.steps, noise.shape[1:])
    plan = backprop_plan(ctx, step)
    metrics: dict[str, float] = {"grad_steps": float(sum(plan.grad))}

    def reward_of(images):
        return ctx.reward(images, batch.prompts, batch.metadata, batch.group_ids)

    with ctx.clock("forward"):
        if b.mode == "draft_lv":
            with torch.no_grad():
                out = rollout(model, cond, noise, schedule, plan, guidance=s.guidance, decode=False)
            last = s.steps - 1
            loss = draft_lv_loss(
                model, lambda images: reward_of(images).scores, out.final, cond, schedule.timesteps[last],
                schedule.sigmas[last], repeats=b.lv_repeats, guidance=s.guidance,
                generator=ctx.generator(step, "lv"),
            )  # fmt: skip
            metrics["reward"] = -loss.item()
        else:
            out = rollout(model, cond, noise, schedule, plan, guidance=s.guidance)
            scored = reward_of(out.images)
            loss = -scored.scores.mean()
            metrics["reward"] = scored.scores.mean().item()
            metrics.update({f"reward_{k}": v.mean().item() for k, v in scored.components.items()})
            if b.kl_beta > 0:
                kl = velocity_kl(model, out, cond, s.guidance).mean()
                loss = loss + b.kl_beta * kl
                metrics["kl"] = kl.item()
    ctx.backward(loss)
    metrics.update(ctx.optimizer_step())
    metrics["loss"] = loss.item()
    return metrics
