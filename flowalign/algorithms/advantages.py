"""Group-relative advantages (GRPO; Shao et al. 2024, Eq. 3; Flow-GRPO, Liu et al. 2025, Eq. 4).

``A_i = (r_i - mean_{g(i)}) / (std + eps)`` where ``mean`` is over the samples of ``i``'s group (the
images of one prompt) and ``std`` is the population standard deviation of the group (``scope="group"``)
or of the whole batch (``scope="global"``), as in Flow-GRPO's ``PerPromptStatTracker`` (eps = 1e-4).

Several rewards combine in one of two ways:

- ``"normalize_then_weight"``: ``A = sum_k w_k A(r_k)`` — each reward normalized on its own, so a reward
  with a large scale cannot drown the others (the mode Flow-GRPO's multi-reward results use per reward);
- ``"weight_then_normalize"``: ``A = A(sum_k w_k r_k)`` — one weighted reward, then normalized.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["group_advantages", "group_ids_from_keys", "multi_reward_advantages"]


def group_ids_from_keys(keys: list) -> Tensor:
    """Consecutive integer ids for hashable group keys (e.g. prompts), in first-seen order."""
    index: dict = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scope: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """``[B]`` advantages of ``[B]`` rewards whose groups are given by ``[B]`` integer ``group_ids``.

    Args:
        scope: ``"group"`` (per-group std) or ``"global"`` (batch std); the mean is always per group.
        eps: added to the std; a group whose rewards are all equal gets advantage 0.
        clip: clamp advantages to ``[-clip, clip]`` (Flow-GRPO's ``adv_clip_max`` = 5); None keeps them.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}."
        )
    if scope not in ("group", "global"):
        raise ValueError(f"advantage std scope must be 'group' or 'global', got {scope!r}.")
    if not torch.isfinite(rewards).all():
        raise ValueError(
            "rewards contain NaN or inf; the training loop skips such batches before computing advantages."
        )
    r = rewards.double()
    ids = group_ids.to(r.device).long()
    groups = int(ids.max()) + 1
    count = torch.zeros(groups, dtype=r.dtype, device=r.device).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, ids, r) / count
    centered = r - mean[ids]
    if scope == "group":
        var = torch.zeros_like(count).index_add_(0, ids, centered**2) / count
        std = var.sqrt()[ids]
    else:
        std = r.std(unbiased=False).expand_as(r)
    advantages = centered / (std + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.to(rewards.dtype)


def multi_reward_advantages(
    components: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    *,
    mode: str = "normalize_then_weight",
    scope: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """Advantages of several rewards (``components[name]`` is ``[B]``) combined with ``weights``."""
    missing = set(weights) - set(components)
    if missing:
        raise ValueError(
            f"weights name rewards {sorted(missing)} that have no scores; scored: {sorted(components)}."
        )
    if mode == "normalize_then_weight":
        total = sum(
            w * group_advantages(components[k], group_ids, scope=scope, eps=eps) for k, w in weights.items()
        )
        return total.clamp(-clip, clip) if clip is not None else total
    if mode == "weight_then_normalize":
        combined = sum(w * components[k] for k, w in weights.items())
        return group_advantages(combined, group_ids, scope=scope, eps=eps, clip=clip)
    raise ValueError(
        f"multi-reward mode must be 'normalize_then_weight' or 'weight_then_normalize', got {mode!r}."
    )
