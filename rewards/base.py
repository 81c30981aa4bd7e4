"""The reward protocol: ``reward(images, prompts, metadata) -> RewardOutput``.

Every reward in this package, and every third-party reward registered under the ``flowalign.rewards``
entry-point group, is a :class:`Reward`. The base class owns what all rewards share — input validation,
no-grad for non-differentiable rewards, device placement and chunking into ``max_batch_size`` — so a
subclass only writes :meth:`Reward.score_batch`.

Images are float tensors in ``[0, 1]``: ``[B, 3, H, W]`` for images or ``[B, T, 3, H, W]`` for video.
Scores are float32 ``[B]``. A reward never corrects its input: out-of-range values, a wrong rank or a
prompt count that does not match the batch raise :class:`RewardInputError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Reward", "RewardInputError", "RewardOutput", "flatten_frames", "validate_images"]


class RewardInputError(ValueError):
    """Raised when a reward is called with images, prompts or metadata it cannot score."""


@dataclass
class RewardOutput:
    """What a reward returns for a batch of ``B`` samples.

    Attributes:
        scores: ``[B]`` float32, higher is better. Carries gradients to the images iff the reward is
            differentiable and gradients are enabled.
        components: for a combination of rewards, each part's own ``[B]`` scores by name (before
            weighting), so an algorithm can normalize advantages per reward. Empty for a single reward.
        details: free-form per-sample information (lists or tensors of length ``B``), e.g. the OCR text
            read or whether a face was found. Never used for optimization.
    """

    scores: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.scores.shape[0]


def validate_images(images: Tensor, where: str = "reward") -> None:
    """Check the image contract: float ``[B,3,H,W]`` or ``[B,T,3,H,W]`` with values in ``[0, 1]``."""
    if not isinstance(images, Tensor):
        raise RewardInputError(f"{where}: images must be a torch.Tensor, got {type(images).__name__}.")
    if not images.is_floating_point():
        raise RewardInputError(
            f"{where}: images must be a float tensor in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with `images.float() / 255`."
        )
    if images.ndim not in (4, 5) or images.shape[-3] != 3:
        raise RewardInputError(
            f"{where}: images must have shape [B, 3, H, W] or [B, T, 3, H, W], got {tuple(images.shape)}."
        )
    if images.numel():
        lo, hi = images.detach().aminmax()
        if lo < 0 or hi > 1 or not torch.isfinite(lo + hi):
            raise RewardInputError(
                f"{where}: image values must lie in [0, 1], found range [{lo.item():.4g}, {hi.item():.4g}]; "
                "images in [-1, 1] map to [0, 1] with `(x + 1) / 2`."
            )


class Reward:
    """Base class of all rewards.

    Class attributes a subclass sets:
        name: registry name, e.g. ``"compressibility"``.
        differentiable: gradients reach the input images through :meth:`score_batch`. When false the
            base class calls :meth:`score_batch` under ``torch.no_grad()``.
        groupwise: the reward compares the samples of one group (one prompt) with each other; it is
            called once per group with the group's samples, never with a mixed batch.

    Instance attributes:
        device: where :meth:`score_batch` runs; inputs are moved there and scores come back on the
            caller's device.
        dtype: the dtype of the reward's own weights (a model reward casts its network input to it);
            images keep their float dtype on the way in and scores always come back as float32.
        max_batch_size: pointwise rewards split larger batches into chunks of this size (a model reward's
            memory bound); the scores are the same as one call on the whole batch.

    A subclass may set ``differentiable`` per instance (e.g. the identity reward is differentiable with a
    torch embedder only); the instance value is what :meth:`__call__` honours.
    """

    name: str = "reward"
    differentiable: bool = False
    groupwise: bool = False

    def __init__(
        self,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        dtype: torch.dtype | str = torch.float32,
    ):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"{self.name}: max_batch_size must be an integer >= 1, got {max_batch_size!r}.")
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.dtype = _as_dtype(dtype, self.name)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        """Score one chunk (or one group, for a groupwise reward) already validated and on ``device``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch")

    def to(self, device: str | torch.device) -> Reward:
        """Move the reward (and every module of :meth:`modules`) to ``device``."""
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules this reward owns (frozen, in eval mode); :meth:`to` moves them."""
        return []

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        group_ids: Tensor | Sequence[int] | None = None,
    ) -> RewardOutput:
        """Score ``B`` samples.

        Args:
            images: ``[B,3,H,W]`` or ``[B,T,3,H,W]`` float in ``[0, 1]``.
            prompts: ``B`` prompts.
            metadata: ``B`` dicts (e.g. GenEval ``include``/``exclude`` clauses), or None.
            group_ids: ``[B]`` ints saying which samples belong to one group; only groupwise rewards use
                it. When None, samples with the same prompt form a group.
        """
        validate_images(images, self.name)
        batch = images.shape[0]
        prompts = list(prompts)
        if len(prompts) != batch:
            raise RewardInputError(
                f"{self.name}: got {batch} images but {len(prompts)} prompts; pass one prompt per image."
            )
        metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in range(batch)]
        if len(metadata) != batch:
            raise RewardInputError(
                f"{self.name}: got {batch} images but {len(metadata)} metadata entries; pass one per image."
            )
        out_device = images.device
        images = images.to(self.device)
        if self.groupwise:
            chunks = _groups(prompts, group_ids, batch)
        else:
            chunks = [
                list(range(s, min(s + self.max_batch_size, batch)))
                for s in range(0, batch, self.max_batch_size)
            ]
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            outputs = [
                (idx, self.score_batch(images[idx], [prompts[i] for i in idx], [metadata[i] for i in idx]))
                for idx in chunks
            ]
        return _merge(outputs, batch, out_device, self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable}, device={self.device})"


def _as_dtype(dtype: torch.dtype | str, name: str) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"{name}: unknown dtype {dtype!r}; use e.g. 'float32', 'float16' or 'bfloat16'.")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"{name}: dtype must be a floating-point dtype, got {dtype}.")
    return dtype


def _groups(prompts: list[str], group_ids, batch: int) -> list[list[int]]:
    if group_ids is None:
        keys: list[Any] = prompts
    else:
        keys = [int(g) for g in (group_ids.tolist() if isinstance(group_ids, Tensor) else group_ids)]
        if len(keys) != batch:
            raise RewardInputError(f"got {batch} images but {len(keys)} group ids.")
    order: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        order.setdefault(key, []).append(i)
    return list(order.values())


def _merge(outputs: list[tuple[list[int], RewardOutput]], batch: int, device, name: str) -> RewardOutput:
    """Scatter per-chunk outputs back into batch order."""
    if len(outputs) == 1 and outputs[0][0] == list(range(batch)):
        out = outputs[0][1]
        _check_scores(out.scores, batch, name)
        return RewardOutput(
            out.scores.to(device=device, dtype=torch.float32),
            {k: v.to(device=device, dtype=torch.float32) for k, v in out.components.items()},
            out.details,
        )
    index = torch.tensor([i for idx, _ in outputs for i in idx])
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(batch)
    for idx, out in outputs:
        _check_scores(out.scores, len(idx), name)

    def cat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.to(device=device, dtype=torch.float32) for t in tensors])[inverse.to(device)]

    scores = cat([o.scores for _, o in outputs])
    components = {k: cat([o.components[k] for _, o in outputs]) for k in outputs[0][1].components}
    details: dict[str, Any] = {}
    for key in outputs[0][1].details:
        parts = [o.details[key] for _, o in outputs]
        if isinstance(parts[0], Tensor):
            details[key] = torch.cat([p.to(device) for p in parts])[inverse.to(device)]
        else:
            flat = [x for p in parts for x in p]
            details[key] = [flat[j] for j in inverse.tolist()]
    return RewardOutput(scores, components, details)


def _check_scores(scores: Tensor, expected: int, name: str) -> None:
    if scores.shape != (expected,):
        raise RuntimeError(
            f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected ({expected},)."
        )


def flatten_frames(images: Tensor) -> tuple[Tensor, int]:
    """``[B,3,H,W]`` -> (itself, 1); video ``[B,T,3,H,W]`` -> (``[B*T,3,H,W]``, T). Per-frame scores ``[B*T]``
    go back to ``[B, T]`` with ``scores.view(B, T)``."""
    if images.ndim == 5:
        return images.flatten(0, 1), images.shape[1]
    return images, 1
