"""Flow-GRPO's clipped policy loss over step log-probs, its KL to the reference, and GRPO-Guard's ratio.

The policy loss of one denoising step (Liu et al. 2025, Flow-GRPO, Eq. 5; reference ``train_sd3.py``):

    ratio = exp(log_prob - old_log_prob)
    loss  = mean_i max(-A_i ratio_i, -A_i clip(ratio_i, 1 - eps, 1 + eps))

with advantages clipped to ``[-adv_clip, adv_clip]`` (5 in Flow-GRPO) and ``eps`` ~ 1e-4 for mean-reduced
log-probs. DDPO (Black et al. 2023) uses the same loss with DDIM-eta log-probs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grpo_loss", "guard_log_ratio", "step_kl"]


def guard_log_ratio(
    log_prob: Tensor,
    old_log_prob: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """GRPO-Guard's normalized log-ratio (Wang et al. 2025, arXiv 2510.22319, RatioNorm).

    For a Gaussian step with std ``s``, ``x' = old_mean + s eps`` and ``d = mean - old_mean``, the log-ratio is
    ``red(eps d) / s - red(d^2) / (2 s^2)``: its mean is shifted below 0 by ``red(d^2)/(2 s^2)`` and its
    spread grows as ``1/s`` at low-noise steps. RatioNorm undoes both:
    ``s * log_ratio + red(d^2) / (2 s) = red(eps d)`` (``red`` = the log-prob reduction over elements).
    ``std`` is ``[B, 1, ...]`` (the step's noise std, constant within a sample).
    """
    dims = tuple(range(1, mean.ndim))
    sq = (mean - old_mean.detach()) ** 2
    sq = sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)
    s = std.reshape(std.shape[0], -1)[:, 0]
    return s * (log_prob - old_log_prob) + sq / (2 * s)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip: float | None = 5.0,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clipped policy loss of one step for ``B`` samples; returns ``(loss, metrics)``.

    Args:
        log_prob: ``[B]`` log-probs of the stored transitions under the current policy (with gradient).
        old_log_prob: ``[B]`` log-probs recorded at sampling time.
        advantages: ``[B]``.
        clip_range: ``eps`` of the ratio clip.
        adv_clip: clamp advantages to ``[-adv_clip, adv_clip]``; None keeps them.
        log_ratio: use this log-ratio instead of ``log_prob - old_log_prob`` (GRPO-Guard's normalized one).

    Metrics: ``ratio`` (mean), ``clip_frac`` (share of ratios outside the clip range), ``approx_kl``
    (``0.5 mean (log_prob - old_log_prob)^2``, as Flow-GRPO logs it), ``policy_loss``.
    """
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape or log_prob.ndim != 1:
        raise ValueError(
            f"log_prob, old_log_prob and advantages must all be [B]; got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}."
        )
    if adv_clip is not None:
        advantages = advantages.clamp(-adv_clip, adv_clip)
    delta = log_prob - old_log_prob.detach()
    ratio = torch.exp(delta if log_ratio is None else log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "ratio": ratio.mean(),
            "clip_frac": ((ratio - 1).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (delta**2).mean(),
        }
    return loss, metrics


def step_kl(
    mean: Tensor,
    ref_mean: Tensor,
    std: Tensor,
    *,
    form: str = "gaussian",
    dsigma: Tensor | float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``[B]`` KL of one step's transition to the reference policy's (same std, different means).

    ``form``:
        - ``"gaussian"``: the exact ``KL(N(mean, s^2) || N(ref_mean, s^2)) = red((mean - ref_mean)^2) / (2 s^2)``
          with ``red`` the log-prob reduction (``mean`` gives the per-element average, like the log-probs).
        - ``"flow_grpo"``: Flow-GRPO's ``mean((mean - ref_mean)^2) / (2 g^2)`` where ``g`` is the SDE's
          diffusion coefficient, i.e. the exact per-element KL times ``|dsigma|`` (``s = g sqrt(|dsigma|)``).
          Pass ``dsigma`` for Flow-GRPO/Dance dynamics; leave it None for CPS, whose ``std`` is used as is,
          as the reference does.
    Both are zero when the LoRA is zero (mean == ref_mean).
    """
    dims = tuple(range(1, mean.ndim))
    sq = (mean - ref_mean.detach()) ** 2
    sq = sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)
    s2 = std.reshape(std.shape[0], -1)[:, 0] ** 2
    kl = sq / (2 * s2)
    if form == "gaussian":
        return kl
    if form == "flow_grpo":
        return kl if dsigma is None else kl * torch.as_tensor(dsigma, dtype=kl.dtype, device=kl.device).abs()
    raise ValueError(f"KL form must be 'gaussian' or 'flow_grpo', got {form!r}.")
