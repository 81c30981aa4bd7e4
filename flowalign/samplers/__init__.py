"""Schedules, pure step functions and the rollout loop."""

from flowalign.samplers.generate import chunks, generate, seeded_generators
from flowalign.samplers.plan import SamplingPlan, grad_window
from flowalign.samplers.rollout import Denoiser, Rollout, denoise_step, rollout
from flowalign.samplers.schedules import (
    Schedule,
    check_levels,
    diffusion_schedule,
    dynamic_shift_mu,
    flow_schedule,
    scaled_linear_alphas_cumprod,
    shift_sigmas,
)
from flowalign.samplers.steps import (
    FLOW_SDE_DYNAMICS,
    StepOutput,
    ddim_step,
    diffusion_to_eps_x0,
    flow_ode_step,
    flow_sde_step,
    gaussian_log_prob,
    velocity_to_eps,
    velocity_to_x0,
)

__all__ = [
    "FLOW_SDE_DYNAMICS",
    "Denoiser",
    "Rollout",
    "SamplingPlan",
    "Schedule",
    "StepOutput",
    "check_levels",
    "chunks",
    "ddim_step",
    "denoise_step",
    "diffusion_schedule",
    "diffusion_to_eps_x0",
    "dynamic_shift_mu",
    "flow_ode_step",
    "flow_schedule",
    "flow_sde_step",
    "gaussian_log_prob",
    "generate",
    "grad_window",
    "rollout",
    "scaled_linear_alphas_cumprod",
    "seeded_generators",
    "shift_sigmas",
    "velocity_to_eps",
    "velocity_to_x0",
]
