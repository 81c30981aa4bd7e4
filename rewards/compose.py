"""A weighted combination of rewards is itself a reward and keeps every part's scores.

``scores = sum_i w_i * f_i(r_i)`` where ``f_i`` is the identity or, for the parts selected by ``normalize``,
the z-score ``(r_i - mean) / (std + eps)`` (population std) computed over the whole batch
(``normalize_within="batch"``) or within each group of samples of one prompt (``"group"``: the
``group_ids`` given to the call, else equal prompts; Flow-GRPO's per-reward, per-prompt normalization
before the weighted sum). ``RewardOutput.components`` always holds each part's *raw* scores, so an
algorithm can instead normalize advantages per reward and weight them itself.

The combination is differentiable when every part is; if only some are, gradients still flow through the
differentiable parts (the others are computed without gradients).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardInputError, RewardOutput, _groups

__all__ = ["WeightedReward", "parse_reward_spec"]

_WITHIN = ("batch", "group")


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """``"name=weight"`` -> ``(name, weight)``; a bare ``"name"`` has weight 1."""
    name, sep, weight = spec.rpartition("=")
    if not sep:
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(
            f"reward spec {spec!r} must look like NAME or NAME=WEIGHT with a number weight."
        ) from None
    _check_weight(name, value, f"reward spec {spec!r}")
    return name, value


def _check_weight(name: str, weight: float, where: str) -> None:
    if not math.isfinite(weight) or weight == 0:
        raise ValueError(
            f"{where}: the weight of {name!r} must be a finite nonzero number, got {weight}; a zero weight "
            "would score nothing (leave the reward out), NaN or inf would poison every total."
        )


class WeightedReward(Reward):
    """``WeightedReward({"ocr": (ocr_reward, 1.0), "aesthetic": (aes, 0.5)}, normalize=True)``.

    Args:
        parts: name -> (reward, weight).
        normalize: False, True (every part) or the names of the parts to z-score before weighting.
        normalize_within: ``"batch"`` or ``"group"`` (see the module docstring).
        eps: added to the std.
    """

    name = "weighted"

    def __init__(
        self,
        parts: Mapping[str, tuple[Reward, float]],
        normalize: bool | Collection[str] = False,
        eps: float = 1e-6,
        normalize_within: str = "batch",
    ):
        if not parts:
            raise ValueError("WeightedReward needs at least one (reward, weight) part.")
        for key, part in parts.items():
            if not (isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], Reward)):
                raise TypeError(
                    f"WeightedReward part {key!r} must be a (Reward, weight) tuple, got {part!r}."
                )
        for key, (_, weight) in parts.items():
            _check_weight(key, float(weight), "WeightedReward")
        super().__init__(device=next(iter(parts.values()))[0].device)
        self.parts = {key: (reward, float(weight)) for key, (reward, weight) in parts.items()}
        if isinstance(normalize, bool):
            self.normalized = set(self.parts) if normalize else set()
        else:
            unknown = set(normalize) - set(self.parts)
            if unknown:
                raise ValueError(
                    f"normalize names unknown parts {sorted(unknown)}; the parts are {sorted(self.parts)}."
                )
            self.normalized = set(normalize)
        if normalize_within not in _WITHIN:
            raise ValueError(f"normalize_within must be one of {_WITHIN}, got {normalize_within!r}.")
        self.normalize = bool(self.normalized)
        self.normalize_within = normalize_within
        self.eps = eps
        self.differentiable = all(r.differentiable for r, _ in self.parts.values())
        self.groupwise = any(r.groupwise for r, _ in self.parts.values())

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[str],
        reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        allow_code: bool = False,
        **options: Any,
    ) -> WeightedReward:
        """Build from ``["ocr=1", "aesthetic=0.5"]``; ``reward_kwargs[name]`` go to that reward's constructor."""
        from rewards.registry import load_reward

        reward_kwargs = dict(reward_kwargs or {})
        parsed = [parse_reward_spec(s) for s in specs]
        names = [n for n, _ in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"reward(s) {duplicates} given more than once; give each reward once with its weight."
            )
        unused = set(reward_kwargs) - set(names)
        if unused:
            raise ValueError(f"arguments given for reward(s) {sorted(unused)} that are not among {names}.")
        parts = {
            name: (load_reward(name, allow_code=allow_code, **dict(reward_kwargs.get(name, {}))), weight)
            for name, weight in parsed
        }
        return cls(parts, **options)

    @property
    def weights(self) -> dict[str, float]:
        return {key: weight for key, (_, weight) in self.parts.items()}

    def to(self, device: str | torch.device) -> WeightedReward:
        self.device = torch.device(device)
        for reward, _ in self.parts.values():
            reward.to(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [m for reward, _ in self.parts.values() for m in reward.modules()]

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        group_ids: Tensor | Sequence[int] | None = None,
    ) -> RewardOutput:
        components: dict[str, Tensor] = {}
        details: dict[str, Any] = {}
        total: Tensor | None = None
        groups = None
        for key, (reward, weight) in self.parts.items():
            out = reward(images, prompts, metadata, group_ids)
            components[key] = out.scores
            details.update({f"{key}.{k}": v for k, v in out.details.items()})
            for sub, value in out.components.items():
                details[f"{key}.{sub}"] = value
            part = out.scores
            if key in self.normalized:
                if self.normalize_within == "group":
                    if groups is None:
                        groups = _groups(list(prompts), group_ids, len(part))
                    part = _zscore_groups(part, groups, self.eps)
                else:
                    part = _zscore(part, self.eps)
            total = weight * part if total is None else total + weight * part
        if total is None:  # pragma: no cover - parts is never empty
            raise RewardInputError("WeightedReward has no parts.")
        return RewardOutput(total, components, details)


def _zscore(x: Tensor, eps: float) -> Tensor:
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def _zscore_groups(x: Tensor, groups: list[list[int]], eps: float) -> Tensor:
    out = torch.empty_like(x)
    for idx in groups:
        index = torch.tensor(idx, device=x.device)
        out = out.index_copy(0, index, _zscore(x[index], eps))
    return out
