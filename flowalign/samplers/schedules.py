"""Noise-level schedules: which sigmas (flow) or timesteps (diffusion) a sampling run visits.

Pure functions that reproduce what diffusers' schedulers compute in ``set_timesteps``, so that a
flowalign rollout visits exactly the noise levels of the stock pipelines:

- :func:`flow_schedule` — ``FlowMatchEulerDiscreteScheduler``: the static ``shift`` of SD3/SD3.5
  (``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``, Esser et al. 2024, Eq. 23) and the
  resolution-dependent ("dynamic") exponential/linear shift of FLUX, whose ``mu`` comes from
  :func:`dynamic_shift_mu`.
- :func:`diffusion_schedule` — ``DDIMScheduler``'s timestep spacings (leading, trailing, linspace) with
  the cumulative alphas of every visited timestep and of the final step.

The arithmetic (numpy dtypes, order of operations) mirrors diffusers on purpose: the faithfulness tests
compare against the stock pipelines at 1e-4 and the schedule tests at 1e-7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "check_levels",
    "diffusion_schedule",
    "dynamic_shift_mu",
    "flow_schedule",
    "scaled_linear_alphas_cumprod",
    "shift_sigmas",
]


@dataclass(frozen=True)
class Schedule:
    """The noise levels of an ``N``-step sampling run; step ``i`` moves from level ``i`` to ``i + 1``.

    Attributes:
        kind: ``"flow"`` (rectified flow, ``x_sigma = (1 - sigma) x0 + sigma eps``) or ``"diffusion"``
            (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``).
        timesteps: ``[N]`` float32, the time value given to the denoiser at each step
            (flow: ``sigma * num_train_timesteps``; diffusion: the integer DDPM timestep).
        sigmas: ``[N + 1]`` float32, flow noise levels, decreasing, ending at 0. None for diffusion.
        alphas_cumprod: ``[N + 1]`` float32, ``abar`` at each visited timestep followed by the final
            ``abar`` the last step lands on. None for flow.
    """

    kind: Literal["flow", "diffusion"]
    timesteps: Tensor
    sigmas: Tensor | None = None
    alphas_cumprod: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.timesteps.shape[0]
        levels = self.sigmas if self.kind == "flow" else self.alphas_cumprod
        if levels is None or levels.shape != (n + 1,):
            name = "sigmas" if self.kind == "flow" else "alphas_cumprod"
            raise ValueError(f"a {self.kind} schedule with {n} timesteps needs {name} of shape ({n + 1},).")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Schedule(self.kind, move(self.timesteps), move(self.sigmas), move(self.alphas_cumprod))


def shift_sigmas(sigmas: np.ndarray | Tensor, shift: float) -> np.ndarray | Tensor:
    """SD3's static timestep shift ``shift * s / (1 + (shift - 1) * s)`` (Esser et al. 2024, Eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift: ``mu`` linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def _time_shift(mu: float, sigmas: np.ndarray, kind: str) -> np.ndarray:
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** 1.0)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}.")


def check_levels(
    levels: Sequence[float], num_steps: int, kind: str, num_train_timesteps: int = 1000
) -> list[float] | list[int]:
    """Explicit noise levels for ``num_steps`` sampling steps, checked; ``ValueError`` says what is wrong.

    Flow models take ``sigmas``: ``N`` numbers in ``(0, 1]``, strictly decreasing, as the stock pipelines'
    ``sigmas=`` argument (before the scheduler's shift). Diffusion models take ``timesteps``: ``N``
    integers in ``[0, num_train_timesteps)``, strictly decreasing.
    """
    name = "sigmas" if kind == "flow" else "timesteps"
    values = list(levels)
    if len(values) != num_steps:
        raise ValueError(f"{num_steps} sampling steps need {num_steps} {name}, got {len(values)}: {values}.")
    if kind == "flow":
        if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
            raise ValueError(f"sigmas must lie in (0, 1], got {values}.")
    elif not all(float(v).is_integer() and 0 <= v < num_train_timesteps for v in values):
        raise ValueError(f"timesteps must be integers in [0, {num_train_timesteps}), got {values}.")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing (noisiest first), got {values}.")
    return [float(v) for v in values] if kind == "flow" else [int(v) for v in values]


def flow_schedule(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    num_train_timesteps: int = 1000,
    sigmas: np.ndarray | list[float] | None = None,
    shift_terminal: float | None = None,
) -> Schedule:
    """The sigmas ``FlowMatchEulerDiscreteScheduler.set_timesteps`` produces.

    Args:
        num_steps: number of sampling steps ``N``.
        shift: static shift (SD3: 3.0). Ignored when ``mu`` is given.
        mu: dynamic shift exponent (FLUX: :func:`dynamic_shift_mu` of the image token count).
        time_shift_type: the dynamic shift's form, as in the scheduler config.
        num_train_timesteps: the scheduler's training horizon (timesteps = sigma * this).
        sigmas: explicit unshifted sigmas (the FLUX pipeline passes ``linspace(1, 1/N, N)``); default
            is the scheduler's own ``linspace`` between its shifted training extremes.
        shift_terminal: after shifting, stretch the schedule so that its last sigma is this value (the
            scheduler's ``stretch_shift_to_terminal``: ``1 - s`` scaled by ``(1 - terminal) / (1 - s_N)``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if sigmas is None:
        # The scheduler's training sigmas (computed in float32 torch) give sigma_max/min; with a static
        # shift they are already shifted, so the default schedule is shifted twice at the low end.
        train = torch.from_numpy(
            np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        train = train / num_train_timesteps
        if mu is None:
            train = shift_sigmas(train, shift)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        levels = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        levels = levels / num_train_timesteps
    else:
        levels = np.array(sigmas).astype(np.float32)
        if levels.shape != (num_steps,):
            raise ValueError(f"expected {num_steps} sigmas, got shape {levels.shape}.")
        check_levels(levels.tolist(), num_steps, "flow")
    levels = _time_shift(mu, levels, time_shift_type) if mu is not None else shift_sigmas(levels, shift)
    if shift_terminal:
        one_minus = 1 - np.asarray(levels)
        levels = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    sigma = torch.from_numpy(np.asarray(levels)).to(torch.float32)
    timesteps = sigma * num_train_timesteps
    return Schedule("flow", timesteps, sigmas=torch.cat([sigma, torch.zeros(1)]))


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> Tensor:
    """``abar_t`` of the DDPM beta schedules used by Stable Diffusion (``scaled_linear``) and ``linear``."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(
            f"beta_schedule {beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'."
        )
    return torch.cumprod(1.0 - betas, dim=0)


def diffusion_schedule(
    num_steps: int,
    alphas_cumprod: Tensor,
    *,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    timesteps: Sequence[int] | None = None,
) -> Schedule:
    """The timesteps of ``DDIMScheduler.set_timesteps`` and the ``abar`` each DDIM step moves between.

    DDIM's previous timestep is ``t - num_train_timesteps // N`` (Song et al. 2021, Eq. 12); when it is
    negative the final ``abar`` is 1 (``set_alpha_to_one``) or ``abar_0``.

    ``timesteps``: explicit timesteps instead (``N`` integers, strictly decreasing, in
    ``[0, num_train_timesteps)``; DMD2's 4-step SDXL student: 999, 749, 499, 249), as the stock pipelines'
    ``timesteps=`` argument takes them. Each DDIM step lands on the next one and the last on ``abar = 1``,
    which is what ``EulerDiscreteScheduler`` (its final sigma 0) computes with the same timesteps:
    deterministic Euler in ``sigma = sqrt((1 - abar) / abar)`` is DDIM.
    """
    num_train = alphas_cumprod.shape[0]
    if timesteps is not None:
        t = torch.as_tensor(check_levels(timesteps, num_steps, "diffusion", num_train), dtype=torch.long)
        levels = torch.cat([alphas_cumprod[t], torch.ones(1)])
        return Schedule("diffusion", t.to(torch.float32), alphas_cumprod=levels.to(torch.float32))
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}.")
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = num_train // num_steps
        timesteps = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ratio = num_train / num_steps
        timesteps = np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(
            f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}."
        )
    t = torch.from_numpy(timesteps)
    prev = t - num_train // num_steps
    final = torch.tensor(1.0) if set_alpha_to_one else alphas_cumprod[0]
    abar = alphas_cumprod[t]
    abar_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    levels = torch.cat([abar, abar_prev[-1:]])
    if not torch.equal(abar_prev[:-1], abar[1:]):
        raise ValueError(
            "this timestep spacing visits timesteps that DDIM's fixed stride does not connect; "
            "use timestep_spacing='leading' or 'trailing' with num_train_timesteps divisible by num_steps."
        )
    return Schedule("diffusion", t.to(torch.float32), alphas_cumprod=levels.to(torch.float32))
