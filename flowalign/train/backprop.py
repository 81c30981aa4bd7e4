"""Reward backpropagation recipe on the shared loop (AlignProp, DRaFT-K, DRaFT-LV, ReFL, + KL).

One iteration: prompts -> rollout whose plan lets gradients through a window of steps (checkpointed per
step) -> decode -> differentiable reward -> ``loss = -mean(reward) + kl_beta * |v - v_ref|^2`` ->
backward -> optimizer step -> EMA. See :mod:`flowalign.algorithms.backprop` for the methods.
"""

from __future__ import annotations

import torch

from flowalign.algorithms.backprop import draft_lv_loss, velocity_kl
from flowalign.samplers import SamplingPlan, chunks, generate
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
    dynamics = "ddim" if ctx.model.kind == "diffusion" else "flow_grpo"  # ODE steps: no SDE is drawn
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
    n = len(batch.prompts)
    cond = ctx.encode(batch, cfg=s.guidance > 1)
    noise_gens = ctx.sample_generators(step, "noise", batch.group_ids)
    lv_gens = ctx.sample_generators(step, "lv", batch.group_ids)
    plan = backprop_plan(ctx, step)  # one gradient window for every micro-batch
    micro = chunks(n, config.train.micro_batch_size)
    if ctx.reward.groupwise and len(micro) > 1 and config.train.micro_batch_size % config.data.group_size:
        raise ValueError(
            f"train.micro_batch_size={config.train.micro_batch_size} splits groups of data.group_size="
            f"{config.data.group_size}, but a groupwise reward scores whole groups; use a multiple of it."
        )
    scores, components, kls, losses = [], {}, [], []
    for m, part in enumerate(micro):
        with ctx.micro_batch(sync=m == len(micro) - 1):
            sub = cond.select(part)
            count = part.stop - part.start

            def reward_of(images, part=part):
                index = list(range(n))[part]
                return ctx.reward(
                    images,
                    [batch.prompts[i] for i in index],
                    [batch.metadata[i] for i in index],
                    batch.group_ids[part],
                )

            with ctx.clock("forward"):
                if b.mode == "draft_lv":
                    with torch.no_grad():
                        out = generate(
                            model, None, noise_gens[part], cond=sub, steps=s.steps, guidance=s.guidance,
                            resolution=config.model.resolution, plan=plan, decode=False, levels=ctx.levels,
                        )  # fmt: skip
                    last = s.steps - 1
                    loss = draft_lv_loss(
                        model, lambda images, f=reward_of: f(images).scores, out.final, sub,
                        out.schedule.timesteps[last], out.schedule.sigmas[last], repeats=b.lv_repeats,
                        guidance=s.guidance, generator=lv_gens[part],
                    )  # fmt: skip
                    scores.append(-loss.detach().expand(count))
                else:
                    out = generate(
                        model, None, noise_gens[part], cond=sub, steps=s.steps, guidance=s.guidance,
                        resolution=config.model.resolution, plan=plan, levels=ctx.levels,
                    )  # fmt: skip
                    scored = reward_of(out.images)
                    loss = -scored.scores.mean()
                    scores.append(scored.scores.detach())
                    for k, v in scored.components.items():
                        components.setdefault(k, []).append(v.detach())
                    if b.kl_beta > 0:
                        kl = velocity_kl(model, out, sub, s.guidance, form=b.kl_form).mean()
                        loss = loss + b.kl_beta * kl
                        kls.append(kl.detach() * count)
            share = count / n  # micro-batch losses add up to the batch mean
            ctx.backward(loss * share, sync=m == len(micro) - 1)
            losses.append(loss.detach() * count)
    metrics: dict[str, float] = {
        "grad_steps": float(sum(plan.grad)),
        "reward": torch.cat(scores).mean().item(),
    }
    metrics.update({f"reward_{k}": torch.cat(v).mean().item() for k, v in components.items()})
    if kls:
        metrics["kl"] = (sum(kls) / n).item()
    metrics.update(ctx.optimizer_step())
    metrics["loss"] = (sum(losses) / n).item()
    return metrics
