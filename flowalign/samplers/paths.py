"""The forward (noising) paths and their conversions, one object per kind of model.

Every recipe that noises clean latents (DPO and InPO, DiffusionNFT, DRaFT-LV, the supervised control)
goes through the model's path (``model.path``) instead of writing the interpolation itself:

- :class:`FlowPath` (rectified flow, SD3/FLUX; Esser et al. 2024, Eq. 1-3): ``x = (1 - s) x0 + s eps`` at
  noise level ``s = sigma``, the model predicts the velocity ``v = eps - x0``, model time ``1000 s``.
- :class:`DiffusionPath` (DDPM/DDIM, SD/SDXL; Ho et al. 2020): ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``
  at level ``abar = alphas_cumprod[t]``, the model predicts ``eps`` or ``v = sqrt(abar) eps - sqrt(1 - abar)
  x0`` (Salimans & Ho 2022), model time ``t``.

Both write ``x = a x0 + b eps`` with ``(a, b) = coefficients(level)``; levels are per sample (``[B]``) or a
scalar. The step functions' conversions (:func:`~flowalign.samplers.steps.velocity_to_x0`,
:func:`~flowalign.samplers.steps.diffusion_to_eps_x0`) are the same formulas for a model output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from flowalign.samplers.steps import _per_sample, diffusion_to_eps_x0, velocity_to_eps, velocity_to_x0

__all__ = ["DiffusionPath", "FlowPath"]


@dataclass(frozen=True)
class FlowPath:
    """Rectified flow: level ``s`` (sigma), ``x = (1 - s) x0 + s eps``, target ``v = eps - x0``."""

    num_train_timesteps: int = 1000
    kind: ClassVar[str] = "flow"

    def coefficients(self, level: float | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        s = _per_sample(level, like)
        return 1 - s, s

    def noised(self, x0: Tensor, level: float | Tensor, eps: Tensor) -> Tensor:
        a, b = self.coefficients(level, x0)
        return a * x0 + b * eps

    def target(self, x0: Tensor, eps: Tensor, level: float | Tensor) -> Tensor:
        """What the model is trained to output at ``noised(x0, level, eps)``: the velocity."""
        return eps - x0

    def eps_of(self, x_t: Tensor, x0: Tensor, level: float | Tensor) -> Tensor:
        """The noise that takes ``x0`` to ``x_t`` at ``level``."""
        a, b = self.coefficients(level, x_t)
        return (x_t - a * x0) / b

    def timestep(self, level: Tensor) -> Tensor:
        """The model time of a level: ``s * num_train_timesteps``."""
        return level * self.num_train_timesteps

    def x0_from_output(self, output: Tensor, x_t: Tensor, level: float | Tensor) -> Tensor:
        return velocity_to_x0(output, x_t, level)

    def eps_from_output(self, output: Tensor, x_t: Tensor, level: float | Tensor) -> Tensor:
        return velocity_to_eps(output, x_t, level)


@dataclass(frozen=True)
class DiffusionPath:
    """DDPM: level ``abar``, ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``; target ``eps`` (``epsilon``) or ``v``
    (``v_prediction``). ``alphas_cumprod`` is the scheduler's training table (level of training time ``t``:
    ``alphas_cumprod[t]``)."""

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    kind: ClassVar[str] = "diffusion"

    def coefficients(self, level: float | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = _per_sample(level, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def level_at(self, t: Tensor) -> Tensor:
        """``alphas_cumprod[t]`` for integer training times ``t``."""
        return self.alphas_cumprod.to(t.device)[t]

    def noised(self, x0: Tensor, level: float | Tensor, eps: Tensor) -> Tensor:
        a, b = self.coefficients(level, x0)
        return a * x0 + b * eps

    def target(self, x0: Tensor, eps: Tensor, level: float | Tensor) -> Tensor:
        if self.prediction_type == "v_prediction":
            a, b = self.coefficients(level, x0)
            return a * eps - b * x0
        if self.prediction_type != "epsilon":
            raise ValueError(
                f"training targets are defined for epsilon and v_prediction models, got {self.prediction_type!r}."
            )
        return eps

    def eps_of(self, x_t: Tensor, x0: Tensor, level: float | Tensor) -> Tensor:
        a, b = self.coefficients(level, x_t)
        return (x_t - a * x0) / b

    def x0_from_output(self, output: Tensor, x_t: Tensor, level: float | Tensor) -> Tensor:
        return diffusion_to_eps_x0(output, x_t, level, self.prediction_type)[1]

    def eps_from_output(self, output: Tensor, x_t: Tensor, level: float | Tensor) -> Tensor:
        return diffusion_to_eps_x0(output, x_t, level, self.prediction_type)[0]
