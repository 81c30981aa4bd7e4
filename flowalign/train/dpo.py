"""Preference-optimization recipe on the shared loop: Diffusion-DPO, Flow-DPO, InPO; offline or online pairs.

One iteration: pairs (offline: the next ``pairs_per_step`` from the pair file, latents encoded once and
cached; online: sample groups, score, mine best-vs-worst pairs) -> per pair one ``t`` and one noise shared by
winner and loser (or, for InPO, the inverted latents) -> denoising errors of the trained model and of the
reference -> DPO loss -> optimizer step, repeated ``timesteps_per_pair`` times with fresh levels; the
reference follows the trained weights every ``ref_refresh_every`` steps when asked (online DPO).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign.algorithms.dpo import denoising_error, dpo_loss
from flowalign.data.pairs import PairRecord, load_image, load_pair_file, mine_pairs
from flowalign.samplers.inversion import invert
from flowalign.train.loop import TrainContext, mean_metrics
from flowalign.train.online import sample_and_score
from flowalign.train.recipe import Recipe, prefixed, register_recipe, unprefixed
from flowalign.train.state import EMA

__all__ = ["DPORecipe"]


class _OfflinePairs:
    """A pair file with its latents encoded once (VAE posterior mode) and kept in memory."""

    def __init__(self, ctx: TrainContext):
        self.records: list[PairRecord] = load_pair_file(ctx.config.dpo.pairs)
        self.size = ctx.config.model.resolution or ctx.model.default_resolution
        self.cache: dict[str, Tensor] = {}

    def latent(self, ctx: TrainContext, path) -> Tensor:
        key = str(path)
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = ctx.model.encode_images(
                    load_image(path, self.size)[None].to(ctx.model.device)
                )[0]
        return self.cache[key]

    def batch(self, ctx: TrainContext, step: int):
        per = ctx.config.dpo.pairs_per_step
        n = len(self.records)
        shared = ctx.shared_generator(step // max(1, n // per), "pair_epoch")
        order = torch.randperm(n, generator=shared).tolist()
        start = (step * per) % n
        chosen = [self.records[order[(start + i) % n]] for i in range(per)]
        mine = chosen[ctx.accelerator.process_index :: ctx.accelerator.num_processes]
        prompts = [r.prompt for r in mine]
        x_w = torch.stack([self.latent(ctx, r.chosen) for r in mine])
        x_l = torch.stack([self.latent(ctx, r.rejected) for r in mine])
        return prompts, x_w, x_l, {}


def _online_pairs(ctx: TrainContext, step: int):
    sampled = sample_and_score(ctx, step)
    if sampled is None:
        return None
    p = ctx.config.dpo
    pairs = mine_pairs(sampled.rewards, sampled.batch.group_ids, p.min_gap, p.pairs_per_group)
    metrics = dict(sampled.metrics)
    metrics["pairs"] = float(len(pairs))
    if not pairs:
        return [], None, None, metrics
    final = sampled.trajectory.final
    prompts = [sampled.batch.prompts[w] for w, _ in pairs]
    x_w = torch.stack([final[w] for w, _ in pairs])
    x_l = torch.stack([final[loser] for _, loser in pairs])
    return prompts, x_w, x_l, metrics


def _noise_levels(ctx: TrainContext, count: int, gen: torch.Generator) -> Tensor:
    """Flow: sigmas in (0, 1), logit-normal (SD3's training density) or uniform. Diffusion: indices into
    the scheduler's ``alphas_cumprod``."""
    p = ctx.config.dpo
    if ctx.model.kind == "diffusion":
        num_train = len(ctx.model.pipeline.scheduler.alphas_cumprod)
        return torch.randint(0, num_train, (count,), generator=gen, device=gen.device)
    if p.timesteps == "logit_normal":
        return torch.sigmoid(
            p.logit_mean + p.logit_std * torch.randn(count, generator=gen, device=gen.device)
        )
    return torch.rand(count, generator=gen, device=gen.device).clamp(1e-3, 1 - 1e-3)


def _noised(ctx: TrainContext, x0: Tensor, level: Tensor, noise: Tensor):
    """``(x_t, model timestep, target)`` for clean latents ``x0`` at ``level``."""
    model = ctx.model
    if model.kind == "flow":
        s = level.view(-1, *([1] * (x0.ndim - 1)))
        num_train = model.pipeline.scheduler.config.num_train_timesteps
        return (1 - s) * x0 + s * noise, level * num_train, noise - x0
    abar = model.pipeline.scheduler.alphas_cumprod.to(x0.device)[level].view(-1, *([1] * (x0.ndim - 1)))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    if model.prediction_type == "v_prediction":
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    else:
        target = noise
    return x_t, level.float(), target


def _inversion(ctx: TrainContext, x0: Tensor, cond, gen: torch.Generator):
    """InPO: invert ``x0`` with the model up a short schedule, to the noisiest of ``timesteps_per_pair``
    random levels; returns a function giving, for the ``k``-th level, the inverted latent and the noise it
    implies as the target (eps for diffusion, eps - x0 for flow)."""
    model, p = ctx.model, ctx.config.dpo
    schedule = model.schedule(p.inversion_steps, x0.shape[1:])
    indices = torch.randint(0, p.inversion_steps, (p.timesteps_per_pair,), generator=gen, device=gen.device)
    states = invert(model, x0, cond, schedule, stop_index=int(indices.min()))

    def level(k: int):
        index = int(indices[k])
        x_t = states[:, index]
        if model.kind == "flow":
            sigma = schedule.sigmas[index]
            eps = (x_t - (1 - sigma) * x0) / sigma
            return x_t, schedule.timesteps[index].expand(x0.shape[0]), eps - x0
        abar = schedule.alphas_cumprod[index]
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        if model.prediction_type == "v_prediction":
            target = abar.sqrt() * eps - (1 - abar).sqrt() * x0
        else:
            target = eps
        return x_t, schedule.timesteps[index].expand(x0.shape[0]), target

    return level


@register_recipe("dpo")
class DPORecipe(Recipe):
    """Diffusion-DPO / Flow-DPO / InPO. Owns the reference when it is not the LoRA-disabled base model (a
    snapshot of the weights, refreshed every ``dpo.ref_refresh_every`` steps, or the initial weights under
    full fine-tuning) and, with a pair file, the pairs' cached latents."""

    ref: EMA | None
    pairs: _OfflinePairs | None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        p = ctx.config.dpo
        self.ref = EMA(ctx.trainable) if p.ref_refresh_every > 0 or not ctx.model.has_lora else None
        self.pairs = _OfflinePairs(ctx) if p.pairs != "online" else None

    def iteration(self, step: int) -> dict[str, float]:
        return _dpo_iteration(self.ctx, step, self.ref, self.pairs)

    def state_dict(self) -> dict[str, Tensor]:
        return prefixed("ref", self.ref.state_dict()) if self.ref is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.ref is not None:
            self.ref.load_state_dict(unprefixed("ref", state))
        else:
            super().load_state_dict(state)


def _dpo_iteration(
    ctx: TrainContext, step: int, ref: EMA | None, offline: _OfflinePairs | None
) -> dict[str, float]:
    model, p = ctx.model, ctx.config.dpo
    if offline is None:
        mined = _online_pairs(ctx, step)
        if mined is None:
            return {"skipped_nonfinite_reward": 1.0}
        prompts, x_w, x_l, metrics = mined
    else:
        prompts, x_w, x_l, metrics = offline.batch(ctx, step)
    if not prompts:
        ctx.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "skipped_no_pairs": 1.0}
    gen = ctx.generator(step, "dpo")
    n = len(prompts)
    cond = model.encode(prompts, cfg=False)
    both = cond.select(list(range(n)) * 2)
    x0 = torch.cat([x_w, x_l]).float()
    # The reference: a snapshot of the weights (refreshed for online DPO; the initial weights for full
    # fine-tuning), or the LoRA disabled.
    inverted = _inversion(ctx, x0, both, gen) if p.inversion else None
    rows: list[dict[str, float]] = []
    for k in range(p.timesteps_per_pair):
        if inverted is not None:
            x_t, timestep, target = inverted(k)
        else:
            level = _noise_levels(ctx, n, gen).repeat(2)
            noise = torch.randn(x_w.shape, generator=gen, device=gen.device).repeat(
                2, *([1] * (x_w.ndim - 1))
            )
            x_t, timestep, target = _noised(ctx, x0, level, noise)
        with torch.no_grad(), ref.applied() if ref is not None else model.reference(), ctx.clock("forward"):
            ref_error = denoising_error(model.predict(x_t, timestep, both, 1.0), target)
        with ctx.clock("forward"):
            model_error = denoising_error(model.predict(x_t, timestep, both, 1.0), target)
        loss, terms = dpo_loss(model_error[:n], model_error[n:], ref_error[:n], ref_error[n:], p.beta)
        with ctx.clock("backward"):
            ctx.accelerator.backward(loss)
        rows.append({**{name: float(v) for name, v in terms.items()}, **ctx.optimizer_step()})
    metrics.update(mean_metrics(rows))
    if ref is not None and p.ref_refresh_every > 0 and (step + 1) % p.ref_refresh_every == 0:
        ref.update(0.0)
    return metrics
