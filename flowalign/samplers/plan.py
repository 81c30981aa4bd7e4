"""Sampling plans: per step, ODE or SDE, gradients or not, checkpointed or not.

One plan type serves every algorithm:

- Flow-GRPO samples every step with the SDE; Flow-GRPO-Fast and MixGRPO use a window of SDE steps
  and the ODE elsewhere (:meth:`SamplingPlan.build` with ``sde=(start, size)``).
- Reward backprop differentiates a window of steps: all (full backprop), the last ``K`` (DRaFT-K),
  a random contiguous last-``K`` drawn per rollout (AlignProp), or one mid step whose ``x0`` prediction
  is the output (ReFL, ``stop_after``).
- Any differentiated step may be checkpointed: its model call is recomputed during backward.

Gradient windows are contiguous and reach the output: they end at the last step, or at
``stop_after``. A window that ended earlier would have its gradient cut by the no-grad steps after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from flowalign.samplers.steps import FLOW_SDE_DYNAMICS

__all__ = ["SamplingPlan", "grad_window"]

_DYNAMICS = (*FLOW_SDE_DYNAMICS, "ddim")


def _window(num_steps: int, spec, what: str) -> tuple[bool, ...]:
    """``spec``: None/"none" (no step), "all" (every step), or ``(start, size)``."""
    if spec is None or spec == "none":
        return (False,) * num_steps
    if spec == "all":
        return (True,) * num_steps
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 2:
        start, size = (int(v) for v in spec)
        if start < 0 or size < 0 or start + size > num_steps:
            raise ValueError(f"{what} window (start={start}, size={size}) does not fit in {num_steps} steps.")
        return tuple(start <= i < start + size for i in range(num_steps))
    raise ValueError(f"{what} must be 'all', 'none' or (start, size), got {spec!r}.")


def _device(generator: torch.Generator | None) -> torch.device | None:
    """Where a draw from ``generator`` must be made (a CUDA generator draws on its GPU)."""
    return None if generator is None else generator.device


def grad_window(
    num_steps: int,
    mode: str = "none",
    k: int | None = None,
    k_min: int = 1,
    step: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[tuple[bool, ...], int | None]:
    """``(grad mask, stop_after)`` for a named truncation scheme.

    Args:
        mode: ``"none"``; ``"all"`` (full backprop); ``"last_k"`` (DRaFT-K, Clark et al. 2024: the last
            ``k`` steps); ``"random_k"`` (AlignProp, Prabhudesai et al. 2023: ``K ~ U{k_min..k}`` drawn
            per rollout, gradients through the last ``K`` steps); ``"single"`` (ReFL, Xu et al. 2023: no
            gradient down to step ``step`` — drawn uniformly from ``[k_min, k)`` if None — one step with
            gradient, output its ``x0`` prediction).
    """
    if mode == "none":
        return (False,) * num_steps, None
    if mode == "all":
        return (True,) * num_steps, None
    if mode in ("last_k", "random_k"):
        if k is None or not 1 <= k <= num_steps:
            raise ValueError(f"grad mode {mode!r} needs 1 <= k <= {num_steps}, got k={k}.")
        if mode == "random_k":
            if not 1 <= k_min <= k:
                raise ValueError(f"random_k needs 1 <= k_min <= k, got k_min={k_min}, k={k}.")
            k = int(torch.randint(k_min, k + 1, (1,), generator=generator, device=_device(generator)).item())
        return tuple(i >= num_steps - k for i in range(num_steps)), None
    if mode == "single":
        if step is None:
            lo, hi = k_min, (k if k is not None else num_steps)
            if not 0 <= lo < hi <= num_steps:
                raise ValueError(f"single-step range [{lo}, {hi}) is empty or outside {num_steps} steps.")
            step = int(torch.randint(lo, hi, (1,), generator=generator, device=_device(generator)).item())
        if not 0 <= step < num_steps:
            raise ValueError(f"single grad step {step} is outside [0, {num_steps}).")
        return tuple(i == step for i in range(num_steps)), step
    raise ValueError(f"unknown grad mode {mode!r}; choose none, all, last_k, random_k or single.")


@dataclass(frozen=True)
class SamplingPlan:
    """What each of the ``N`` steps of a rollout does.

    Attributes:
        sde: ``N`` flags; step ``i`` draws from the stochastic transition (and records its log-prob)
            instead of the deterministic one.
        grad: ``N`` flags; gradients flow through step ``i`` (model call and step math). Contiguous,
            ending at the last step or at ``stop_after``.
        checkpoint: ``N`` flags; step ``i``'s model call is recomputed in backward (only matters where
            ``grad`` is set).
        stop_after: if set, the rollout ends after this step and outputs its ``x0`` prediction (ReFL).
        dynamics: SDE of flow models (``flow_grpo``, ``cps``, ``dance``) or ``ddim`` for diffusion models.
        noise_level: the dynamics' noise scale (``a`` of Flow-GRPO/CPS, DanceGRPO's ``eta``, DDIM's ``eta``).
        reduction: log-prob reduction over latent elements, ``mean`` or ``sum`` (see ``steps``).
    """

    sde: tuple[bool, ...]
    grad: tuple[bool, ...]
    checkpoint: tuple[bool, ...]
    stop_after: int | None = None
    dynamics: str = "flow_grpo"
    noise_level: float = 0.7
    reduction: str = "mean"

    def __post_init__(self) -> None:
        n = len(self.sde)
        if n < 1:
            raise ValueError("a sampling plan needs at least one step.")
        if len(self.grad) != n or len(self.checkpoint) != n:
            raise ValueError(
                f"plan masks disagree on the number of steps: sde={n}, grad={len(self.grad)}, "
                f"checkpoint={len(self.checkpoint)}."
            )
        if self.dynamics not in _DYNAMICS:
            raise ValueError(f"unknown dynamics {self.dynamics!r}; choose one of {_DYNAMICS}.")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}.")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}.")
        end = n - 1 if self.stop_after is None else self.stop_after
        if not 0 <= end < n:
            raise ValueError(f"stop_after={self.stop_after} is outside [0, {n}).")
        steps = [i for i, g in enumerate(self.grad) if g]
        if steps and (steps != list(range(steps[0], steps[-1] + 1)) or steps[-1] != end):
            raise ValueError(
                f"gradient steps {steps} must be contiguous and end at step {end} (the output); a window that "
                "ends earlier would have its gradient cut by the steps after it."
            )

    @property
    def num_steps(self) -> int:
        return len(self.sde)

    @property
    def last_step(self) -> int:
        return self.num_steps - 1 if self.stop_after is None else self.stop_after

    @classmethod
    def build(
        cls,
        num_steps: int,
        *,
        sde="all",
        grad: str = "none",
        k: int | None = None,
        k_min: int = 1,
        grad_step: int | None = None,
        checkpoint: bool = False,
        dynamics: str = "flow_grpo",
        noise_level: float = 0.7,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> SamplingPlan:
        """A plan from named parts: ``sde`` is ``"all"``, ``"none"`` or a ``(start, size)`` window;
        ``grad``/``k``/``k_min``/``grad_step`` as in :func:`grad_window`; ``checkpoint`` applies to every
        differentiated step. For CPS the step that lands on sigma = 0 is deterministic; make it ODE
        with an ``sde`` window that excludes it."""
        grad_mask, stop_after = grad_window(num_steps, grad, k, k_min, grad_step, generator)
        return cls(
            sde=_window(num_steps, sde, "sde"),
            grad=grad_mask,
            checkpoint=tuple(g and checkpoint for g in grad_mask),
            stop_after=stop_after,
            dynamics=dynamics,
            noise_level=noise_level,
            reduction=reduction,
        )

    @classmethod
    def ode(cls, num_steps: int) -> SamplingPlan:
        """Deterministic sampling, no gradients: the stock pipelines' sampler."""
        return cls.build(num_steps, sde="none")

    def with_checkpointing(self, enabled: bool = True) -> SamplingPlan:
        return replace(self, checkpoint=tuple(g and enabled for g in self.grad))
