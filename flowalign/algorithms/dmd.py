"""Distribution-matching distillation losses: DMD / DMD2, f-distill's weighting, the GAN terms.

A few-step student ``G`` generates ``x = G(z)``. DMD (Yin et al. 2024, "One-step Diffusion with
Distribution Matching Distillation") moves ``G``'s distribution toward the teacher's by the gradient of
the reverse KL between their noised marginals: with ``x_t`` a re-noised student sample (flow form
``x_t = (1 - t) x + t eps``; any noising with an x0-prediction works alike),

    d KL(q_t || p_t) / d theta = E[ (s_fake(x_t) - s_real(x_t)) dx_t/dtheta ]

where ``s_real`` is the teacher's score (with CFG) and ``s_fake`` the score of a model trained online on
the student's samples (the *fake score*). In x0-prediction form the score difference is proportional to
``x0_fake - x0_real`` (for flows: ``s_fake - s_real = (1 - t) (x0_fake - x0_real) / t^2``). DMD2 (Yin et al.
2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"; ``tianweiy/DMD2``
``main/sd_guidance.py``) normalises it per sample by the mean distance to the teacher's prediction and
turns it into a loss whose gradient with respect to ``x`` is that direction:

    grad = (x0_fake - x0_real) / mean_{non-batch} |x - x0_real|
    L_DMD = 0.5 * mean((x - stopgrad(x - grad))^2)          (d L / d x = grad / numel)

f-distill (Xu et al. 2025, "One-step Diffusion Models with f-Divergence Distribution Matching";
``NVlabs/FastGen`` ``f_distill.py``) weights each sample's gradient by ``h(r) = f''(r) r^2`` of the
density ratio ``r = p_teacher / q_student``, estimated from a discriminator's logit (``r = exp(logit)``),
clipped and normalised (:func:`f_divergence_weight`); reverse KL has ``h = 1`` and is plain DMD.

Reward-tilted DMD (RTDMD, "Reinforcing Few-step Generators via Reward-Tilted Distribution Matching";
``Harahan/RTDMD``) matches the teacher's distribution tilted by a reward, ``p~(x) = p(x) exp(beta r(x)) / Z``:
since ``KL(q || p~) = KL(q || p) - beta E_q[r] + log Z``, its gradient is the DMD gradient minus ``beta``
times the gradient of the expected reward (:func:`reward_tilted_dmd_loss`, for differentiable rewards).

AC-DMD (RTDMD's "ambient-consistent" DMD; ``Harahan/RTDMD`` ``ac_dmd_trainer.py``, ``ac_dmd_utils.py``)
matches the student's *states* rather than its samples: a multi-step student's state ``x_s`` after a step,
still noisy at level ``s``, should be distributed as the teacher's marginal at ``s``. ``x_s`` is re-noised to
a level ``e > s`` (:func:`ambient_noised`), the teacher and the fake score predict there, both predictions
are moved back to level ``s`` (:func:`flow_step_to`) and their difference is the DMD direction at ``x_s``.
The fake score learns the student's marginal at ``e`` from noisy data by the ambient velocity target
(:func:`ambient_velocity_target`), whose regression gives the velocity of the marginal at ``e`` exactly. At
``s = 0`` all three reduce to plain DMD. RTDMD's cold start regularises that fake score to be consistent
along its own sampler (:func:`consistency_loss`).

The discriminator of DMD2's GAN term is trained with the non-saturating losses
:func:`gan_discriminator_loss` / :func:`gan_generator_loss` (DMD2 ``sd_guidance.py``: ``softplus``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.samplers.steps import _per_sample

__all__ = [
    "F_DIVERGENCES",
    "ambient_loss_weight",
    "ambient_noised",
    "ambient_velocity_target",
    "consistency_loss",
    "consistency_step",
    "dmd_gradient",
    "dmd_loss",
    "f_divergence_weight",
    "fake_score_loss",
    "flow_step_to",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "reward_tilted_dmd_loss",
]


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def dmd_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor, *, normalize: bool = True) -> Tensor:
    """The distribution-matching direction for student samples ``x [B, *S]`` (detached).

    ``real_x0`` / ``fake_x0``: the teacher's (with CFG) and the fake score's x0-predictions at the re-noised
    ``x``. ``normalize``: DMD2's division by ``mean |x - real_x0|`` per sample (``False``: the raw
    difference, which is the reverse-KL score difference up to the noise level's factor). Non-finite
    entries (a zero distance) become 0 (DMD2's ``nan_to_num`` zeroes NaN too, but keeps +-inf as the largest
    float; a sample with no distance to the teacher has nothing to move).
    """
    if not (x.shape == real_x0.shape == fake_x0.shape):
        raise ValueError(
            f"dmd_gradient: x {tuple(x.shape)}, real_x0 {tuple(real_x0.shape)} and fake_x0 "
            f"{tuple(fake_x0.shape)} must have one shape."
        )
    with torch.no_grad():
        x, real_x0, fake_x0 = x.double(), real_x0.double(), fake_x0.double()
        grad = fake_x0 - real_x0
        if normalize:
            grad = grad / _per_sample_mean((x - real_x0).abs())
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(
    x: Tensor, real_x0: Tensor, fake_x0: Tensor, *, weight: Tensor | None = None, normalize: bool = True
) -> Tensor:
    """DMD2's generator loss ``0.5 * mean((x - stopgrad(x - w * grad))^2)`` (see the module docstring).

    ``x`` carries the gradient to the student; ``weight [B]`` multiplies each sample's direction
    (f-distill's :func:`f_divergence_weight`; None: 1).
    """
    grad = dmd_gradient(x, real_x0, fake_x0, normalize=normalize)
    if weight is not None:
        if weight.shape != x.shape[:1]:
            raise ValueError(f"dmd_loss: weight must have shape [{x.shape[0]}], got {tuple(weight.shape)}.")
        grad = grad * weight.detach().double().reshape(-1, *([1] * (x.ndim - 1)))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    target = (x.detach().double() - grad).to(dtype)
    return 0.5 * F.mse_loss(x.to(dtype), target, reduction="mean")


def _level(sigma: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` level broadcastable to ``like``, in ``like``'s dtype (float64 in the exact tests)."""
    return _per_sample(sigma, like, dtype=like.dtype)


def _ambient_scale(sigma_s: Tensor, sigma_e: Tensor) -> tuple[Tensor, Tensor]:
    """``a = (1 - e) / (1 - s)`` and ``sigma_ts = sqrt(e^2 - a^2 s^2)``: the flow path from level ``s`` to ``e``."""
    a = (1 - sigma_e) / (1 - sigma_s)
    return a, torch.sqrt(torch.clamp(sigma_e**2 - a**2 * sigma_s**2, min=1e-12))


def ambient_noised(x_s: Tensor, sigma_s: Tensor | float, sigma_e: Tensor | float, noise: Tensor) -> Tensor:
    """A state ``x_s`` at flow level ``s`` noised further to level ``e > s``: ``a x_s + sigma_ts noise`` with
    ``a = (1 - e) / (1 - s)``, ``sigma_ts^2 = e^2 - a^2 s^2``, so that ``x_s = (1 - s) x0 + s eps'`` becomes
    ``(1 - e) x0 + e eps''`` (RTDMD ``flow_forward_v2``). At ``s = 0``: the flow noising ``(1 - e) x + e noise``."""
    s, e = _level(sigma_s, x_s), _level(sigma_e, x_s)
    a, sigma_ts = _ambient_scale(s, e)
    return a * x_s + sigma_ts * noise


def ambient_velocity_target(
    x_s: Tensor, sigma_s: Tensor | float, sigma_e: Tensor | float, noise: Tensor
) -> Tensor:
    """The fake score's regression target at ``ambient_noised(x_s, s, e, noise)`` when only the noisy state
    ``x_s`` (level ``s``) is known, not its clean sample (RTDMD ``flow_forward_target_v2``, the paper's form):

        target = -x_s / (1 - s) + (e + (1 - e) s^2 / (1 - s)^2) / sigma_ts * noise

    Its mean given the noised point is the velocity ``E[eps - x0 | x_e]`` of the marginal at ``e`` (tested
    exactly on Gaussians), so a network regressed on it learns the same field as one trained on clean
    samples. At ``s = 0`` it is the flow target ``noise - x_s``."""
    s, e = _level(sigma_s, x_s), _level(sigma_e, x_s)
    _, sigma_ts = _ambient_scale(s, e)
    return -x_s / (1 - s) + (e + (1 - e) * s**2 / (1 - s) ** 2) / sigma_ts * noise


def ambient_loss_weight(sigma_s: Tensor, sigma_e: Tensor, largest: float = 10.0) -> Tensor:
    """The fake score's per-sample weight on the squared error to :func:`ambient_velocity_target`:
    ``min(1, largest * sigma_ts^2)``. RTDMD's configs write the loss as ``clamp(1 / s^2, max=10) (s v - s
    target)^2`` with ``s = sigma_ts`` (``move_scale_out: true``, ``ac_fake_loss_weight_clamp_max: 10``), which
    is this weight on ``(v - target)^2``: it damps the levels just above the state's, where the target's
    noise coefficient grows like ``1 / sigma_ts``."""
    _, sigma_ts = _ambient_scale(sigma_s, sigma_e)
    return torch.clamp(largest * sigma_ts**2, max=1.0)


def flow_step_to(x_t: Tensor, x0: Tensor, sigma_t: Tensor | float, sigma_to: Tensor | float) -> Tensor:
    """The deterministic flow move (Euler / DDIM, velocity ``(x_t - x0) / sigma_t``) of ``x_t`` at level
    ``sigma_t`` to level ``sigma_to`` along the prediction ``x0``: ``x0 + (sigma_to / sigma_t) (x_t - x0)``.
    AC-DMD's map of the teacher's and the fake score's predictions back to the student's level (RTDMD maps
    with its CPS sampler, here deterministic like the student's own steps); at ``sigma_to = 0`` it is ``x0``."""
    t, to = _level(sigma_t, x_t), _level(sigma_to, x_t)
    return x0 + (to / t) * (x_t - x0)


def consistency_step(
    x_t: Tensor,
    x0: Tensor,
    sigma_t: Tensor | float,
    sigma_s: Tensor | float,
    noise: Tensor,
    eta: float | None = None,
) -> Tensor:
    """One stochastic flow move of ``x_t`` (level ``t``) to level ``s < t`` along the x0-prediction ``x0``:
    ``(1 - s) x0 + sqrt(s^2 - std^2) eps_hat + std noise`` with ``eps_hat = (x_t - (1 - t) x0) / t``.

    ``eta=None``: ``std = s sigma_ts / t`` (``sigma_ts^2 = t^2 - a^2 s^2``, ``a = (1 - t) / (1 - s)``), the
    flow's reverse Markov step (DDPM's posterior ``q(x_s | x_t, x0)``): under it the exact denoiser is
    consistent (:func:`consistency_loss` is 0; tested on Gaussians). ``eta``: CPS with ``std = s sin(eta pi /
    2)``, RTDMD's transition (``scheduler_transition_step``, ``cps_eta`` 0.9), equal to
    :func:`flowalign.samplers.steps.flow_sde_step`'s ``cps`` step. Deviation from RTDMD's default: CPS at a
    fixed ``eta`` is not the reverse process, and the exact denoiser is not consistent under it (at ``eta``
    0.9 the exact x0-prediction of data N(0.7, 0.5^2) drifts by 0.01 to 0.1 per move in the tests), so the
    regulariser pulls the fake score away from the student's true denoiser."""
    t, s = _level(sigma_t, x_t), _level(sigma_s, x_t)
    if eta is None:
        _, sigma_ts = _ambient_scale(s, t)
        std = torch.where(s > 0, s * sigma_ts / t, torch.zeros_like(s))
    else:
        std = s * math.sin(eta * math.pi / 2)
    eps_hat = (x_t - (1 - t) * x0) / torch.clamp(t, min=1e-12)  # at t = 0, x_t = x0 and s = 0: the move is x0
    return (1 - s) * x0 + torch.sqrt(torch.clamp(s**2 - std**2, min=0)) * eps_hat + std * noise


def consistency_loss(anchor_x0: Tensor, x0_1: Tensor, x0_2: Tensor | None = None) -> Tensor:
    """The fake score's consistency regulariser (Daras et al. 2023, "Consistent Diffusion Models", Eq. 5;
    RTDMD ``ac_dmd_trainer.py`` ``_compute_consistency_loss``): a denoiser ``h`` is consistent when its
    x0-prediction is a martingale along its own sampler, ``E[h(x_s, s) | x_t] = h(x_t, t)`` for ``s < t``.

    ``anchor_x0``: ``h(x_t, t)``; ``x0_1``, ``x0_2``: ``h`` at two independent stochastic moves of ``x_t`` to
    the same level ``s`` (RTDMD: one CPS step with the anchor's detached prediction). The two-sample estimator

        mean((x0_1 - anchor_x0) * (x0_2 - anchor_x0))

    is unbiased for ``mean(||E[h(x_s, s) | x_t] - h(x_t, t)||^2)`` (tested on Gaussians) and can be negative;
    without ``x0_2`` it is the non-negative but biased one-sample MSE (RTDMD's other option)."""
    anchor = anchor_x0.float()
    first = x0_1.float() - anchor
    second = first if x0_2 is None else x0_2.float() - anchor
    return (first * second).flatten(1).mean(dim=1).mean()


def fake_score_loss(velocity: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """The fake score's flow-matching loss on detached student samples ``x0``: ``mean((v - (noise - x0))^2)``
    with ``velocity`` predicted at ``x_t = (1 - t) x0 + t noise`` (the velocity target of
    ``NVlabs/FastGen``'s ``flow`` parameterisation and RTDMD's fake-score update)."""
    return F.mse_loss(velocity.float(), (noise - x0.detach()).float(), reduction="mean")


F_DIVERGENCES: dict[str, Callable[[Tensor], Tensor]] = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / r,
    "sh": lambda r: r.sqrt(),
    "jf": lambda r: 1 + r,
}
"""``h(r) = f''(r) r^2`` up to a constant factor (the batch normalisation removes it), per divergence:
reverse KL ``f = -log r``; forward KL ``r log r``; Jensen-Shannon; the softened reverse KL
``(r + 1) log((r + 1) / (2 r))``; Neyman chi-square ``(1 - r)^2 / r``; squared Hellinger ``(sqrt(r) - 1)^2``;
Jeffreys ``(r - 1) log r`` (f-distill's table; ``NVlabs/FastGen`` ``f_distill.py``)."""


def f_divergence_weight(
    logits: Tensor,
    divergence: str,
    *,
    t: Tensor | None = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    bins: int = 10,
    logit_clamp: float = 10.0,
    ratio_range: tuple[float, float] = (0.1, 20.0),
    normalize: bool = True,
) -> Tensor:
    """f-distill's per-sample weight ``[B]`` from the discriminator's logits ``[B]`` or ``[B, heads]``.

    ``r = clamp(exp(clamp(mean logit, +-logit_clamp)), *ratio_range)``; with ``t`` (each sample's noise
    level) ``r`` is divided by its mean within ``bins`` equal bins of ``t_range`` (the ratio's scale differs
    between noise levels); ``h = F_DIVERGENCES[divergence](r)``, divided by its batch mean when
    ``normalize``. Detached: the weight scales the DMD direction, it is not trained through. The bin means
    are this batch's (FastGen's default, ``ratio_ema_rate=0``, over all processes): a sample alone in its
    bin gets ``r = 1``, so use batches of several samples per bin.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {divergence!r}; choose one of {sorted(F_DIVERGENCES)}.")
    low, high = ratio_range
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"ratio_range must satisfy 0 < low < high < inf, got {ratio_range}.")
    with torch.no_grad():
        logit = logits.double()
        if logit.ndim == 2:
            logit = logit.mean(dim=1)
        r = logit.clamp(-logit_clamp, logit_clamp).exp().clamp(low, high)
        if t is not None:
            start, stop = t_range
            if not stop > start or bins < 1:
                raise ValueError(f"t_range must have stop > start and bins >= 1, got {t_range} and {bins}.")
            index = ((t.double() - start) / (stop - start) * bins).floor().clamp(0, bins - 1).long()
            sums = torch.zeros(bins, dtype=r.dtype, device=r.device).index_add_(0, index, r)
            counts = torch.zeros(bins, dtype=r.dtype, device=r.device).index_add_(
                0, index, torch.ones_like(r)
            )
            r = r / (sums / counts.clamp(min=1))[index]
        h = F_DIVERGENCES[divergence](r)
        if normalize:
            h = h / (h.mean() + 1e-6)
        return h.float()


def reward_tilted_dmd_loss(
    x: Tensor,
    real_x0: Tensor,
    fake_x0: Tensor,
    rewards: Tensor,
    beta: float,
    *,
    dmd_scale: float = 1.0,
    weight: Tensor | None = None,
    normalize: bool = True,
    margin: float | None = None,
) -> Tensor:
    """``dmd_scale * dmd_loss(x, real_x0, fake_x0) - beta * mean(rewards)``: DMD toward the reward-tilted
    teacher ``p exp(beta r) / Z`` for a reward ``rewards [B]`` differentiable in ``x`` (see the module
    docstring). ``dmd_scale`` converts :func:`dmd_loss` into the KL's units: its gradient per element is
    ``(x0_fake - x0_real) / numel``, so with ``normalize=False``, ``weight = (1 - t)^2 / t^2`` (flow noising at
    level ``t``: the score difference times ``dx_t / dx``) and ``dmd_scale = numel / B`` the two terms are
    ``grad KL(q_t || p_t) - beta grad E[r]`` per sample, whose fixed point tends to the tilted target as
    ``t -> 0``. RTDMD itself states no ``beta``: it adds ``1e-3`` x DMD2's normalised loss and ``1e-4`` x a
    hinge on the rewards (``Harahan/RTDMD`` ``bp_mixin.py``, ``ac_dmd_mixin.py``), i.e. ``beta`` about
    0.1 relative to the normalised DMD term, which is what ``dmd_scale = 1`` (the recipe's) means here.

    ``margin``: RTDMD's backprop hinge instead of the linear term, ``+ beta * mean(max(0, margin - rewards))``
    (``bp_mixin.py`` ``_compute_bp_loss``: ``relu(bp_reward_margin - reward)``, margin 3 on the sum of
    PickScore, CLIPScore and HPSv2): the same gradient for a sample whose reward is below ``margin``, none
    for one above it, so samples stop being pushed once they clear it."""
    if rewards.shape != x.shape[:1]:
        raise ValueError(
            f"reward_tilted_dmd_loss: rewards must have shape [{x.shape[0]}], got {tuple(rewards.shape)}."
        )
    if not math.isfinite(beta) or not math.isfinite(dmd_scale):
        raise ValueError(
            f"reward_tilted_dmd_loss: beta and dmd_scale must be finite, got {beta}, {dmd_scale}."
        )
    if margin is not None and not math.isfinite(margin):
        raise ValueError(f"reward_tilted_dmd_loss: margin must be finite or None, got {margin}.")
    distribution = dmd_loss(x, real_x0, fake_x0, weight=weight, normalize=normalize)
    if margin is not None:
        return dmd_scale * distribution + beta * F.relu(margin - rewards.float()).mean()
    return dmd_scale * distribution - beta * rewards.float().mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean(softplus(-D(G(z))))`` (DMD2)."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss ``mean(softplus(D(fake))) + mean(softplus(-D(real)))`` (DMD2)."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()
