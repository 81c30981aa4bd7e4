"""Online RL recipes on the shared loop: Flow-GRPO (DDPO for diffusion models) and DiffusionNFT.

One iteration of each (all randomness from ``ctx.generator(step, ...)``):

``grpo``: prompts -> encode -> SDE rollout with log-probs (no grad) -> decode -> rewards, gathered over
processes -> group advantages -> for each inner epoch and minibatch, for each trained step: recompute the
step's log-prob with the same step function, clipped-ratio loss (+ KL to the adapters-disabled reference)
-> backward -> one optimizer step per minibatch -> EMA.

``nft``: prompts -> rollout of the old (EMA) policy, CFG-free -> rewards -> advantages -> for each
minibatch: re-noise the clean samples at random sigmas, old and current velocities, DiffusionNFT loss ->
optimizer step -> the old policy follows the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.algorithms.advantages import multi_reward_advantages
from flowalign.algorithms.grpo import grpo_loss, guard_log_ratio, step_kl
from flowalign.algorithms.nft import nft_loss
from flowalign.data.prompts import GroupBatch
from flowalign.samplers import Rollout, SamplingPlan, chunks, denoise_step, generate
from flowalign.samplers.steps import randn
from flowalign.train.loop import TrainContext, mean_metrics
from flowalign.train.recipe import Recipe, prefixed, register_recipe, unprefixed
from flowalign.train.state import EMA

__all__ = ["GRPORecipe", "NFTRecipe", "SampledGroups", "sample_and_score", "sampling_plan"]


def sampling_plan(ctx: TrainContext, step: int, schedule) -> SamplingPlan:
    """The iteration's plan: the configured SDE window (its start shifted at random as in Flow-GRPO-Fast, or
    sliding as in MixGRPO), or every step whose transition is stochastic."""
    s = ctx.config.sampling
    n = s.steps
    dynamics = ctx.dynamics
    if s.sde_window is not None:
        start, size = s.sde_window
        if s.sde_window_shift and s.sde_window_mode == "sliding":
            start += (step // s.sde_window_interval) % (s.sde_window_shift + 1)
        elif s.sde_window_shift:
            shared = ctx.shared_generator(step, "window")
            start += int(
                torch.randint(0, s.sde_window_shift + 1, (1,), generator=shared, device=shared.device)
            )
        window = (start, size)
    else:
        # CPS lands deterministically on sigma = 0, DDIM on abar = 1: those last steps stay ODE.
        levels = schedule.sigmas if schedule.kind == "flow" else 1 - schedule.alphas_cumprod
        deterministic_last = (dynamics == "cps" or dynamics == "ddim") and float(levels[-1]) == 0.0
        window = (0, n - 1) if deterministic_last else "all"
    return SamplingPlan.build(
        n, sde=window, dynamics=dynamics, noise_level=s.noise_level, reduction=s.reduction
    )


@dataclass
class SampledGroups:
    """One iteration's samples on this process and their group advantages."""

    batch: GroupBatch
    cond: object
    trajectory: Rollout
    advantages: Tensor  # [n] this process's samples
    rewards: Tensor  # [n] this process's weighted rewards
    metrics: dict[str, float]
    all_rewards: dict[str, Tensor]  # [N] every process's reward components, gathered
    all_advantages: Tensor  # [N] every process's advantages


def _resolution(ctx: TrainContext) -> int | None:
    """``model.resolution``, or the model's default (a video model's is its conditioning images' size)."""
    if ctx.model.is_video:
        return ctx.config.model.resolution
    return ctx.config.model.resolution or ctx.model.default_resolution


def sample_and_score(
    ctx: TrainContext,
    step: int,
    plan_fn=sampling_plan,
    cfg: bool | None = None,
    advantage=None,
    batch: GroupBatch | None = None,
) -> SampledGroups | None:
    """Rollouts of this iteration's groups (``batch``; None: ``ctx.sampler.batch(step)``), their rewards
    gathered over processes, and advantages.
    ``advantage``: the section (``config.grpo`` / ``config.nft``) whose ``multi_reward`` and
    ``std_scope`` define the advantages; None computes none (all zeros; online DPO ranks the rewards).
    Returns None (and the caller skips the iteration) when a reward is NaN/inf."""
    config, model, acc = ctx.config, ctx.model, ctx.accelerator
    batch = ctx.sampler.batch(step) if batch is None else batch
    guidance = config.sampling.guidance if cfg is None or cfg else 1.0
    cond = ctx.encode(batch, cfg=guidance > 1)
    shared = config.sampling.group_noise == "shared"
    with torch.no_grad(), ctx.clock("forward"):
        trajectory = generate(
            model, None, ctx.sample_generators(step, "noise", batch.group_ids, per_group=shared), cond=cond,
            steps=config.sampling.steps, guidance=guidance, resolution=_resolution(ctx),
            plan=lambda schedule: plan_fn(ctx, step, schedule),
            sde_generators=ctx.sample_generators(step, "sde", batch.group_ids),
            micro_batch_size=config.train.micro_batch_size, levels=ctx.levels,
        )  # fmt: skip
    with ctx.clock("reward"):
        scored = ctx.reward(trajectory.images, batch.prompts, batch.metadata, batch.group_ids)
    components = {k: acc.gather(v.float().contiguous()) for k, v in scored.components.items()}
    group_ids = acc.gather(batch.group_ids.to(acc.device))
    metrics = {f"reward_{k}": v.mean().item() for k, v in components.items()}
    total = sum(ctx.reward.weights[k] * components[k] for k in components)
    metrics["reward"] = total.mean().item()
    if not all(torch.isfinite(v).all() for v in components.values()):
        return None
    if advantage is None:
        advantages = torch.zeros_like(total)
    else:
        advantages = multi_reward_advantages(
            components, ctx.reward.weights, group_ids, mode=advantage.multi_reward, scope=advantage.std_scope
        )
        metrics["advantage_abs"] = advantages.abs().mean().item()
    local = advantages.view(acc.num_processes, -1)[acc.process_index]
    local_rewards = total.view(acc.num_processes, -1)[acc.process_index].to(model.device)
    return SampledGroups(
        batch, cond, trajectory, local.to(model.device), local_rewards, metrics, components, advantages
    )


def _trained_steps(ctx: TrainContext, step: int, trajectory: Rollout) -> list[int]:
    """Stochastic steps to train: all but the schedule's last (Flow-GRPO), or a random subset."""
    last = trajectory.plan.num_steps - 1
    served = ctx.model.trains(trajectory.schedule.timesteps[: trajectory.plan.num_steps]).tolist()
    candidates = [i for i in trajectory.sde_steps.tolist() if i != last] or trajectory.sde_steps.tolist()
    candidates = [i for i in candidates if served[i]]  # a two-expert model trains one expert's steps
    if not candidates:
        raise ValueError(
            "no stochastic step of the sampling window runs the trained expert (model.expert); move "
            "sampling.sde_window onto its noise levels or train the other expert."
        )
    k = ctx.config.sampling.train_steps
    if k is None or k >= len(candidates):
        return candidates
    shared = ctx.shared_generator(step, "train_steps")
    pick = torch.randperm(len(candidates), generator=shared, device=shared.device)[:k]
    return sorted(candidates[i] for i in pick.tolist())


@register_recipe("grpo")
class GRPORecipe(Recipe):
    """Flow-GRPO (flow models) or DDPO (diffusion models); no state beyond the trained weights (the
    reference is the model with its LoRA disabled)."""

    def setup(self, ctx: TrainContext) -> None:
        ctx.dynamics  # noqa: B018  (a rollout SDE that does not fit the model fails before training)
        super().setup(ctx)

    def iteration(self, step: int) -> dict[str, float]:
        return _grpo_iteration(self.ctx, step)


def _grpo_loss_at(
    ctx: TrainContext, traj: Rollout, index: Tensor, i: int, column: int, sub, advantages: Tensor
) -> tuple[Tensor, dict]:
    """The clipped-ratio loss (+ KL) of samples ``index`` at step ``i`` (column ``column`` of the stored
    log-probs), recomputed with the step function that drew them."""
    g, s = ctx.config.grpo, ctx.config.sampling
    with ctx.clock("forward"):
        out = denoise_step(
            ctx.model, traj.latents[index, i], i, sub, traj.schedule, traj.plan, s.guidance,
            prev_sample=traj.latents[index, i + 1],
        )  # fmt: skip
    old = traj.log_probs[index, column]
    log_ratio = None
    if g.guard:
        log_ratio = guard_log_ratio(
            out.log_prob, old, out.mean, traj.means[index, column], out.std, s.reduction
        )
    loss, metrics = grpo_loss(
        out.log_prob,
        old,
        advantages[index],
        clip_range=g.clip_range,
        adv_clip=g.adv_clip,
        log_ratio=log_ratio,
    )
    if g.kl_beta > 0:
        with torch.no_grad(), ctx.model.reference(), ctx.clock("forward"):
            ref = denoise_step(
                ctx.model, traj.latents[index, i], i, sub, traj.schedule, traj.plan, s.guidance,
                prev_sample=traj.latents[index, i + 1],
            )  # fmt: skip
        dsigma = None
        if traj.schedule.kind == "flow" and traj.plan.dynamics != "cps":
            dsigma = traj.schedule.sigmas[i + 1] - traj.schedule.sigmas[i]
        kl = step_kl(out.mean, ref.mean, out.std, form=g.kl_form, dsigma=dsigma, reduction=s.reduction).mean()
        loss = loss + g.kl_beta * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def _grpo_iteration(ctx: TrainContext, step: int) -> dict[str, float]:
    sampled = sample_and_score(ctx, step, advantage=ctx.config.grpo)
    if sampled is None:
        return {"skipped_nonfinite_reward": 1.0}
    g = ctx.config.grpo
    traj, cond, advantages = sampled.trajectory, sampled.cond, sampled.advantages
    steps = _trained_steps(ctx, step, traj)
    column = {i: c for c, i in enumerate(traj.sde_steps.tolist())}
    n = traj.latents.shape[0]
    kept = torch.arange(n, device=traj.latents.device)
    if g.skip_zero_advantage:
        if ctx.accelerator.num_processes > 1:
            raise ValueError(
                "grpo.skip_zero_advantage runs on one process only (processes must run the same number of "
                "backward passes); set grpo.skip_zero_advantage=false for multi-process training."
            )
        kept = (advantages != 0).nonzero().flatten()
        if len(kept) == 0:
            return {**sampled.metrics, "informative_fraction": 0.0}
    rows: list[dict] = []
    for epoch in range(g.inner_epochs):
        gen = ctx.generator(step, f"perm{epoch}")
        perm = torch.randperm(len(kept), generator=gen, device=gen.device).to(kept.device)
        order = kept[perm]
        for minibatch in order.split(g.minibatch_size):
            micro = chunks(len(minibatch), ctx.config.train.micro_batch_size)
            for position, i in enumerate(steps):
                for m, part in enumerate(micro):
                    last = position == len(steps) - 1 and m == len(micro) - 1
                    with ctx.micro_batch(sync=last):
                        index = minibatch[part]
                        loss, metrics = _grpo_loss_at(
                            ctx, traj, index, i, column[i], cond.select(index), advantages
                        )
                        share = len(index) / len(minibatch)  # micro-batch losses add up to the minibatch mean
                        ctx.backward(loss * share / len(steps), sync=last)
                        rows.append(metrics)
            rows.append(ctx.optimizer_step())
    informative = {"informative_fraction": len(kept) / n, "trained_steps": float(len(steps))}
    return {**sampled.metrics, **mean_metrics(rows), **informative}


@register_recipe("nft")
class NFTRecipe(Recipe):
    """DiffusionNFT (flow models). Owns the old policy: an EMA of the trained weights that samples."""

    old: EMA

    def setup(self, ctx: TrainContext) -> None:
        if ctx.model.kind != "flow":
            raise ValueError(
                "DiffusionNFT is defined for flow models; use train.algorithm=grpo (DDPO) for diffusion models."
            )
        ctx.dynamics  # noqa: B018
        super().setup(ctx)
        self.old = EMA(ctx.trainable)

    def iteration(self, step: int) -> dict[str, float]:
        return _nft_iteration(self.ctx, step, self.old)

    def state_dict(self) -> dict[str, Tensor]:
        return prefixed("old", self.old.state_dict())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.old.load_state_dict(unprefixed("old", state))


def _nft_iteration(ctx: TrainContext, step: int, old: EMA) -> dict[str, float]:
    with old.applied():
        sampled = sample_and_score(ctx, step, cfg=False, advantage=ctx.config.nft)
    if sampled is None:
        return {"skipped_nonfinite_reward": 1.0}
    cfg = ctx.config.nft
    x0_all, cond, advantages = sampled.trajectory.final, sampled.cond, sampled.advantages
    schedule = sampled.trajectory.schedule
    n, num_levels = x0_all.shape[0], schedule.num_steps
    if cfg.timesteps_per_sample > num_levels:
        raise ValueError(
            f"nft.timesteps_per_sample={cfg.timesteps_per_sample} exceeds sampling.steps={num_levels}."
        )
    allowed = ctx.model.trains(schedule.timesteps[:num_levels]).nonzero().squeeze(1)  # one expert of two
    if cfg.timesteps_per_sample > len(allowed):
        raise ValueError(
            f"nft.timesteps_per_sample={cfg.timesteps_per_sample} exceeds the {len(allowed)} of sampling.steps="
            f"{num_levels} noise levels that the trained expert (model.expert) serves; lower it or add steps."
        )
    rows: list[dict] = []
    for epoch in range(cfg.inner_epochs):
        gen = ctx.generator(step, f"nft{epoch}")
        order = torch.randperm(n, generator=gen, device=gen.device)
        # Each sample's draws come from its own generator (keyed by its global group and index), so that 1
        # or N processes and any minibatch split train on the same noise. As the reference: each sample
        # trains on the sampling schedule's noise levels in its own random order.
        sample_gens = ctx.sample_generators(step, f"nft{epoch}", sampled.batch.group_ids)
        levels = allowed[
            torch.stack([torch.randperm(len(allowed), generator=g, device=g.device) for g in sample_gens])
        ]
        for minibatch in order.split(cfg.minibatch_size):
            micro = chunks(len(minibatch), ctx.config.train.micro_batch_size)
            x0 = x0_all[minibatch]
            for k in range(cfg.timesteps_per_sample):
                level = levels[minibatch, k]
                eps = randn(x0.shape, [sample_gens[i] for i in minibatch.tolist()], x0.device)
                x_t = ctx.model.path.noised(x0, schedule.sigmas[level], eps)
                for m, part in enumerate(micro):
                    last = k == cfg.timesteps_per_sample - 1 and m == len(micro) - 1
                    with ctx.micro_batch(sync=last):
                        index = minibatch[part]
                        sub, sigma, timestep = (
                            cond.select(index),
                            schedule.sigmas[level[part]],
                            schedule.timesteps[level[part]],
                        )
                        with torch.no_grad(), old.applied(), ctx.clock("forward"):
                            old_velocity = ctx.model.predict(x_t[part], timestep, sub, 1.0)
                        with ctx.clock("forward"):
                            velocity = ctx.model.predict(x_t[part], timestep, sub, 1.0)
                        loss, metrics = nft_loss(
                            velocity, old_velocity, x_t[part], x0[part], sigma, advantages[index], beta=cfg.beta,
                            adv_clip=cfg.adv_clip,
                        )  # fmt: skip
                        share = len(index) / len(minibatch)  # micro-batch losses add up to the minibatch mean
                        ctx.backward(loss * share / cfg.timesteps_per_sample, sync=last)
                        rows.append(metrics)
            rows.append(ctx.optimizer_step())
    old.update(min(cfg.old_decay_max, cfg.old_decay_rate * step))
    return {**sampled.metrics, **mean_metrics(rows)}
