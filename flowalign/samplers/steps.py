"""Pure sampler step functions, with the exact Gaussian log-probability of stochastic transitions.

Every function takes the denoiser's output and the current sample, does its math in float32, and
returns a :class:`StepOutput`. Randomness is passed in (``noise`` or ``generator``). Given
``prev_sample``, the same function scores that transition instead of drawing one: sampling and
training share this code, so the PPO importance ratio is exactly 1 before any update.

Conventions. Flow models use ``x_sigma = (1 - sigma) x0 + sigma eps`` and the velocity
``v = eps - x0``; sampling runs from ``sigma = 1`` to ``0`` and ``dsigma = sigma_next - sigma < 0``.
Diffusion models use ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

Log-prob reduction. A transition ``x' ~ N(mean, std^2 I)`` over ``D`` latent elements has the
per-element log-density ``l_d = -(x'_d - mean_d)^2 / (2 std^2) - log std - log sqrt(2 pi)``.
``reduction="sum"`` returns ``sum_d l_d`` (the exact joint log-density); ``reduction="mean"`` returns
``mean_d l_d``, the convention of DDPO and Flow-GRPO, whose clip ranges (~1e-4) assume it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "FLOW_SDE_DYNAMICS",
    "StepOutput",
    "ddim_step",
    "diffusion_to_eps_x0",
    "flow_ode_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "randn",
    "velocity_to_eps",
    "velocity_to_x0",
]

FLOW_SDE_DYNAMICS = ("flow_grpo", "cps", "dance")
Reduction = Literal["mean", "sum"]


@dataclass
class StepOutput:
    """One transition ``x -> prev_sample`` (``prev_sample`` is the *less* noisy state, diffusers' name).

    Attributes:
        prev_sample: ``[B, *S]`` float32, the drawn (or given) next state.
        mean: ``[B, *S]`` float32, the transition mean (equal to ``prev_sample`` for a deterministic step).
        std: ``[B, 1, ...]`` float32 broadcastable to ``[B, *S]``, the transition's noise std (0 for ODE).
        log_prob: ``[B]`` float32 log-density of ``prev_sample`` under ``N(mean, std^2)`` with the
            requested reduction; None for deterministic steps.
        x0: ``[B, *S]`` float32, the model's clean-sample prediction at this step.
        model_output: ``[B, *S]`` float32, the denoiser output the step used (set by ``denoise_step``).
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None
    x0: Tensor
    model_output: Tensor | None = None


def _per_sample(level: float | Tensor, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A scalar or ``[B]`` noise level as a ``dtype`` (float32) tensor broadcastable to ``like`` (``[B, 1, ...]``)."""
    level = torch.as_tensor(level, dtype=dtype, device=like.device)
    if level.ndim == like.ndim and level.shape[1:] == (1,) * (like.ndim - 1):
        return level
    if level.ndim == 0:
        level = level.expand(like.shape[0])
    if level.shape != (like.shape[0],):
        raise ValueError(
            f"noise level must be a scalar or have shape ({like.shape[0]},), got {tuple(level.shape)}."
        )
    return level.view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: Reduction = "mean") -> Tensor:
    """``log N(x; mean, std^2)`` per element, reduced over all but the batch dimension."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if bool((std <= 0).any()):
        raise ValueError(
            "the transition is deterministic (std == 0), so it has no log-density; treat this step as an "
            "ODE step in the sampling plan (e.g. CPS's last step, which lands on sigma = 0)."
        )
    log_density = (
        -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    )
    dims = tuple(range(1, log_density.ndim))
    return log_density.mean(dim=dims) if reduction == "mean" else log_density.sum(dim=dims)


def velocity_to_x0(velocity: Tensor, sample: Tensor, sigma: float | Tensor) -> Tensor:
    """``x0 = x - sigma v`` for ``x = (1 - sigma) x0 + sigma eps``, ``v = eps - x0``."""
    return sample - _per_sample(sigma, sample) * velocity


def velocity_to_eps(velocity: Tensor, sample: Tensor, sigma: float | Tensor) -> Tensor:
    """``eps = x + (1 - sigma) v``."""
    return sample + (1 - _per_sample(sigma, sample)) * velocity


def diffusion_to_eps_x0(
    model_output: Tensor, sample: Tensor, alpha_bar: float | Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """``(eps, x0)`` from an epsilon-, v- (Salimans & Ho 2022) or sample-prediction output."""
    a = _per_sample(alpha_bar, sample)
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(
            f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}."
        )
    return eps, x0


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> Tensor:
    """Standard normal float32 noise; with a list of ``B`` generators, row ``i`` comes from generator ``i``
    (so a sample's noise does not depend on which batch or process it is drawn in)."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample."
            )
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def _draw(mean: Tensor, std: Tensor, noise: Tensor | None, generator: Generators) -> Tensor:
    if noise is None:
        noise = randn(mean.shape, generator, mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(mean.shape)}.")
    return mean + std * noise.float()


def flow_ode_step(
    velocity: Tensor, sample: Tensor, sigma: float | Tensor, sigma_next: float | Tensor
) -> StepOutput:
    """Euler step of the probability-flow ODE, ``x' = x + (sigma_next - sigma) v`` (diffusers' FlowMatchEuler)."""
    velocity, sample = velocity.float(), sample.float()
    s, s_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    prev = sample + (s_next - s) * velocity
    return StepOutput(prev, prev, torch.zeros_like(s), None, sample - s * velocity)


def flow_sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    dynamics: str = "flow_grpo",
    noise_level: float = 0.7,
    sigma_at_one: float | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
    prev_sample: Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One stochastic step of a flow model whose marginals match the ODE's, with its log-prob.

    ``dynamics``:
        - ``"flow_grpo"`` (Liu et al. 2025, Flow-GRPO, Eq. 9; reference ``sd3_sde_with_logprob.py``):
          the reverse SDE with diffusion ``g = a sqrt(sigma / (1 - sigma))``, ``a = noise_level``:
          ``mean = x (1 + g^2 dsigma / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dsigma`` and
          ``std = g sqrt(-dsigma)``. ``g`` diverges at ``sigma = 1``; the reference then uses the
          schedule's second sigma in the denominator: pass it as ``sigma_at_one`` (``sigmas[1]``).
        - ``"cps"`` (Wang & Yu 2025, coefficients-preserving sampling): ``std = sigma_next sin(a pi / 2)``,
          ``mean = x0 (1 - sigma_next) + eps_hat sqrt(sigma_next^2 - std^2)`` with
          ``x0 = x - sigma v``, ``eps_hat = x + (1 - sigma) v``. Deviation: flow_grpo scores CPS
          transitions with the unnormalized ``-(x' - mean)^2``; here it is the exact Gaussian log-density
          (the log-ratio of the reference is this one's times ``2 std^2``, a policy-independent scale).
          CPS is deterministic when ``sigma_next = 0``. Its noise is a fixed fraction of ``sigma_next``
          whatever the step size, so unlike the two SDEs it does not converge to the ODE's marginals as
          steps are added: with an exact denoiser it contracts the variance, more at larger ``a``.
        - ``"dance"`` (Xue et al. 2025, DanceGRPO ``flux_step`` with ``sde_solver``): the same reverse
          SDE with constant ``g = noise_level`` (eta): ``mean = x + dsigma (v + g^2 (x + (1 - sigma) v)
          / (2 sigma))``, ``std = g sqrt(-dsigma)``.
    """
    if dynamics not in FLOW_SDE_DYNAMICS:
        raise ValueError(f"unknown SDE dynamics {dynamics!r}; choose one of {FLOW_SDE_DYNAMICS}.")
    velocity, sample = velocity.float(), sample.float()
    s, s_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    dsigma = s_next - s
    x0 = sample - s * velocity
    if dynamics == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        eps_hat = sample + (1 - s) * velocity
        mean = x0 * (1 - s_next) + eps_hat * (s_next**2 - std**2).sqrt()
    else:
        if dynamics == "flow_grpo":
            at_one = s == 1
            if bool(at_one.any()) and sigma_at_one is None:
                raise ValueError(
                    "flow_grpo dynamics at sigma = 1 needs sigma_at_one (the schedule's sigmas[1]), as in the "
                    "reference implementation; the rollout passes it for you."
                )
            denominator = 1 - torch.where(at_one, torch.as_tensor(sigma_at_one or 0.0, dtype=s.dtype), s)
            g = (s / denominator).sqrt() * noise_level
        else:
            g = torch.full_like(s, noise_level)
        mean = sample * (1 + g**2 / (2 * s) * dsigma) + velocity * (1 + g**2 * (1 - s) / (2 * s)) * dsigma
        std = g * (-dsigma).sqrt()
    if prev_sample is None:
        prev_sample = _draw(mean, std, noise, generator)
    return StepOutput(
        prev_sample.float(), mean, std, gaussian_log_prob(prev_sample.float(), mean, std, reduction), x0
    )


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_bar: float | Tensor,
    alpha_bar_prev: float | Tensor,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    clip_sample: float | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
    prev_sample: Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """DDIM step (Song et al. 2021, Eq. 12) with DDPO's log-prob of the ``eta > 0`` transition.

    ``std = eta sqrt((1 - abar') / (1 - abar) (1 - abar / abar'))``,
    ``mean = sqrt(abar') x0 + sqrt(1 - abar' - std^2) eps``. With ``eta = 0`` the step is diffusers'
    deterministic DDIM and ``log_prob`` is None. ``clip_sample`` clamps ``x0`` to ``[-c, c]`` as the
    scheduler option of that name does.
    """
    model_output, sample = model_output.float(), sample.float()
    a, a_prev = _per_sample(alpha_bar, sample), _per_sample(alpha_bar_prev, sample)
    eps, x0 = diffusion_to_eps_x0(model_output, sample, a, prediction_type)
    if clip_sample is not None:  # as diffusers' DDIMScheduler.step (use_clipped_model_output=False, what the
        x0 = x0.clamp(-clip_sample, clip_sample)  # pipelines and DDPO use): only x0 is clipped, eps is kept
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if eta == 0:
        if prev_sample is not None:
            raise ValueError(
                "a deterministic DDIM step (eta = 0) has no log-prob; use eta > 0 to score transitions."
            )
        return StepOutput(mean, mean, std, None, x0)
    if prev_sample is None:
        prev_sample = _draw(mean, std, noise, generator)
    return StepOutput(
        prev_sample.float(), mean, std, gaussian_log_prob(prev_sample.float(), mean, std, reduction), x0
    )
