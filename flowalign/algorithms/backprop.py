"""Reward backpropagation through the sampler: AlignProp, DRaFT-K / DRaFT-LV, ReFL, with a KL regularizer.

The truncation schemes are sampling plans (``flowalign.samplers.plan.grad_window``); this module holds
the losses that use their outputs:

- AlignProp (Prabhudesai et al. 2023): gradients through a random contiguous last-``K`` window, per-step
  checkpointing, LoRA. ``grad="random_k"``, loss ``-r(x0)``.
- DRaFT-K (Clark et al. 2024, Sec. 4): the last ``K`` steps. ``grad="last_k"``, loss ``-r(x0)``.
- DRaFT-LV (Clark et al. 2024, Sec. 4.1): after sampling, re-noise ``x0`` to the last step's noise level
  ``n`` times and average the reward of the one-step denoisings (:func:`draft_lv_loss`).
- ReFL (Xu et al. 2023, ImageReward, Alg. 1): no gradient down to a random step in ``[T1, T2)``, one step
  with gradient, the reward of its ``x0`` prediction. ``grad="single"``.
- KL to the reference over the differentiated steps, ``|v_theta - v_ref|^2`` (DRaFT+) or IPRO's
  noise-level-weighted form: :func:`velocity_kl`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowalign.samplers import Rollout
from flowalign.samplers.paths import FlowPath
from flowalign.samplers.steps import Generators, randn

__all__ = ["draft_lv_loss", "velocity_kl"]


def velocity_kl(model, rollout: Rollout, cond, guidance: float = 1.0, form: str = "velocity") -> Tensor:
    """``[B]`` mean over the gradient-window steps of ``mean_d (out_theta - out_ref)^2`` (``form="velocity"``,
    DRaFT+), or of ``mean_d (v_theta - v_ref)^2 / (2 sigma_t^2)`` (``form="ipro"``: IPRO's multi-step KL,
    Shen et al. 2025, Sec. 3.4, its weights ``1 / (2 sigma_t^2)`` as the authors' Reward-FL code in
    alibaba/ROLL computes them, ``sigma_t`` the step's noise level; flow models only).

    ``out`` is the denoiser output (velocity for flow models, epsilon/v for diffusion models) at the states the
    rollout visited; the reference is the model with its LoRA disabled, evaluated without gradient. Zero
    while the LoRA is zero.
    """
    if form not in ("velocity", "ipro"):
        raise ValueError(f"KL form must be 'velocity' or 'ipro', got {form!r}.")
    if form == "ipro" and rollout.schedule.kind != "flow":
        raise ValueError(
            "the IPRO KL weights velocities by their noise level; it is defined for flow models only."
        )
    steps = [i for i, g in enumerate(rollout.plan.grad[: rollout.plan.last_step + 1]) if g]
    if not steps:
        raise ValueError("the rollout has no gradient window; a KL over differentiated steps needs one.")
    terms = []
    with torch.no_grad(), model.reference():
        refs = [
            model.predict(
                rollout.latents[:, i].detach(), rollout.timesteps[i].expand(len(cond)), cond, guidance
            )
            for i in steps
        ]
    for column, (i, ref) in enumerate(zip(steps, refs)):
        diff = rollout.grad_outputs[:, column] - ref
        term = diff.pow(2).flatten(1).mean(1)
        terms.append(term / (2 * rollout.schedule.sigmas[i].float() ** 2) if form == "ipro" else term)
    return torch.stack(terms, dim=1).mean(1)


def draft_lv_loss(
    model,
    reward_fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    cond,
    timestep: Tensor,
    sigma: float | Tensor,
    *,
    repeats: int = 2,
    guidance: float = 1.0,
    generator: Generators = None,
) -> Tensor:
    """DRaFT-LV: ``-mean_n r(decode(x0_hat_n))`` with ``x0_hat_n`` the one-step denoising of ``x0`` re-noised to
    ``sigma`` (``x_n = (1 - sigma) x0 + sigma eps_n`` for flow models). ``reward_fn`` maps decoded images to
    ``[B]`` rewards. Returns the scalar loss (mean over samples and repeats)."""
    if model.kind != "flow":
        raise ValueError("draft_lv_loss re-noises with the rectified-flow path; it needs a flow model.")
    if repeats < 1:
        raise ValueError(f"DRaFT-LV needs repeats >= 1, got {repeats}.")
    x0 = x0.detach()
    s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    path = FlowPath()
    losses = []
    for _ in range(repeats):
        eps = randn(x0.shape, generator, x0.device)
        x_t = path.noised(x0, s, eps)
        velocity = model.predict(x_t, timestep.expand(x0.shape[0]), cond, guidance)
        losses.append(-reward_fn(model.decode(path.x0_from_output(velocity, x_t, s))).mean())
    return torch.stack(losses).mean()
