"""A weighted combination of rewards is itself a reward and keeps every part's scores.

``scores = sum_i w_i * f_i(r_i)`` where ``f_i`` is the identity or, with ``normalize=True``, the batch
z-score ``(r_i - mean) / (std + eps)``. ``RewardOutput.components`` holds each part's raw scores, so an
algorithm can instead normalize advantages per reward (Flow-GRPO's multi-reward mode) and weight them
itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput

__all__ = ["WeightedReward"]


class WeightedReward(Reward):
    """``WeightedReward({"ocr": (ocr_reward, 1.0), "aesthetic": (aes, 0.5)})``."""

    name = "weighted"

    def __init__(self, parts: Mapping[str, tuple[Reward, float]], normalize: bool = False, eps: float = 1e-6):
        if not parts:
            raise ValueError("WeightedReward needs at least one (reward, weight) part.")
        for key, part in parts.items():
            if not (isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], Reward)):
                raise TypeError(
                    f"WeightedReward part {key!r} must be a (Reward, weight) tuple, got {part!r}."
                )
        super().__init__(device=next(iter(parts.values()))[0].device)
        self.parts = {key: (reward, float(weight)) for key, (reward, weight) in parts.items()}
        self.normalize = normalize
        self.eps = eps
        self.differentiable = all(r.differentiable for r, _ in self.parts.values())
        self.groupwise = any(r.groupwise for r, _ in self.parts.values())

    @property
    def weights(self) -> dict[str, float]:
        return {key: weight for key, (_, weight) in self.parts.items()}

    def to(self, device: str | torch.device) -> WeightedReward:
        for reward, _ in self.parts.values():
            reward.to(device)
        return self

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        group_ids: Tensor | Sequence[int] | None = None,
    ) -> RewardOutput:
        components: dict[str, Tensor] = {}
        details: dict[str, Any] = {}
        total = None
        for key, (reward, weight) in self.parts.items():
            out = reward(images, prompts, metadata, group_ids)
            components[key] = out.scores
            details.update({f"{key}.{k}": v for k, v in out.details.items()})
            part = out.scores
            if self.normalize:
                part = (part - part.mean()) / (part.std(unbiased=False) + self.eps)
            total = weight * part if total is None else total + weight * part
        return RewardOutput(total, components, details)
