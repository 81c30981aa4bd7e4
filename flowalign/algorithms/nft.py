"""DiffusionNFT: online RL on the forward process, CFG-free, no log-probs (Zheng et al. 2025,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process", Eq. 8-10; reference implementation
``NVlabs/DiffusionNFT``).

A clean sample ``x0`` drawn by the old policy is re-noised, ``x_t = (1 - t) x0 + t eps``. With the old
policy's velocity ``v_old`` and the trained one's ``v``, the implicit positive and negative policies are

    v+ = (1 - beta) v_old + beta v          v- = (1 + beta) v_old - beta v

and the loss pulls ``v+`` toward the flow-matching target on well-rewarded samples and ``v-`` on badly
rewarded ones: ``L = [r ||x0+(v+) - x0||^2 / w+ + (1 - r) ||x0+(v-) - x0||^2 / w-] / beta`` with
``x0+(v) = x_t - t v``, ``r = 0.5 + 0.5 clip(A / A_max, -1, 1)`` the optimality probability, and the
reference's adaptive weights ``w = stopgrad(mean |x0+(v) - x0|)`` (clamped at 1e-5). The loss is scaled by
``A_max`` as the reference does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nft_loss", "optimality_probability"]


def optimality_probability(advantages: Tensor, adv_clip: float = 5.0) -> Tensor:
    """``r = 0.5 + 0.5 clip(A / A_max, -1, 1)`` in ``[0, 1]``."""
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1.0, 1.0)


def _adaptive_x0_loss(x0_pred: Tensor, x0: Tensor) -> Tensor:
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    return ((x0_pred - x0) ** 2 / weight.to(x0_pred.dtype)).mean(dim=dims)


def nft_loss(
    velocity: Tensor,
    old_velocity: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    *,
    beta: float = 1.0,
    adv_clip: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT loss for ``B`` re-noised samples; returns ``(loss, metrics)``.

    Args:
        velocity: ``[B, *S]`` the trained model's velocity at ``x_t`` (with gradient).
        old_velocity: ``[B, *S]`` the old (sampling) policy's velocity at ``x_t``.
        x_t: ``[B, *S]`` the re-noised samples ``(1 - sigma) x0 + sigma eps``.
        x0: ``[B, *S]`` the clean samples.
        sigma: ``[B]`` noise levels.
        advantages: ``[B]`` group advantages (unclipped; ``adv_clip`` is ``A_max``).
        beta: the implicit policies' step size.
    """
    if beta <= 0:
        raise ValueError(f"DiffusionNFT beta must be > 0, got {beta}.")
    s = sigma.float().view(-1, *([1] * (x_t.ndim - 1)))
    old_velocity = old_velocity.detach()
    positive = (1 - beta) * old_velocity + beta * velocity
    negative = (1 + beta) * old_velocity - beta * velocity
    r = optimality_probability(advantages.float(), adv_clip)
    positive_loss = _adaptive_x0_loss(x_t - s * positive, x0)
    negative_loss = _adaptive_x0_loss(x_t - s * negative, x0)
    per_sample = (r * positive_loss + (1 - r) * negative_loss) / beta
    loss = (per_sample * adv_clip).mean()
    metrics = {
        "policy_loss": loss.detach(),
        "positive_loss": positive_loss.detach().mean(),
        "negative_loss": negative_loss.detach().mean(),
        "optimality": r.mean(),
    }
    return loss, metrics
