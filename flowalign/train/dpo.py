"""Preference-optimization recipe on the shared loop: Diffusion-DPO, Flow-DPO, InPO; offline or online pairs.

One iteration: pairs (offline: the next ``pairs_per_step`` from the pair file, latents encoded once and
cached; online: sample groups, score, mine best-vs-worst pairs; for an image-to-video model, pairs of videos
from one first frame, which conditions both) -> per pair one ``t`` and one noise shared by
winner and loser (or, for InPO, the inverted latents) -> denoising errors of the trained model and of the
reference -> DPO loss -> optimizer step, repeated ``timesteps_per_pair`` times with fresh levels; the
reference follows the trained weights every ``ref_refresh_every`` steps when asked (online DPO).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from flowalign.algorithms.dpo import denoising_error, dpo_loss
from flowalign.data.pairs import PairRecord, load_image, load_pair_file, load_video, mine_pairs
from flowalign.data.prompts import condition_images
from flowalign.samplers import chunks
from flowalign.samplers.inversion import invert
from flowalign.samplers.steps import randn
from flowalign.train.loop import TrainContext, mean_metrics
from flowalign.train.online import sample_and_score
from flowalign.train.recipe import Recipe, prefixed, register_recipe, unprefixed
from flowalign.train.state import EMA

__all__ = ["DPORecipe"]


class _Pairs(NamedTuple):
    """One process's pairs of an iteration: prompts, winners' and losers' latents, the pairs' keys (for
    their generators), metrics, and for a video model the first frames ``[P, 3, H, W]`` (else None)."""

    prompts: list[str]
    x_w: Tensor | None
    x_l: Tensor | None
    keys: Tensor
    metrics: dict[str, float]
    images: Tensor | None = None


def _no_pairs(metrics: dict[str, float]) -> _Pairs:
    return _Pairs([], None, None, torch.zeros(0, dtype=torch.long), metrics)


class _OfflinePairs:
    """A pair file streamed from disk: each image (or video) is read and VAE-encoded (posterior mode) when a
    batch needs it; the ``dpo.latent_cache_size`` most recently used latents are kept in CPU memory (LRU),
    so memory stays bounded whatever the file's size."""

    def __init__(self, ctx: TrainContext):
        model = ctx.model
        self.records: list[PairRecord] = load_pair_file(ctx.config.dpo.pairs, first_frame=model.takes_images)
        self.size = ctx.config.model.resolution or ctx.model.default_resolution
        self.capacity = ctx.config.dpo.latent_cache_size
        self.cache: OrderedDict[str, Tensor] = OrderedDict()

    def latent(self, ctx: TrainContext, path, size: tuple[int, int] | None = None) -> Tensor:
        """The latent of the image or video at ``path`` (an image-to-video pair's videos have their first
        frame's ``size``; other videos ``model.resolution``)."""
        key = str(path)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key].to(ctx.model.device)
        model = ctx.model
        if not model.is_video:
            pixels = load_image(path, self.size)
        else:
            pixels = load_video(path, model.num_frames, size or (self.size, self.size))
        with torch.no_grad():
            latent = model.encode_images(pixels[None].to(model.device))[0]
        if self.capacity > 0:
            self.cache[key] = latent.cpu()
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return latent

    def batch(self, ctx: TrainContext, step: int) -> _Pairs:
        per = ctx.config.dpo.pairs_per_step
        n = len(self.records)
        shared = ctx.shared_generator(step // max(1, n // per), "pair_epoch")
        order = torch.randperm(n, generator=shared, device=shared.device).tolist()
        start = (step * per) % n
        chosen = [self.records[order[(start + i) % n]] for i in range(per)]
        acc = ctx.accelerator
        keys = list(range(per))[acc.process_index :: acc.num_processes]  # pair i of this step's selection
        if not keys:
            return _no_pairs({})
        mine = [chosen[i] for i in keys]
        prompts = [r.prompt for r in mine]
        images = None
        if ctx.model.takes_images:  # one size for all, checked as a prompt file's first frames are
            images = condition_images([{"image": str(r.image)} for r in mine], "dpo.pairs")
        size = None if images is None else tuple(images.shape[-2:])
        x_w = torch.stack([self.latent(ctx, r.chosen, size) for r in mine])
        x_l = torch.stack([self.latent(ctx, r.rejected, size) for r in mine])
        return _Pairs(prompts, x_w, x_l, torch.tensor(keys), {}, images)


def _online_pairs(ctx: TrainContext, step: int) -> _Pairs | None:
    sampled = sample_and_score(ctx, step)
    if sampled is None:
        return None
    p = ctx.config.dpo
    pairs = mine_pairs(sampled.rewards, sampled.batch.group_ids, p.min_gap, p.pairs_per_group)
    metrics = dict(sampled.metrics)
    if not pairs:
        return _no_pairs(metrics)
    final = sampled.trajectory.final
    winners = [w for w, _ in pairs]
    prompts = [sampled.batch.prompts[w] for w in winners]
    x_w = torch.stack([final[w] for w in winners])
    x_l = torch.stack([final[loser] for _, loser in pairs])
    keys = sampled.batch.group_ids[winners]  # the pair's global group (and rank within it)
    images = None
    if ctx.model.takes_images:  # a group shares its first frame: the winner's conditions both
        images = condition_images([sampled.batch.metadata[w] for w in winners], "data.train_prompts")
    return _Pairs(prompts, x_w, x_l, keys, metrics, images)


def _noise_levels(ctx: TrainContext, gens: list[torch.Generator]) -> Tensor:
    """One level per pair, each from its pair's generator. Flow: sigmas in (0, 1), logit-normal (SD3's
    training density) or uniform. Diffusion: indices into the scheduler's ``alphas_cumprod``."""
    p = ctx.config.dpo
    if ctx.model.kind == "diffusion":
        num_train = len(ctx.model.pipeline.scheduler.alphas_cumprod)
        return torch.cat([torch.randint(0, num_train, (1,), generator=g, device=g.device) for g in gens])
    low, high = ctx.model.trained_sigmas()
    if (low, high) != (0.0, 1.0):  # one expert of two trains: the density restricted to its levels
        return _truncated_levels(gens, low, high, p.timesteps, p.logit_mean, p.logit_std)
    if p.timesteps == "logit_normal":
        normal = torch.cat([torch.randn(1, generator=g, device=g.device) for g in gens])
        return torch.sigmoid(p.logit_mean + p.logit_std * normal)
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in gens]).clamp(1e-3, 1 - 1e-3)


def _truncated_levels(
    gens: list[torch.Generator], low: float, high: float, density: str, mean: float, std: float
) -> Tensor:
    """Sigmas from ``density`` (uniform or logit-normal) conditioned on ``[low, high]`` (within
    ``[1e-3, 1 - 1e-3]``), by the inverse CDF of one uniform draw per pair."""
    low, high = max(low, 1e-3), min(high, 1 - 1e-3)
    u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in gens]).double()
    if density == "uniform":
        return (low + (high - low) * u).float()
    bounds = torch.special.ndtr(
        (torch.logit(torch.tensor([low, high], dtype=u.dtype, device=u.device)) - mean) / std
    )
    normal = torch.special.ndtri(bounds[0] + (bounds[1] - bounds[0]) * u)
    return torch.sigmoid(mean + std * normal).clamp(low, high).float()


def _noised(ctx: TrainContext, x0: Tensor, level: Tensor, noise: Tensor):
    """``(x_t, model timestep, target)`` for clean latents ``x0`` at ``level`` (flow: sigmas; diffusion:
    training times), through the model's forward path."""
    model, path = ctx.model, ctx.model.path
    if model.kind == "flow":
        return path.noised(x0, level, noise), path.timestep(level), path.target(x0, noise, level)
    abar = path.level_at(level)
    return path.noised(x0, abar, noise), level.float(), path.target(x0, noise, abar)


def _inversion(ctx: TrainContext, x0: Tensor, cond, gen: torch.Generator, micro: list[Tensor]):  # gen: shared
    """InPO: invert ``x0`` with the model up a short schedule, to the noisiest of ``timesteps_per_pair``
    random levels (the rows of each micro-batch ``micro`` in one call); returns a function giving, for the
    ``k``-th level, the inverted latents, model times and the noise they imply as the target (eps for
    diffusion, eps - x0 for flow), all ``[2P, ...]``."""
    model, p = ctx.model, ctx.config.dpo
    schedule = model.schedule(p.inversion_steps, x0.shape[1:])
    allowed = model.trains(schedule.timesteps[: p.inversion_steps]).nonzero().squeeze(1)  # one expert of two
    if len(allowed) == 0:
        raise ValueError(
            f"dpo.inversion_steps={p.inversion_steps}: no inversion level is served by the trained expert "
            "(model.expert); add steps or train the other expert."
        )
    indices = allowed[
        torch.randint(0, len(allowed), (p.timesteps_per_pair,), generator=gen, device=gen.device).to(
            allowed.device
        )
    ]  # shared
    stop = int(indices.min())
    if len(micro) == 1:
        states = invert(model, x0, cond, schedule, stop_index=stop)
    else:
        states = torch.zeros(x0.shape[0], p.inversion_steps + 1, *x0.shape[1:], device=x0.device)
        for rows in micro:
            states[rows] = invert(model, x0[rows], cond.select(rows), schedule, stop_index=stop)

    def level(k: int):
        index = int(indices[k])
        x_t = states[:, index]
        at = schedule.sigmas[index] if model.kind == "flow" else schedule.alphas_cumprod[index]
        eps = model.path.eps_of(x_t, x0, at)
        return x_t, schedule.timesteps[index].expand(x0.shape[0]), model.path.target(x0, eps, at)

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
        if self.pairs is None:
            ctx.dynamics  # noqa: B018  (online pairs come from SDE rollouts: their SDE must fit the model)

    def iteration(self, step: int) -> dict[str, float]:
        return _dpo_iteration(self.ctx, step, self.ref, self.pairs)

    def state_dict(self) -> dict[str, Tensor]:
        return prefixed("ref", self.ref.state_dict()) if self.ref is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.ref is not None:
            self.ref.load_state_dict(unprefixed("ref", state))
        else:
            super().load_state_dict(state)


def _global_pairs(ctx: TrainContext, local: int) -> int:
    """The number of pairs over all processes (one collective on every process)."""
    acc = ctx.accelerator
    if acc.num_processes == 1:
        return local
    return int(acc.reduce(torch.tensor([local], device=acc.device), reduction="sum").item())


def _dpo_iteration(
    ctx: TrainContext, step: int, ref: EMA | None, offline: _OfflinePairs | None
) -> dict[str, float]:
    model, p = ctx.model, ctx.config.dpo
    if offline is None:
        mined = _online_pairs(ctx, step)
        if mined is None:
            return {"skipped_nonfinite_reward": 1.0}
    else:
        mined = offline.batch(ctx, step)
    prompts, x_w, x_l, keys, metrics, images = mined
    total = _global_pairs(ctx, len(prompts))
    metrics["pairs"] = float(total)
    if total == 0:  # every process agrees: no backward anywhere
        ctx.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "skipped_no_pairs": 1.0}
    # Each process's loss is the sum of its pairs' losses over the global count (times the number of
    # processes, which DDP's gradient average divides out): the update is the mean over all pairs. A
    # process without pairs runs the same forward/backward passes on a stand-in pair with weight 0, so
    # that every process makes the same collective calls.
    weight = len(prompts) * ctx.accelerator.num_processes / total
    if not prompts:
        size = ctx.config.model.resolution or model.default_resolution
        prompts, weight, keys = [""], 0.0, torch.tensor([-1])
        x_w = x_l = torch.zeros(1, *model.latent_shape(size, size), device=model.device)
        images = torch.zeros(1, 3, size, size) if model.takes_images else None
    # Every pair's draws come from its own generator (keyed by the pair, not the process), and the
    # levels InPO inverts to are shared, so 1 or N processes train on the same noise.
    gens = ctx.sample_generators(step, "dpo", keys)
    n = len(prompts)
    cond = model.encode(prompts, cfg=False, images=images)
    x0 = torch.cat([x_w, x_l]).float()
    micro = chunks(n, ctx.config.train.micro_batch_size)
    rows_of = [torch.cat([torch.arange(n)[part], torch.arange(n)[part] + n]) for part in micro]
    shared = ctx.shared_generator(step, "inpo_levels")
    inverted = _inversion(ctx, x0, cond.select(list(range(n)) * 2), shared, rows_of) if p.inversion else None
    rows: list[dict[str, float]] = []
    for k in range(p.timesteps_per_pair):
        if inverted is not None:
            x_t, timestep, target = inverted(k)
        else:
            level = _noise_levels(ctx, gens).repeat(2)
            noise = randn(x_w.shape, gens, x_w.device).repeat(2, *([1] * (x_w.ndim - 1)))
            x_t, timestep, target = _noised(ctx, x0, level, noise)
        for m, (part, index) in enumerate(zip(micro, rows_of)):
            with ctx.micro_batch(sync=m == len(micro) - 1):
                both, count = cond.select(list(range(n))[part] * 2), part.stop - part.start
                # The reference: a snapshot of the weights (refreshed for online DPO; the initial weights for
                # full fine-tuning), or the LoRA disabled.
                with (
                    torch.no_grad(),
                    ref.applied() if ref is not None else model.reference(),
                    ctx.clock("forward"),
                ):
                    ref_error = denoising_error(
                        model.predict(x_t[index], timestep[index], both, 1.0), target[index]
                    )
                with ctx.clock("forward"):
                    model_error = denoising_error(
                        model.predict(x_t[index], timestep[index], both, 1.0), target[index]
                    )
                loss, terms = dpo_loss(
                    model_error[:count], model_error[count:], ref_error[:count], ref_error[count:], p.beta
                )
                ctx.backward(loss * (weight * count / n), sync=m == len(micro) - 1)
                if weight > 0:
                    rows.append({name: float(v) for name, v in terms.items()})
        rows.append(ctx.optimizer_step())
    metrics.update(mean_metrics(rows))
    if ref is not None and p.ref_refresh_every > 0 and (step + 1) % p.ref_refresh_every == 0:
        ref.update(0.0)
    return metrics
