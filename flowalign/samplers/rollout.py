"""The rollout: one loop that samples, records log-probs, and lets gradients through a window of steps.

There is no "with grad" twin: online RL (no gradients, SDE, log-probs), reward backprop (a gradient
window, checkpointing) and noise optimization (gradients to ``x_T``) all call :func:`rollout` with a
different :class:`~flowalign.samplers.plan.SamplingPlan`. Training recomputes a stored transition's
log-prob with :func:`denoise_step` — the very function the rollout used to draw it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from flowalign.samplers.plan import SamplingPlan
from flowalign.samplers.schedules import Schedule
from flowalign.samplers.steps import Generators, StepOutput, ddim_step, flow_ode_step, flow_sde_step

__all__ = ["Denoiser", "Rollout", "denoise_step", "rollout"]


class Denoiser(Protocol):
    """What the rollout needs of a model (every :class:`~flowalign.models.base.ModelAdapter` has it)."""

    kind: str  # "flow" or "diffusion"
    prediction_type: str  # "flow" (velocity), "epsilon", "v_prediction"

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Any, guidance: float = 1.0) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass
class Rollout:
    """A sampled trajectory of ``B`` samples over ``N`` steps, ``S`` of them stochastic.

    Attributes:
        latents: ``[B, L + 1, *latent_shape]`` float32, the states ``x_0`` (initial noise) ... ``x_L``,
            ``L = plan.last_step + 1`` steps taken. ``latents[:, i + 1]`` was drawn from
            ``latents[:, i]`` by step ``i``. Carries gradients inside the plan's gradient window.
        timesteps: ``[L]`` the model time of each step taken.
        sde_steps: ``[S]`` long, indices of the stochastic steps taken.
        log_probs: ``[B, S]`` float32 log-prob of each stochastic transition (plan's reduction).
        means: ``[B, S, *latent_shape]`` float32 transition means of the stochastic steps.
        stds: ``[B, S]`` float32 transition noise std of the stochastic steps.
        final: ``[B, *latent_shape]`` the output latent: ``x_L``, or step ``stop_after``'s ``x0``
            prediction (ReFL).
        images: ``[B, 3, H, W]`` (``[B, T, 3, H, W]`` for video) decoded in ``[0, 1]``, or None.
        schedule: the schedule sampled; plan: the plan followed.
        grad_outputs: ``[B, G, *latent_shape]`` the denoiser outputs of the ``G`` steps that carried gradients
            (in order), with their graph: what a KL regularizer to the reference compares (DRaFT+, IPRO).
    """

    latents: Tensor
    timesteps: Tensor
    sde_steps: Tensor
    log_probs: Tensor
    means: Tensor
    stds: Tensor
    final: Tensor
    images: Tensor | None
    schedule: Schedule
    plan: SamplingPlan
    grad_outputs: Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        """The rollouts of consecutive micro-batches (same schedule and plan) as one batch."""
        first = parts[0]
        if any(p.plan is not first.plan or p.schedule is not first.schedule for p in parts):
            raise ValueError("Rollout.cat joins micro-batches of one generation: same schedule and plan.")

        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Rollout(
            latents=join("latents"), timesteps=first.timesteps, sde_steps=first.sde_steps,
            log_probs=join("log_probs"), means=join("means"), stds=join("stds"), final=join("final"),
            images=join("images"), schedule=first.schedule, plan=first.plan, grad_outputs=join("grad_outputs"),
        )  # fmt: skip


def denoise_step(
    model: Denoiser,
    x: Tensor,
    index: int,
    cond: Any,
    schedule: Schedule,
    plan: SamplingPlan,
    guidance: float = 1.0,
    *,
    generator: Generators = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Step ``index`` of ``plan`` from state ``x``: one model call and one step function.

    With ``prev_sample`` given, returns that transition's log-prob under the current model instead of
    drawing (the training-time recomputation). The model call is checkpointed if the plan says so and
    gradients are enabled.
    """
    batch = x.shape[0]
    timestep = schedule.timesteps[index].to(x.device).expand(batch)
    if plan.checkpoint[index] and torch.is_grad_enabled():
        # The recomputation in backward runs the bare network (ModelAdapter.unwrapped): a DDP wrapper's forward
        # would prepare a second gradient reduction inside the one under way.
        bare = getattr(model, "unwrapped", contextlib.nullcontext)
        output = activation_checkpoint(
            model.predict, x, timestep, cond, guidance, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), bare()),
        )  # fmt: skip
    else:
        output = model.predict(x, timestep, cond, guidance)
    out = _apply_step(model, output, x, index, schedule, plan, noise, generator, prev_sample)
    out.model_output = output
    return out


def _apply_step(model, output, x, index, schedule, plan, noise, generator, prev_sample) -> StepOutput:
    stochastic = plan.sde[index]
    if schedule.kind == "flow":
        sigmas = schedule.sigmas
        if not stochastic:
            return flow_ode_step(output, x, sigmas[index], sigmas[index + 1])
        if plan.dynamics == "ddim":
            raise ValueError("plan dynamics 'ddim' is for diffusion models; this model is a flow model.")
        return flow_sde_step(
            output, x, sigmas[index], sigmas[index + 1],
            dynamics=plan.dynamics, noise_level=plan.noise_level, sigma_at_one=float(sigmas[1]),
            noise=noise, generator=generator, prev_sample=prev_sample, reduction=plan.reduction,
        )  # fmt: skip
    if stochastic and plan.dynamics != "ddim":
        raise ValueError(
            f"plan dynamics {plan.dynamics!r} is for flow models; use dynamics='ddim' for diffusion."
        )
    abar = schedule.alphas_cumprod
    return ddim_step(
        output, x, abar[index], abar[index + 1],
        prediction_type=model.prediction_type, eta=plan.noise_level if stochastic else 0.0,
        clip_sample=getattr(model, "clip_sample", None),
        noise=noise, generator=generator, prev_sample=prev_sample, reduction=plan.reduction,
    )  # fmt: skip


def rollout(
    model: Denoiser,
    cond: Any,
    x_T: Tensor,
    schedule: Schedule,
    plan: SamplingPlan,
    *,
    guidance: float = 1.0,
    generator: Generators = None,
    decode: bool = True,
) -> Rollout:
    """Sample from ``x_T`` following ``plan`` and return the whole trajectory.

    Args:
        model: a :class:`Denoiser` (a model adapter).
        cond: the model's conditioning for ``B`` samples (``model.encode(prompts)``).
        x_T: ``[B, *latent_shape]`` initial noise. If it requires grad, gradients reach it through the
            gradient window (noise optimization).
        schedule: the noise levels, ``N`` steps (``model.schedule(N, ...)``).
        plan: per-step SDE/ODE, gradient window and checkpointing, ``N`` steps.
        guidance: classifier-free guidance scale (1 = no guidance).
        generator: draws the noise of the stochastic steps; a list of ``B`` generators gives each sample its
            own stream (the draws then do not depend on the batch a sample is in).
        decode: also decode the output to images in ``[0, 1]``.
    """
    if plan.num_steps != schedule.num_steps:
        raise ValueError(f"the plan has {plan.num_steps} steps but the schedule has {schedule.num_steps}.")
    grad_enabled = torch.is_grad_enabled()
    x = x_T.float()
    states, log_probs, means, stds, sde_steps, outputs = [x], [], [], [], [], []
    out = None
    for i in range(plan.last_step + 1):
        with_grad = grad_enabled and plan.grad[i]
        if not with_grad:
            x = x.detach()
        with torch.set_grad_enabled(with_grad):
            out = denoise_step(model, x, i, cond, schedule, plan, guidance, generator=generator)
        x = out.prev_sample
        states.append(x)
        if with_grad:
            outputs.append(out.model_output)
        if out.log_prob is not None:
            sde_steps.append(i)
            log_probs.append(out.log_prob.detach())
            means.append(out.mean if with_grad else out.mean.detach())
            stds.append(out.std.detach().reshape(-1).expand(x.shape[0]))
    final = out.x0 if plan.stop_after is not None else x
    batch, shape = x.shape[0], x.shape[1:]
    images = None
    if decode:
        with torch.set_grad_enabled(grad_enabled and any(plan.grad)):
            images = model.decode(final)
    empty = x.new_zeros(batch, 0)
    return Rollout(
        latents=torch.stack(states, dim=1),
        timesteps=schedule.timesteps[: plan.last_step + 1],
        sde_steps=torch.tensor(sde_steps, dtype=torch.long),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else empty,
        means=torch.stack(means, dim=1) if means else x.new_zeros(batch, 0, *shape),
        stds=torch.stack(stds, dim=1) if stds else empty,
        final=final,
        images=images,
        schedule=schedule,
        plan=plan,
        grad_outputs=torch.stack(outputs, dim=1) if outputs else x.new_zeros(batch, 0, *shape),
    )
