"""Distribution-matching distillation recipe on the shared loop (DMD2; ``train.algorithm: dmd``).

The trained model becomes a few-step *student* of the base model: after training, ``flowalign sample
--steps K --lora <run>/lora`` (and the stock diffusers pipeline with the LoRA and ``K`` steps) samples it.
Three networks share one frozen base:

- the **student**: the loop's trained weights (its LoRA, or the whole denoiser with ``lora_rank: 0``);
- the **teacher** ("real score"): the base with the student's LoRA disabled (no copy; with full
  fine-tuning, a frozen copy taken before training), queried with classifier-free guidance
  ``dmd.real_guidance``;
- the **fake score**: a second LoRA on the same frozen base weights (a trainable full copy with
  ``lora_rank: 0``), initialised as the teacher and trained online to denoise the student's samples.

Options on top of DMD2's distribution matching: DMD's regression loss against a pool of the teacher's ODE
samples (``dmd.regression_weight``); DMD2's GAN term, a discriminator head on the fake score's features
trained with it against the same pool of teacher samples or, as in DMD2, a dataset of real captioned images
(``dmd.gan_weight``, ``dmd.gan_real``); f-distill's weighting of the
gradient by ``h(r)`` of the ratio that discriminator estimates (``dmd.divergence``). With
``dmd.reward_beta > 0`` the generator's loss is reward-tilted DMD
(:func:`flowalign.algorithms.dmd.reward_tilted_dmd_loss`): the student's samples are decoded and scored by
the configured (differentiable) rewards, and ``beta`` times their mean is subtracted. With
``dmd.policy_weight > 0`` (RTDMD's path for rewards without gradients, e.g. the GenEval judge; Harahan/RTDMD
``rtdmd_trainer.py``) each generator step also draws SDE rollouts of the student in groups, scores them and
adds Flow-GRPO's clipped policy-gradient loss on their stochastic steps, ``policy_weight`` times, to the
DMD loss (RTDMD: PPO with DMD at weight 1e-3, i.e. ``policy_weight`` 1000; there the DMD term is taken on
the last step of the same rollouts, here on the backward simulation's step of the ODE rollouts).
With ``dmd.ambient`` (AC-DMD, RTDMD's ambient-consistent DMD; flow models) the student is matched on the
state each backward-simulation step reaches, at that state's noise level, rather than on the step's
x0-prediction (:func:`flowalign.algorithms.dmd.ambient_noised` and the functions next to it).
Under ``train.sharding: fsdp`` the fake score (with its discriminator head) and a full-weight teacher are
copied from the loaded denoiser before the loop shards it (:meth:`DMDRecipe.copy_models`) and sharded like it.

One iteration (Yin et al. 2024, DMD2, Alg. 1; ``tianweiy/DMD2`` ``main/train_sd.py``): ``dmd.fake_updates``
fake-score steps, each on fresh student samples (detached): re-noise at a random level of
``dmd.fake_t_range``, fit the model's native target (velocity or epsilon) by MSE; then one generator step:
student samples with gradient, re-noised at a random level of ``dmd.t_range``, teacher (CFG) and fake
x0-predictions there, :func:`flowalign.algorithms.dmd.dmd_loss`.

Students of ``K > 1`` steps are trained by DMD2's *backward simulation*: each batch draws ``k ~ U{0..K-1}``,
runs the student's first ``k`` steps without gradient from pure noise and trains its ``x0`` prediction at
step ``k`` (ReFL's single-step plan, :func:`flowalign.samplers.plan.grad_window`), so every step the
student will take at sampling time is trained on the states it actually visits. Deviation from DMD2: the
student moves between its steps deterministically (Euler / DDIM, the stock schedulers' sampler), not by
re-noising its x0 prediction with fresh noise, so that the stock pipeline with ``K`` steps samples it
exactly as trained; the step levels are the model scheduler's ``K``-step schedule, or the student's own
(``sampling.sigmas`` / ``sampling.timesteps``: DMD2's SDXL student visits 999, 749, 499, 249).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowalign.algorithms.dmd import (
    ambient_loss_weight,
    ambient_noised,
    ambient_velocity_target,
    consistency_loss,
    consistency_step,
    dmd_loss,
    f_divergence_weight,
    flow_step_to,
    gan_discriminator_loss,
    gan_generator_loss,
    reward_tilted_dmd_loss,
)
from flowalign.algorithms.perceptual import load_perceptual
from flowalign.models import ModelAdapter
from flowalign.samplers import Rollout, SamplingPlan, chunks, denoise_step, generate, seeded_generators
from flowalign.samplers.steps import randn
from flowalign.train.loop import TrainContext, clipped_step, mean_metrics
from flowalign.train.online import _grpo_loss_at, _trained_steps, sample_and_score
from flowalign.train.recipe import Recipe, register_recipe
from flowalign.train.sharding import copy_full_, shard_denoiser, shard_like

__all__ = ["DMDRecipe", "noise_levels", "shared_copy"]


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose frozen parameters and buffers are the original's own tensors (no memory)
    and whose trainable parameters (a LoRA's) are new tensors with the same values."""
    memo: dict[int, object] = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


@contextmanager
def routed(model: ModelAdapter, module: nn.Module) -> Iterator[ModelAdapter]:
    """Within this context ``model.predict`` runs ``module`` (a copy of its denoiser) instead."""
    previous = getattr(model, "_training_module", None)
    model.set_training_module(module)
    try:
        yield model
    finally:
        model.set_training_module(previous)


AMBIENT_GAP = 0.01
"""AC-DMD re-noises a state at level ``s`` to a level of at least ``s + AMBIENT_GAP`` (RTDMD: 10 of 1000
timesteps)."""


def noise_levels(
    model: ModelAdapter, gens: list[torch.Generator], span, floor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One noise level per sample, uniform in ``span`` (fractions of the training horizon), each from its
    sample's generator: ``(level, model timestep)``. Flow: ``sigma`` and ``1000 sigma``; diffusion:
    ``alphas_cumprod[t]`` and the integer ``t``. ``floor [B]`` (AC-DMD, flow): each sample's level is drawn
    above its state's level instead, uniform in ``[max(low, floor + AMBIENT_GAP), high]``."""
    low, high = span
    u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in gens])
    if floor is not None:
        low = torch.clamp(floor.to(u) + AMBIENT_GAP, min=low, max=high)
    u = low + (high - low) * u
    path = model.path
    if model.kind == "flow":
        return u, path.timestep(u)
    last = len(model.pipeline.scheduler.alphas_cumprod) - 1
    t = (u * last).round().long()
    return path.level_at(t), t.float()


def span_fraction(model: ModelAdapter, level: Tensor, timestep: Tensor) -> Tensor:
    """Where :func:`noise_levels`' draws lie in the units of their ``span`` (fractions of the training
    horizon): a flow model's level itself, a diffusion model's timestep over the last one (its level is
    ``alphas_cumprod``, which runs the other way)."""
    if model.kind == "flow":
        return level
    return timestep / (len(model.pipeline.scheduler.alphas_cumprod) - 1)


def feature_layer(denoiser: nn.Module) -> str:
    """Where DMD2's discriminator reads the fake score's features: a UNet's ``mid_block`` (DMD2's choice, its
    bottleneck), else a transformer's middle block (``transformer_blocks``; Wan's ``blocks``)."""
    if getattr(denoiser, "mid_block", None) is not None:
        return "mid_block"
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(denoiser, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return f"{name}.{len(blocks) // 2}"
    raise ValueError(
        f"no default feature layer for a {type(denoiser).__name__}: name one with dmd.gan_layer (a module path)."
    )


def tokens(features) -> Tensor:
    """A block's output as ``[B, N, C]`` tokens: a UNet block's ``[B, C, h, w]`` map (a video UNet's
    ``[B, C, T, h, w]``) flattened; a joint transformer block's ``(context, image)`` pair gives its image
    tokens."""
    if isinstance(features, (tuple, list)):
        features = features[-1]
    if features.ndim >= 4:
        features = features.flatten(2).transpose(1, 2)
    return features.float()


class DiscriminatorHead(nn.Module):
    """DMD2's classifier on the fake score's features: ``[B, N, C]`` tokens -> ``[B]`` logits (a per-token
    MLP, averaged over the tokens)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features).mean(dim=(1, 2))


@register_recipe("dmd")
class DMDRecipe(Recipe):
    """DMD2 distillation: the student (trained weights), the teacher and the fake score (recipe state)."""

    def copy_models(self, model: ModelAdapter) -> None:
        """The fake score, and with full fine-tuning the teacher, as copies of the loaded denoiser (before the
        loop shards it: a sharded module cannot be copied)."""
        base = model.denoiser
        # Full fine-tuning has no adapter to disable: the teacher is a frozen copy of the untrained weights.
        self.teacher = None if model.has_lora else copy.deepcopy(base).requires_grad_(False)
        self.fake = shared_copy(base) if model.has_lora else copy.deepcopy(base)

    def setup(self, ctx: TrainContext) -> None:
        d = ctx.config.dmd
        if d.reward_beta > 0 and not ctx.reward.differentiable:
            raise ValueError(
                "dmd.reward_beta tilts the teacher by differentiable rewards; "
                f"{[name for name, (r, _) in ctx.reward.parts.items() if not r.differentiable]} are not: set "
                "dmd.reward_beta=0 and use dmd.policy_weight (RTDMD's policy gradient) for them."
            )
        for key, used in (("ambient", d.ambient), ("consistency_weight", d.consistency_weight > 0)):
            if used and ctx.model.kind != "flow":
                raise ValueError(
                    f"dmd.{key} moves noisy inputs along a flow path; the {ctx.model.family} model is a "
                    f"{ctx.model.kind} model: remove dmd.{key}."
                )
        if d.ambient:
            self._check_room_above_states(ctx)
        low, high = ctx.model.trained_sigmas()
        if (low, high) != (0.0, 1.0):
            raise ValueError(
                f"model.expert={ctx.model.expert}: DMD distils the whole sampler, but this expert runs only the "
                f"levels in [{low:g}, {high:g}]; set model.expert=both to train both experts as one student."
            )
        if (d.gan_weight > 0 or d.divergence != "rkl") and getattr(ctx.model, "expert", None) == "both":
            key = "dmd.gan_weight" if d.gan_weight > 0 else "dmd.divergence"
            raise ValueError(
                f"{key}: the discriminator reads one network's features, and with model.expert=both each sample "
                "runs through one of two experts; set dmd.gan_weight=0 and dmd.divergence=rkl, or train one expert."
            )
        if d.gan_real is not None and ctx.model.is_video:
            raise ValueError(
                f"dmd.gan_real holds images; the {ctx.model.family} model makes videos: remove dmd.gan_real (the "
                "discriminator's real side is then the teacher's samples, dmd.regression_pairs of them)."
            )
        if d.policy_weight > 0:
            ctx.dynamics  # noqa: B018  (the rollout SDE must fit the model before training starts)
        self.distance = None  # DMD's regression distance on decoded images (None: latent MSE)
        if d.regression_loss != "mse":  # (the config check requires dmd.regression_weight > 0 with it)
            if d.regression_loss == "shapes_lpips" and ctx.model.family != "shapes":
                raise ValueError(
                    f"dmd.regression_loss={d.regression_loss} compares shapes-world images; the {ctx.model.family} "
                    "model makes others: set dmd.regression_loss=lpips (DMD's VGG LPIPS) or mse."
                )
            if ctx.model.is_video:
                raise ValueError(
                    f"dmd.regression_loss={d.regression_loss} compares images; the {ctx.model.family} model makes "
                    "videos: set dmd.regression_loss=mse."
                )
            self.distance = load_perceptual(d.regression_loss).to(ctx.model.device)
        super().setup(ctx)
        model, config, acc = ctx.model, ctx.config, ctx.accelerator
        # FSDP: the copies are sharded like the student, each holding its own shards (with a LoRA student the
        # fake score's frozen base is a second set of shards, 1/N of the base per process).
        self.sharded = config.train.sharding == "fsdp"
        if self.sharded:
            for copied in (self.teacher, self.fake):
                if copied is not None:
                    self._shard(copied)
        fake = self.fake
        self.discriminating = d.gan_weight > 0 or d.divergence != "rkl"
        self.head, self._seen = None, {}
        if self.discriminating:  # DMD2's classifier: a head on the fake score's features
            fake.get_submodule(d.gan_layer or feature_layer(fake)).register_forward_hook(
                lambda module, args, output: self._seen.__setitem__("features", output)
            )
        pool = d.regression_weight > 0 or (self.discriminating and d.gan_real is None)
        self.pairs = self._regression_pairs() if pool else None
        self.real = None  # the discriminator's real side: (captions, latents on the CPU, metadata)
        if self.discriminating:
            self.real = (
                self._real_images()
                if d.gan_real is not None
                else (self.pairs[0], self.pairs[2], self.pairs[3])
            )
            width = self._feature_width()
            self.head = DiscriminatorHead(width).to(model.device)
            if self.sharded:
                self._shard(self.head)
        self.fake_params = [p for p in fake.parameters() if p.requires_grad]
        self.fake_params += list(self.head.parameters()) if self.head is not None else []
        o = config.optim
        optimizer = torch.optim.AdamW(
            self.fake_params, lr=d.fake_lr or o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
        )  # fmt: skip
        if self.sharded:  # FSDP2 is the copies' parallelism: accelerate wraps only the optimizer
            self.fake_optimizer = acc.prepare(optimizer)
        elif self.head is not None:
            self.fake, self.head, self.fake_optimizer = acc.prepare(fake, self.head, optimizer)
        else:
            self.fake, self.fake_optimizer = acc.prepare(fake, optimizer)
        if d.init is not None:
            self._start_from(Path(d.init))

    @staticmethod
    def _check_room_above_states(ctx: TrainContext) -> None:
        """AC-DMD re-noises each student state to a level at least ``AMBIENT_GAP`` above its own, within
        ``dmd.t_range`` (and ``dmd.fake_t_range``): the student's states, at the schedule's levels after each
        step, must leave that room below both upper ends (else the draw would be clamped below the state)."""
        config, model = ctx.config, ctx.model
        side = config.model.resolution or model.default_resolution
        sigmas = model.schedule(
            config.sampling.steps, model.latent_shape(side, side), levels=ctx.levels
        ).sigmas
        highest = float(sigmas[1:].max())
        for key in ("t_range", "fake_t_range"):
            span = list(getattr(config.dmd, key))
            if highest + AMBIENT_GAP > span[1] + 1e-6:
                raise ValueError(
                    f"dmd.{key}={span}: AC-DMD (dmd.ambient) re-noises each student state above its own level, "
                    f"and this {config.sampling.steps}-step student's states reach {highest:.4g}; raise the upper "
                    f"end to at least {highest + AMBIENT_GAP:.4g}, or give the student lower levels "
                    "(sampling.sigmas)."
                )

    def _shard(self, module: nn.Module) -> None:
        """Shard ``module`` over the processes like the student (``train.sharding: fsdp``)."""
        shard_denoiser(module, self.ctx.model.device.type, self.ctx.accelerator.num_processes)

    def _start_from(self, checkpoint: Path) -> None:
        """``dmd.init``: the student's weights and the fake score (with its discriminator) of an earlier dmd
        run's checkpoint; optimizer moments are not taken (the new run's optimizers start fresh). The
        teacher was made from the base already, and the EMA, if kept, restarts from the loaded weights.
        A checkpoint without a fake score (another recipe's, e.g. supervised fine-tuning, or a
        ``benchmarks/shapes/regression_probe.py`` student) gives the student only; the fake score and
        discriminator then start as in any run (the teacher, a fresh head), said in one line."""
        from safetensors.torch import load_file

        from flowalign.train.state import _recipe_state

        ctx = self.ctx
        named = {n: p for n, p in ctx.model.denoiser.named_parameters() if p.requires_grad}
        weights = load_file(str(checkpoint / "trainable.safetensors"))
        fake = {k: v for k, v in _recipe_state(checkpoint).items() if k.startswith("fake.")}
        student_only = not fake
        fits = set(weights) == set(named) and all(weights[n].shape == p.shape for n, p in named.items())
        if not student_only:
            fits = fits and len(fake) == len(self.fake_params)
            fits = fits and all(fake[f"fake.{i}"].shape == p.shape for i, p in enumerate(self.fake_params))
        if not fits:
            raise ValueError(
                f"dmd.init {str(checkpoint)!r} holds {len(weights)} student and {len(fake)} fake-score tensors; this run "
                f"trains {len(named)} and {len(self.fake_params)} (or their shapes differ): it was written with other "
                "model.lora_rank, "
                "dmd.gan_weight / dmd.divergence (the discriminator) or train.algorithm settings."
            )
        for name, param in named.items():
            copy_full_(param, weights[name])
        if student_only:
            ctx.accelerator.print(
                f"note: dmd.init {str(checkpoint)!r} holds no fake score (not a dmd run's checkpoint): the student "
                "starts from its weights, the fake score from the teacher."
            )
        else:
            self.load_state_dict(fake)
        if ctx.ema is not None:  # in place: the loop holds this EMA object too
            with torch.no_grad():
                for shadow, param in zip(ctx.ema.shadow, ctx.ema.params, strict=True):
                    shadow.copy_(param)

    def _feature_width(self) -> int:
        """The feature width at the discriminator's layer, from one forward of the fake score."""
        model = self.ctx.model
        captions, latents, metadata = self.real
        cond = self.ctx.encode_prompts(captions[:1], metadata[:1], cfg=False)
        with torch.no_grad(), routed(model, self.fake):
            model.predict(
                latents[:1].to(model.device), torch.full((1,), 500.0, device=model.device), cond, 1.0
            )
        return tokens(self._seen["features"]).shape[-1]

    def _fake_predict(self, x_t: Tensor, timestep: Tensor, cond, network: nn.Module | None = None) -> Tensor:
        """The fake score's native output at ``x_t`` (with gradient where enabled), run by ``network``
        (default: the trained fake score); its features at the discriminator's layer are kept for
        :meth:`_logits`."""
        model = self.ctx.model
        with routed(model, network or self.fake), self.ctx.clock("forward"):
            return model.predict(x_t, timestep, cond, 1.0)

    def _logits(self, head: nn.Module | None = None) -> Tensor:
        """``[B]`` discriminator logits of the fake score's last forward (its features at the hooked layer), by
        ``head`` (default: the trained head)."""
        return (head or self.head)(tokens(self._seen["features"]))

    @contextmanager
    def _fixed_critic(self, active: bool = True) -> Iterator[tuple[nn.Module | None, nn.Module | None]]:
        """The fake score and its discriminator head as fixed functions, for the generator's GAN term: the
        gradient reaches the student's sample through them but not their parameters (DMD2 freezes its guidance
        model for the generator's turn, ``requires_grad_(False)``). Unsharded, the bare modules run rather than
        their DDP wrappers, which would wait for gradients of every parameter: those after the
        discriminator's layer never get one. Sharded (FSDP2), the modules run as they are and their gradients
        are discarded before the next fake-score update. Not ``active``: ``(None, None)``."""
        if not active:
            yield None, None
            return
        if self.sharded:
            yield self.fake, self.head
            return
        acc = self.ctx.accelerator
        for param in self.fake_params:
            param.requires_grad_(False)
        try:
            yield acc.unwrap_model(self.fake), acc.unwrap_model(self.head)
        finally:
            for param in self.fake_params:
                param.requires_grad_(True)

    @contextmanager
    def _teaching(self) -> Iterator[ModelAdapter]:
        """Within this context ``model.predict`` is the teacher's (no gradient)."""
        model = self.ctx.model
        with torch.no_grad():
            if self.teacher is None:
                with model.reference():
                    yield model
            else:
                with routed(model, self.teacher):
                    yield model

    def _regression_pairs(self) -> tuple[list[str], Tensor, Tensor, list[dict]]:
        """DMD's regression pairs (Yin et al. 2024, Sec. 3.3): ``dmd.regression_pairs`` prompts of the training
        set (a seeded shuffle, cycled), one seeded initial noise ``z`` each, and the teacher's ODE sample from
        ``z`` (``dmd.teacher_steps`` steps, CFG ``dmd.real_guidance``); kept on the CPU, with the prompts'
        records' metadata (an image-to-video model's first frames). The same on every process and after a
        resume (everything is seeded by ``train.seed``)."""
        ctx, d = self.ctx, self.ctx.config.dmd
        model, config = ctx.model, ctx.config
        records = ctx.sampler.records
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.train.seed))
        chosen = [records[int(order[i % len(records)])] for i in range(d.regression_pairs)]
        prompts, metadata = [r.prompt for r in chosen], [r.metadata for r in chosen]
        seeds = [config.train.seed * 1_000_003 + 7_919 * i + 1 for i in range(d.regression_pairs)]
        side = config.model.resolution or model.default_resolution
        steps = d.teacher_steps or model.default_steps
        noise, targets = [], []
        parts = chunks(len(prompts), config.train.micro_batch_size or 64)
        progress = tqdm(
            parts,
            desc="dmd regression pairs",
            disable=not (config.train.progress and ctx.accelerator.is_local_main_process),
        )
        for part in progress:
            cond = ctx.encode_prompts(prompts[part], metadata[part], cfg=d.real_guidance > 1)
            height, width = model.resolution_of(cond) or (side, side)
            z = model.initial_noise(len(cond), height, width, seeded_generators(seeds[part], model.device))
            with self._teaching():
                out = generate(
                    model, None, z, cond=cond, steps=steps, guidance=d.real_guidance,
                    resolution=(height, width), decode=False,
                )  # fmt: skip
            noise.append(z.cpu())  # the pool lives on the CPU, chunk by chunk (video latents are large)
            targets.append(out.final.cpu())
        return prompts, torch.cat(noise), torch.cat(targets), metadata

    def _real_images(self) -> tuple[list[str], Tensor, list[dict]]:
        """DMD2's real data for the discriminator (``dmd.gan_real``): the dataset's captions and its images
        encoded to latents (the VAE's posterior mode), read and encoded chunk by chunk and kept on the CPU
        as latents only (no metadata: image models only)."""
        from flowalign.data.prompts import load_captioned_images

        model, config = self.ctx.model, self.ctx.config
        side = config.model.resolution or model.default_resolution
        captions, latents = [], []
        with torch.no_grad():
            for part, images in load_captioned_images(
                config.dmd.gan_real, side, chunk=config.train.micro_batch_size or 64
            ):
                captions += part
                latents.append(model.encode_images(images).cpu())
        return captions, torch.cat(latents), [{} for _ in captions]

    # ------------------------------------------------------------------ predictions

    def _predicted(
        self, network: str, x_t: Tensor, timestep: Tensor, level: Tensor, cond, guidance: float, to: Tensor
    ) -> Tensor:
        """The ``teacher``'s or the ``fake`` score's prediction at ``x_t`` (no gradient) of what the student
        is matched on: its x0-prediction, or with ``dmd.ambient`` that prediction's deterministic move back to
        the student state's level ``to`` (AC-DMD)."""
        model = self.ctx.model
        network_context = routed(model, self.fake) if network == "fake" else self._teaching()
        with torch.no_grad(), self.ctx.clock("forward"), network_context:
            out = model.predict(x_t, timestep, cond, guidance)
        x0 = model.path.x0_from_output(out, x_t, level)
        return flow_step_to(x_t, x0, level, to) if self.ctx.config.dmd.ambient else x0

    def _noised(self, x: Tensor, state_level: Tensor, level: Tensor, eps: Tensor) -> Tensor:
        """``x`` (a sample, or with ``dmd.ambient`` a state at ``state_level``) re-noised to ``level``."""
        if self.ctx.config.dmd.ambient:
            return ambient_noised(x, state_level, level, eps)
        return self.ctx.model.path.noised(x, level, eps)

    def _matched(self, traj: Rollout) -> tuple[Tensor, Tensor]:
        """What distribution matching compares of a backward-simulation rollout, with its level ``[B]``: the
        x0-prediction of its last step (level 0), or with ``dmd.ambient`` (AC-DMD) the state that step reached
        (RTDMD's ``next_sigma``: the level after step ``k``; 0 after the student's last step)."""
        n = traj.final.shape[0]
        if not self.ctx.config.dmd.ambient:
            return traj.final, traj.final.new_zeros(n)
        k = traj.plan.stop_after
        return traj.latents[:, k + 1], traj.final.new_full((n,), float(traj.schedule.sigmas[k + 1]))

    def _student(self, step: int, purpose: str, cond, gens, grad: bool) -> Tensor:
        """Student samples by backward simulation: the ``x0`` prediction at step ``k ~ U{0..K-1}`` (one ``k``
        per call, the same on every process), with gradient through that step's model call when ``grad``.
        ``gens``: one generator per sample (its initial noise), or the initial noise itself."""
        return self._rollout(step, purpose, cond, gens, grad).final

    def _rollout(self, step: int, purpose: str, cond, gens, grad: bool) -> Rollout:
        """The backward simulation of :meth:`_student` as a rollout: its ``final`` is the sample, and
        :meth:`_last_step_again` redoes its last step from its stored state."""
        s = self.ctx.config.sampling
        gen = self.ctx.shared_generator(step, purpose + "_k")
        k = int(torch.randint(0, s.steps, (1,), generator=gen, device=gen.device))
        plan = SamplingPlan(
            sde=(False,) * s.steps,
            grad=tuple(grad and i == k for i in range(s.steps)),
            checkpoint=(False,) * s.steps,
            stop_after=k,
        )
        with self.ctx.clock("forward"):
            return generate(
                self.ctx.model, None, gens, cond=cond, steps=s.steps, guidance=s.guidance,
                resolution=self.ctx.config.model.resolution, plan=plan, decode=False, levels=self.ctx.levels,
            )  # fmt: skip

    def _last_step_again(self, state: tuple, cond) -> tuple[Tensor, Tensor]:
        """A :meth:`_rollout`'s last step again from its stored ``state = (x_k, schedule, plan)``, now with
        gradient: the same model call and step function as inside the rollout, so the same sample, without
        repeating the ``k`` steps before it. Returns ``(matched, x0)``: what :meth:`_matched` took of the
        rollout (the x0-prediction, or with ``dmd.ambient`` the state the step reached) and the x0-prediction
        (what a reward scores)."""
        x, schedule, plan = state
        with self.ctx.clock("forward"):
            out = denoise_step(
                self.ctx.model, x, plan.stop_after, cond, schedule, plan, self.ctx.config.sampling.guidance
            )
        return (out.prev_sample if self.ctx.config.dmd.ambient else out.x0), out.x0

    # ------------------------------------------------------------------ updates

    def _fake_update(self, step: int, j: int) -> dict[str, float]:
        """One fake-score step: fit the native target of the student's (detached) samples re-noised."""
        ctx, d = self.ctx, self.ctx.config.dmd
        model, acc = ctx.model, ctx.accelerator
        self.fake_optimizer.zero_grad(set_to_none=True)  # (FSDP2: the generator's GAN term reached it too)
        batch = ctx.sampler.batch(step * (d.fake_updates + 1) + j)
        n = len(batch.prompts)
        purpose = f"fake{j}"
        cond = ctx.encode(batch, cfg=ctx.config.sampling.guidance > 1)
        gens = ctx.sample_generators(step, purpose, batch.group_ids)
        with torch.no_grad():
            x0, state_level = self._matched(self._rollout(step, purpose, cond, gens, grad=False))
        level, timestep = noise_levels(
            model, ctx.sample_generators(step, purpose + "_t", batch.group_ids), d.fake_t_range,
            floor=state_level if d.ambient else None,
        )  # fmt: skip
        eps = randn(x0.shape, ctx.sample_generators(step, purpose + "_eps", batch.group_ids), x0.device)
        x_t = self._noised(x0, state_level, level, eps)
        if d.ambient:  # the state is noisy: the target whose regression is the marginal's velocity at `level`
            target = ambient_velocity_target(x0, state_level, level, eps)
        else:
            target = model.path.target(x0, eps, level)
        if self.discriminating:
            # the "real" side (teacher samples or dmd.gan_real), noised at the same levels with the same noise
            # (DMD2 draws another; both sides' expectations are unbiased either way)
            captions, latents, metadata = self.real
            real_index = self._pool_draw(step, purpose + "_real", batch.group_ids, len(captions)).tolist()
            real_cond = ctx.encode_prompts(
                [captions[i] for i in real_index], [metadata[i] for i in real_index], cfg=False
            )
            real_t = model.path.noised(latents[real_index].to(x0.device), level, eps)
        if d.consistency_weight > 0:  # the moves' levels and noises, drawn for the whole batch
            moves = self._consistency_moves(step, purpose, batch.group_ids, x_t, level)
        micro = chunks(n, ctx.config.train.micro_batch_size)
        total, disc, consistent = 0.0, 0.0, 0.0
        for m, part in enumerate(micro):
            with self._fake_micro_batch(sync=m == len(micro) - 1):
                out = self._fake_predict(x_t[part], timestep[part], cond.select(part))
                if d.ambient:  # RTDMD's configs' weighting of the ambient target (move_scale_out, clamp 10)
                    weight = ambient_loss_weight(state_level[part], level[part])
                    error = (out.float() - target[part].float()) ** 2
                    loss = (error * weight.reshape(-1, *[1] * (error.ndim - 1))).mean()
                else:
                    loss = F.mse_loss(out.float(), target[part].float())
                if self.discriminating:
                    fake_logits = self._logits()
                    self._fake_predict(real_t[part], timestep[part], real_cond.select(part))
                    gan = gan_discriminator_loss(self._logits(), fake_logits)
                    loss = loss + d.gan_disc_weight * gan
                    disc += gan.item() * (part.stop - part.start) / n
                if d.consistency_weight > 0:
                    anchor = model.path.x0_from_output(out, x_t[part], level[part])
                    consistency = self._consistency(
                        anchor, x_t[part], level[part], [move[part] for move in moves], cond.select(part)
                    )
                    loss = loss + d.consistency_weight * consistency
                    consistent += consistency.item() * (part.stop - part.start) / n
                share = (part.stop - part.start) / n
                with ctx.clock("backward"):
                    acc.backward(loss * share)
                total += loss.item() * share
        # a non-finite gradient skips the update, reported, as the generator's (it would poison every later
        # distribution-matching direction)
        norm, skipped = clipped_step(
            acc, self.fake_optimizer, self.fake_params, ctx.config.optim.max_grad_norm
        )
        metrics = {
            "loss_fake": total,
            "fake_grad_norm": norm,
            "fake_skipped_updates": float(skipped),
        }
        if self.discriminating:
            metrics["loss_gan_disc"] = disc
        if d.consistency_weight > 0:
            metrics["loss_consistency"] = consistent
        return metrics

    def _consistency_moves(self, step: int, purpose: str, group_ids: Tensor, x_t: Tensor, level: Tensor):
        """For the consistency regulariser: each sample's lower level ``max(0, level - delta)``, ``delta`` in
        steps of 0.001 up to ``dmd.consistency_gap`` (RTDMD: integer timesteps up to 200 of 1000), and two
        independent noises for the moves there; ``[to, timestep, noise_1, noise_2]``, drawn per sample."""
        ctx, gap = self.ctx, self.ctx.config.dmd.consistency_gap
        gens = ctx.sample_generators(step, purpose + "_consistency", group_ids)
        most = max(1, round(gap * 1000))
        delta = torch.cat([torch.randint(1, most + 1, (1,), generator=g, device=g.device) for g in gens])
        to = torch.clamp(level - delta.to(level) / 1000, min=0)
        noises = [randn(x_t.shape, gens, x_t.device) for _ in range(2)]
        return [to, ctx.model.path.timestep(to), *noises]

    def _consistency(self, anchor: Tensor, x_t: Tensor, level: Tensor, moves: list[Tensor], cond) -> Tensor:
        """The fake score's consistency loss (:func:`flowalign.algorithms.dmd.consistency_loss`) at its
        x0-prediction ``anchor`` (with gradient) of its input ``x_t`` at ``level``: both moves start from
        ``x_t`` with the anchor's detached prediction (RTDMD's ``consistency_stopgrad_transitions``), and the
        fake score predicts again at each, with gradient."""
        model, d = self.ctx.model, self.ctx.config.dmd
        to, timestep, *noises = moves
        x0s = []
        for noise in noises:
            with torch.no_grad():
                moved = consistency_step(x_t, anchor.detach(), level, to, noise, d.consistency_eta)
            out = self._fake_predict(moved, timestep, cond)
            x0s.append(model.path.x0_from_output(out, moved, to))
        return consistency_loss(anchor, *x0s)

    def _fake_micro_batch(self, sync: bool) -> contextlib.ExitStack:
        """The context of one fake-score micro-batch's forwards and backward (the fake score's and the
        discriminator head's): without ``sync`` (a micro-batch before the last) their gradients stay on this
        process (DDP's ``no_sync``, which must span the forwards; FSDP2's reduce-scatter skipped), as
        :meth:`TrainContext.micro_batch` for the student."""
        stack = contextlib.ExitStack()
        for module in (self.fake, self.head):
            if module is None:
                continue
            if self.sharded:
                module.set_requires_gradient_sync(sync)
            elif not sync:
                stack.enter_context(self.ctx.accelerator.no_sync(module))
        return stack

    def _pool_draw(self, step: int, purpose: str, group_ids: Tensor, size: int) -> Tensor:
        """One index into a pool of ``size`` (the teacher's pairs, or the real images) per sample, from that
        sample's generator (the same draw on 1 or N processes)."""
        gens = self.ctx.sample_generators(step, purpose, group_ids)
        return torch.cat([torch.randint(size, (1,), generator=g, device=g.device) for g in gens]).cpu()

    def _f_weights(self, logits: Tensor, fraction: Tensor) -> tuple[Tensor, float]:
        """f-distill's weights of this process's samples, normalised (per bin of ``dmd.t_range`` and overall)
        over the global batch: the logits and the levels' places in ``t_range`` (:func:`span_fraction`) of
        every process are gathered first. Also the largest weight of the global batch (the same everywhere)."""
        acc, d = self.ctx.accelerator, self.ctx.config.dmd
        everywhere = acc.gather(torch.stack([logits.float(), fraction.float()], dim=1))
        weights = f_divergence_weight(
            everywhere[:, 0], d.divergence, t=everywhere[:, 1], t_range=tuple(d.t_range), bins=d.ratio_bins
        )
        n = logits.shape[0]
        return weights[acc.process_index * n : (acc.process_index + 1) * n], weights.max().item()

    def iteration(self, step: int) -> dict[str, float]:
        ctx, d = self.ctx, self.ctx.config.dmd
        model = ctx.model
        fake_metrics = [self._fake_update(step, j) for j in range(d.fake_updates)]
        batch = ctx.sampler.batch(step * (d.fake_updates + 1) + d.fake_updates)
        policy = self._policy_gradient(step, batch) if d.policy_weight > 0 else {}
        n = len(batch.prompts)
        cond = ctx.encode(batch, cfg=d.real_guidance > 1 or ctx.config.sampling.guidance > 1)
        gens = ctx.sample_generators(step, "student", batch.group_ids)
        t_gens = ctx.sample_generators(step, "dmd_t", batch.group_ids)
        eps_gens = ctx.sample_generators(step, "dmd_eps", batch.group_ids)
        micro = chunks(n, ctx.config.train.micro_batch_size)
        # First pass, no gradient: the student's samples re-noised, the teacher's and the fake score's
        # x0-predictions there and the discriminator's logits (f-distill normalises its weights over the
        # whole batch). The second pass redoes each micro-batch's last student step from its stored state, with
        # gradient (the same samples).
        eps, real, fake, logits, states, levels = [], [], [], [], [], []
        with torch.no_grad():
            for part in micro:
                sub = cond.select(part)
                traj = self._rollout(step, "student", sub, gens[part], grad=False)
                x, state_level = self._matched(traj)
                states.append((traj.latents[:, traj.plan.stop_after].clone(), traj.schedule, traj.plan))
                level, timestep = noise_levels(
                    model, t_gens[part], d.t_range, floor=state_level if d.ambient else None
                )
                levels.append((state_level, level, timestep))
                eps.append(randn(x.shape, eps_gens[part], x.device))
                x_t = self._noised(x, state_level, level, eps[-1])
                real.append(
                    self._predicted("teacher", x_t, timestep, level, sub, d.real_guidance, state_level)
                )
                fake.append(self._predicted("fake", x_t, timestep, level, sub, 1.0, state_level))
                if d.divergence != "rkl":  # the ratio the discriminator reads at this x_t
                    logits.append(self._logits())
            weights, largest = None, None
            if logits:
                fraction = torch.cat([span_fraction(model, lv, ts) for _, lv, ts in levels])
                weights, largest = self._f_weights(torch.cat(logits), fraction)
        pair_index = (
            self._pool_draw(step, "regression_pair", batch.group_ids, len(self.pairs[0]))
            if d.regression_weight > 0
            else None
        )
        losses, regressions, rewards, gans = [], [], [], []
        # The fake score and its head stay fixed through the backward too: checkpointed layers recomputed
        # there must see their parameters as the forward did.
        with self._fixed_critic(d.gan_weight > 0) as (critic, head):
            for m, part in enumerate(micro):
                with ctx.micro_batch(sync=m == len(micro) - 1):
                    sub = cond.select(part)
                    share = (part.stop - part.start) / n
                    x, x0 = self._last_step_again(states[m], sub)  # the same samples, now with gradient
                    state_level, level, timestep = levels[m]
                    weight = None if weights is None else weights[part]
                    if d.reward_beta > 0:  # RTDMD: toward the teacher tilted by exp(beta * reward)
                        scored = ctx.reward(
                            model.decode(x0), batch.prompts[part], batch.metadata[part], batch.group_ids[part]
                        )
                        loss = reward_tilted_dmd_loss(
                            x, real[m], fake[m], scored.scores, d.reward_beta, weight=weight, normalize=d.normalize,
                            margin=d.reward_margin,
                        )  # fmt: skip
                        rewards.append(scored.scores.detach())
                    else:
                        loss = dmd_loss(x, real[m], fake[m], weight=weight, normalize=d.normalize)
                    if (
                        d.gan_weight > 0
                    ):  # DMD2's GAN term: the noised sample, gradient through the fixed critic
                        self._fake_predict(self._noised(x, state_level, level, eps[m]), timestep, sub, critic)
                        gan = gan_generator_loss(self._logits(head))
                        loss = loss + d.gan_weight * gan
                        gans.append(gan.detach() * share)
                    if pair_index is not None:
                        regression = self._regression(step, pair_index[part])
                        loss = loss + d.regression_weight * regression
                        regressions.append(regression.detach() * share)
                    ctx.backward(loss * share, sync=m == len(micro) - 1)
                    losses.append(loss.detach() * share)
        metrics = ctx.optimizer_step()
        metrics["loss"] = float(sum(losses))
        distance = (torch.cat(fake) - torch.cat(real)).abs()
        metrics["fake_real_distance"] = distance.mean(dim=tuple(range(1, distance.ndim))).mean().item()
        if regressions:
            metrics["loss_regression"] = float(sum(regressions))
        if rewards:
            metrics["reward_tilt" if policy else "reward"] = torch.cat(rewards).mean().item()
        metrics.update(policy)
        if gans:
            metrics["loss_gan_gen"] = float(sum(gans))
        if weights is not None:
            metrics["f_weight_max"] = largest
        for key in fake_metrics[0]:
            metrics[key] = sum(f[key] for f in fake_metrics) / len(fake_metrics)
        return metrics

    def _policy_gradient(self, step: int, batch) -> dict[str, float]:
        """RTDMD's policy-gradient term, accumulated into the generator's gradient (no optimizer step): SDE
        rollouts of the student for ``batch`` (its groups), their rewards and group advantages, and
        ``dmd.policy_weight`` times Flow-GRPO's clipped loss on the trained stochastic steps, averaged over
        the batch and the steps (one minibatch: the same update as ``train.algorithm: grpo`` with
        ``grpo.minibatch_size`` = the batch, scaled)."""
        ctx, d = self.ctx, self.ctx.config.dmd
        sampled = sample_and_score(ctx, step, advantage=ctx.config.grpo, batch=batch)
        if sampled is None:
            return {"skipped_nonfinite_reward": 1.0}
        traj, cond, advantages = sampled.trajectory, sampled.cond, sampled.advantages
        steps = _trained_steps(ctx, step, traj)
        column = {i: c for c, i in enumerate(traj.sde_steps.tolist())}
        n = traj.latents.shape[0]
        rows = []
        for i in steps:
            for part in chunks(n, ctx.config.train.micro_batch_size):
                with ctx.micro_batch(sync=False):
                    index = torch.arange(n, device=traj.latents.device)[part]
                    loss, metrics = _grpo_loss_at(
                        ctx, traj, index, i, column[i], cond.select(index), advantages
                    )
                    ctx.backward(d.policy_weight * loss * (len(index) / n) / len(steps), sync=False)
                    rows.append(metrics)
        named = {k if k.startswith("policy_") else f"policy_{k}": v for k, v in mean_metrics(rows).items()}
        return {**sampled.metrics, **named}

    def _regression(self, step: int, index: Tensor) -> Tensor:
        """DMD's regression loss on the pairs ``index`` (this micro-batch's share of the step's draw): the
        student's sample from a pair's noise (the same backward-simulation step as the generator's) against the teacher's
        ODE sample from it, mean squared error in latent space, or with ``dmd.regression_loss`` a perceptual
        distance of the decoded images. Deviation: DMD uses LPIPS over an ImageNet VGG, whose weights cannot be
        downloaded here; the latent MSE is the plain stand-in (on the shapes world the latents are the pixels),
        and ``shapes_lpips`` LPIPS's form over the shapes world's own perception network."""
        ctx = self.ctx
        prompts, noise, targets, metadata = self.pairs
        index = index.tolist()
        cond = ctx.encode_prompts(
            [prompts[i] for i in index], [metadata[i] for i in index], ctx.config.sampling.guidance > 1
        )
        device = ctx.model.device
        x = self._student(step, "student", cond, noise[index].to(device), grad=True)
        target = targets[index].to(device)
        if self.distance is None:
            return F.mse_loss(x.float(), target.float())
        return self.distance(ctx.model.decode(x), ctx.model.decode(target)).mean()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"fake.{i}": p.detach() for i, p in enumerate(self.fake_params)}
        for i, p in enumerate(self.fake_params):
            for key, value in self._adam_state.get(p, {}).items():
                state[f"fake_adam.{i}.{key}"] = torch.as_tensor(value)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        params = [k for k in state if k.startswith("fake.")]
        if len(params) != len(self.fake_params):
            raise ValueError(
                f"the checkpoint's dmd state holds {len(params)} fake-score tensors, this model's fake score has "
                f"{len(self.fake_params)}; was it written with another model.lora_rank or train.algorithm?"
            )
        for i, p in enumerate(self.fake_params):
            copy_full_(p, state[f"fake.{i}"])
            # Adam's moments live with the parameter (as its shard under FSDP); its step count stays on the
            # CPU (torch's default).
            moments = {
                k.rsplit(".", 1)[1]: v if k.endswith(".step") else shard_like(v, p)
                for k, v in state.items()
                if k.startswith(f"fake_adam.{i}.")
            }
            if moments:
                self._adam_state[p] = moments

    @property
    def _adam_state(self):
        """The fake-score optimizer's per-parameter state (under accelerate's wrapper)."""
        return getattr(self.fake_optimizer, "optimizer", self.fake_optimizer).state
