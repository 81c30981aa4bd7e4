"""Deterministic inversion: walk a clean sample back up the noise levels of a schedule with the model.

- Flow models: the Euler step of the probability-flow ODE run backwards,
  ``x_{sigma_i} = x_{sigma_{i+1}} + (sigma_i - sigma_{i+1}) v(x_{sigma_{i+1}}, sigma_{i+1})``.
- Diffusion models: DDIM inversion (Song et al. 2021, Sec. 4.3; Mokady et al. 2023),
  ``x_{t_i} = sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps_hat`` with ``eps_hat, x0_hat`` predicted at the less noisy
  state. The clean end has no timestep of its own in the schedule, so the first inversion step queries the
  model at the schedule's last timestep (the usual approximation).

InPO (Lu et al. 2025) uses the inverted latents and the noise implied by them as DPO targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign.samplers.schedules import Schedule
from flowalign.samplers.steps import diffusion_to_eps_x0

__all__ = ["invert"]


@torch.no_grad()
def invert(
    model, x0: Tensor, cond, schedule: Schedule, *, guidance: float = 1.0, stop_index: int = 0
) -> Tensor:
    """``[B, N + 1, *S]`` states at every level of ``schedule`` (index ``N`` is ``x0``, index ``stop_index``
    the noisiest reached; levels below ``stop_index`` are left as zeros). The inversion runs from the clean
    end up to level ``stop_index``."""
    n = schedule.num_steps
    if not 0 <= stop_index < n:
        raise ValueError(f"stop_index must be in [0, {n}), got {stop_index}.")
    states = x0.new_zeros(x0.shape[0], n + 1, *x0.shape[1:])
    x = x0.float()
    states[:, n] = x
    batch = x.shape[0]
    for i in range(n - 1, stop_index - 1, -1):
        if schedule.kind == "flow":
            sigma_here, sigma_up = schedule.sigmas[i + 1], schedule.sigmas[i]
            num_train = schedule.timesteps[0] / schedule.sigmas[0]
            velocity = model.predict(x, (sigma_here * num_train).expand(batch), cond, guidance)
            x = x + (sigma_up - sigma_here) * velocity
        else:
            abar_here, abar_up = schedule.alphas_cumprod[i + 1], schedule.alphas_cumprod[i]
            timestep = schedule.timesteps[min(i + 1, n - 1)].expand(batch)
            output = model.predict(x, timestep, cond, guidance)
            eps, x0_hat = diffusion_to_eps_x0(output, x, abar_here, model.prediction_type)
            x = abar_up.sqrt() * x0_hat + (1 - abar_up).sqrt() * eps
        states[:, i] = x
    return states
