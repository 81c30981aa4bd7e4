"""Analytic tests of schedules, step functions, log-probs and the rollout's gradient windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analytic import GaussianMixture, MixtureEpsModel, MixtureFlowModel
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from flowalign.samplers import (
    SamplingPlan,
    ddim_step,
    denoise_step,
    diffusion_schedule,
    dynamic_shift_mu,
    flow_schedule,
    flow_sde_step,
    rollout,
    scaled_linear_alphas_cumprod,
)

MIXTURE = GaussianMixture(
    weights=[0.2, 0.5, 0.3], means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], stds=[0.4, 0.5, 0.3]
)
N_SAMPLES = 6000


# ---------------------------------------------------------------- schedules match diffusers


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10, 28])
def test_static_shift_schedule_matches_diffusers(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = flow_schedule(steps, shift=shift)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.timesteps, scheduler.timesteps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_dynamic_shift_schedule_matches_flux_pipeline(seq_len):
    steps = 12
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    mu = dynamic_shift_mu(seq_len, 256, 4096, 0.5, 1.15)
    unshifted = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes
    scheduler.set_timesteps(steps, sigmas=unshifted, mu=mu)
    ours = flow_schedule(steps, mu=mu, sigmas=unshifted)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.timesteps, scheduler.timesteps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0)])
def test_ddim_schedule_matches_diffusers(spacing, offset):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=False, clip_sample=False,
    )  # fmt: skip
    scheduler.set_timesteps(25)
    abar = scaled_linear_alphas_cumprod()
    torch.testing.assert_close(abar, scheduler.alphas_cumprod)
    ours = diffusion_schedule(25, abar, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=False)
    assert ours.timesteps.long().tolist() == scheduler.timesteps.tolist()
    prev = scheduler.timesteps - 1000 // 25
    expected_prev = torch.where(
        prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)], scheduler.final_alpha_cumprod
    )
    torch.testing.assert_close(ours.alphas_cumprod[1:], expected_prev)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_explicit_sigmas_are_shifted_as_the_stock_scheduler_shifts_them(shift):
    """``flow_schedule(sigmas=...)`` is ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)``: what
    the stock pipelines' ``sigmas=`` argument gives (a few-step student's own levels)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    given = [1.0, 0.75, 0.5, 0.25]
    scheduler.set_timesteps(sigmas=given)
    ours = flow_schedule(4, shift=shift, sigmas=given)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.timesteps, scheduler.timesteps, rtol=0, atol=1e-4)


def test_explicit_timesteps_step_ddim_between_them_and_land_on_abar_one():
    """DMD2's 4-step SDXL student visits 999, 749, 499, 249 and its last step lands on the clean image."""
    abar = scaled_linear_alphas_cumprod()
    ours = diffusion_schedule(4, abar, timesteps=[999, 749, 499, 249])
    assert ours.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]
    expected = torch.cat([abar[[999, 749, 499, 249]], torch.ones(1)])
    assert torch.equal(ours.alphas_cumprod, expected)
    # the same timesteps as DDIM's trailing spacing, except that the last step lands on 1, not abar[-1]
    trailing = diffusion_schedule(4, abar, timestep_spacing="trailing")
    assert torch.equal(trailing.timesteps, ours.timesteps)
    for bad, message in (
        ([999, 999], "strictly decreasing"),
        ([1000, 10], r"\[0, 1000\)"),
        ([999], "need 2"),
    ):
        with pytest.raises(ValueError, match=message):
            diffusion_schedule(2, abar, timesteps=bad)


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        flow_schedule(0)
    with pytest.raises(ValueError, match="expected 5 sigmas"):
        flow_schedule(5, sigmas=[1.0, 0.5])


# ---------------------------------------------------------------- marginals of every sampler


def _check_marginals(samples: torch.Tensor, label: str, mean_tol=0.06, cov_tol=0.12, weight_tol=0.025):
    mean, cov = MIXTURE.moments()
    samples = samples.double()
    assert torch.isfinite(samples).all(), label
    got_mean, got_cov = samples.mean(0), torch.cov(samples.T)
    assert (got_mean - mean).abs().max() < mean_tol, f"{label}: mean {got_mean} vs {mean}"
    assert (got_cov - cov).abs().max() < cov_tol, f"{label}: cov {got_cov} vs {cov}"
    weights = MIXTURE.mode_weights(samples)
    assert (weights - MIXTURE.weights).abs().max() < weight_tol, f"{label}: mode weights {weights}"


def test_mixture_reference_samples_pass_the_marginal_check():
    _check_marginals(MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(0)).float(), "exact samples")


@pytest.mark.parametrize(
    "dynamics,noise_level,sde",
    [("ode", 0.0, "none"), ("flow_grpo", 0.7, "all"), ("cps", 0.3, (0, 59)), ("dance", 0.5, "all")],
)
def test_flow_samplers_reproduce_mixture_marginals(dynamics, noise_level, sde):
    """CPS is tested at a = 0.3: its per-step noise std is a fixed fraction of sigma_next whatever the step
    size, so with the exact posterior-mean x0 it contracts the variance (measured at a = 0.7: covariance off
    by 0.18-0.19 at 60, 200 and 600 steps alike; at a = 0.3: 0.04-0.09), unlike the two SDEs."""
    steps = 60
    schedule = flow_schedule(steps, shift=3.0)
    plan = SamplingPlan.build(
        steps, sde=sde, dynamics="flow_grpo" if dynamics == "ode" else dynamics, noise_level=noise_level
    )
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(N_SAMPLES, 2, generator=gen)
    out = rollout(MixtureFlowModel(MIXTURE), None, x_T, schedule, plan, generator=gen, decode=False)
    _check_marginals(out.final, dynamics)
    assert out.log_probs.shape == (N_SAMPLES, sum(plan.sde))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_mixture_marginals(eta):
    steps = 100
    abar = scaled_linear_alphas_cumprod(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    schedule = diffusion_schedule(steps, abar, timestep_spacing="trailing")
    # The last step lands on abar = 1 (set_alpha_to_one) and has no noise: it is an ODE step.
    plan = SamplingPlan.build(
        steps, sde=(0, steps - 1) if eta > 0 else "none", dynamics="ddim", noise_level=eta
    )
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(N_SAMPLES, 2, generator=gen)
    out = rollout(MixtureEpsModel(MIXTURE, abar), None, x_T, schedule, plan, generator=gen, decode=False)
    _check_marginals(out.final, f"ddim eta={eta}")


def test_flow_grpo_first_step_rule_matters():
    """The reference's first step (sigma = 1 uses sigmas[1] in 1 - sigma) is what keeps the marginals;
    substituting a value close to 1 instead inflates the first step's noise and visibly shifts them."""
    steps = 60
    schedule = flow_schedule(steps, shift=3.0)
    model = MixtureFlowModel(MIXTURE)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, 2, generator=gen)
    v = model.predict(x, schedule.timesteps[:1].expand(N_SAMPLES))
    wrong = flow_sde_step(v, x, 1.0, schedule.sigmas[1], sigma_at_one=0.9999, generator=gen)
    plan = SamplingPlan.build(steps, sde="all")
    rest = SamplingPlan(sde=plan.sde, grad=plan.grad, checkpoint=plan.checkpoint)
    out = rollout(
        model,
        None,
        wrong.prev_sample,
        _drop_first(schedule),
        _drop_first_plan(rest),
        generator=gen,
        decode=False,
    )
    weights = MIXTURE.mode_weights(out.final)
    mean, cov = MIXTURE.moments()
    assert (torch.cov(out.final.double().T) - cov).abs().max() > 0.5 or (
        weights - MIXTURE.weights
    ).abs().max() > 0.05


def _drop_first(schedule):
    from flowalign.samplers import Schedule

    return Schedule("flow", schedule.timesteps[1:], sigmas=schedule.sigmas[1:])


def _drop_first_plan(plan):
    return SamplingPlan(sde=plan.sde[1:], grad=plan.grad[1:], checkpoint=plan.checkpoint[1:])


# ---------------------------------------------------------------- log-probs


@pytest.mark.parametrize("dynamics", ["flow_grpo", "cps", "dance"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flow_sde_log_prob_equals_normal_density(dynamics, reduction):
    gen = torch.Generator().manual_seed(4)
    x, v = torch.randn(5, 4, 3, 3, generator=gen), torch.randn(5, 4, 3, 3, generator=gen)
    sigma, sigma_next = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.1]), torch.tensor([0.95, 0.8, 0.4, 0.2, 0.05])
    out = flow_sde_step(
        v, x, sigma, sigma_next, dynamics=dynamics, sigma_at_one=0.95, generator=gen, reduction=reduction
    )
    std = out.std.expand_as(out.mean)
    density = torch.distributions.Normal(out.mean, std).log_prob(out.prev_sample).flatten(1)
    expected = density.mean(1) if reduction == "mean" else density.sum(1)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # The same function scores a given transition: identical numbers, nothing drawn.
    again = flow_sde_step(
        v,
        x,
        sigma,
        sigma_next,
        dynamics=dynamics,
        sigma_at_one=0.95,
        prev_sample=out.prev_sample,
        reduction=reduction,
    )
    assert torch.equal(again.log_prob, out.log_prob)


def test_flow_grpo_step_matches_reference_formula():
    """mean = x(1 + g^2 D/(2s)) + v(1 + g^2 (1-s)/(2s)) D, std = g sqrt(-D), g = a sqrt(s/(1-s))."""
    x, v = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.5, 0.25]])
    s, s_next, a = 0.6, 0.5, 0.7
    g2 = a**2 * s / (1 - s)
    d = s_next - s
    out = flow_sde_step(v, x, s, s_next, noise_level=a, noise=torch.zeros(1, 2))
    torch.testing.assert_close(out.mean, x * (1 + g2 * d / (2 * s)) + v * (1 + g2 * (1 - s) / (2 * s)) * d)
    torch.testing.assert_close(out.std.squeeze(), torch.tensor((g2 * -d) ** 0.5))


def test_ddim_log_prob_equals_normal_density():
    gen = torch.Generator().manual_seed(5)
    x, eps = torch.randn(4, 2, 5, generator=gen), torch.randn(4, 2, 5, generator=gen)
    out = ddim_step(eps, x, 0.3, 0.5, eta=1.0, generator=gen, reduction="sum")
    expected = (
        torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
        .log_prob(out.prev_sample)
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-4)


def test_deterministic_steps_have_no_log_prob():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="deterministic"):
        flow_sde_step(x, x, 0.5, 0.0, dynamics="cps", prev_sample=x)
    with pytest.raises(ValueError, match="eta = 0"):
        ddim_step(x, x, 0.3, 0.5, eta=0.0, prev_sample=x)


@pytest.mark.parametrize("dynamics", ["flow_grpo", "cps", "dance"])
def test_recomputed_log_probs_give_ratio_exactly_one(dynamics):
    steps = 8
    schedule = flow_schedule(steps, shift=3.0)
    plan = SamplingPlan.build(steps, sde=(0, steps - 1), dynamics=dynamics)
    model = MixtureFlowModel(MIXTURE)
    gen = torch.Generator().manual_seed(6)
    out = rollout(model, None, torch.randn(16, 2, generator=gen), schedule, plan, generator=gen, decode=False)
    for column, i in enumerate(out.sde_steps.tolist()):
        step = denoise_step(
            model, out.latents[:, i], i, None, schedule, plan, prev_sample=out.latents[:, i + 1]
        )
        assert torch.equal(torch.exp(step.log_prob - out.log_probs[:, column]), torch.ones(16))


# ---------------------------------------------------------------- gradient windows


class StepScaledModel(torch.nn.Module):
    """v = theta_i * x + b_i at step i: each step owns parameters, so a gradient's origin is visible."""

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, schedule):
        super().__init__()
        n = schedule.num_steps
        self.register_buffer("timesteps", schedule.timesteps.clone())
        self.theta = torch.nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.bias = torch.nn.Parameter(torch.linspace(-0.2, 0.2, n))

    def predict(self, x_t, timestep, cond=None, guidance=1.0):
        i = int((self.timesteps - timestep[0]).abs().argmin())
        return torch.tanh(self.theta[i] * x_t) + self.bias[i]

    def decode(self, latents):
        return latents


def _reward_grads(plan, schedule, model, x_T):
    model.zero_grad()
    out = rollout(model, None, x_T, schedule, plan, generator=torch.Generator().manual_seed(0), decode=False)
    (out.final**2).sum().backward()
    return model.theta.grad.clone(), model.bias.grad.clone()


@pytest.mark.parametrize("mode,k,step", [("last_k", 3, None), ("single", None, 4), ("all", None, None)])
def test_gradients_come_only_from_the_window(mode, k, step):
    steps = 8
    schedule = flow_schedule(steps, shift=3.0)
    model = StepScaledModel(schedule)
    x_T = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    plan = SamplingPlan.build(steps, sde="all", grad=mode, k=k, grad_step=step)
    theta_grad, bias_grad = _reward_grads(plan, schedule, model, x_T)
    inside = torch.tensor(plan.grad)
    assert (theta_grad[~inside] == 0).all() and (bias_grad[~inside] == 0).all()
    assert (theta_grad[inside] != 0).all()


def test_full_window_equals_untruncated_autograd():
    steps = 6
    schedule = flow_schedule(steps, shift=3.0)
    model = StepScaledModel(schedule)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    plan = SamplingPlan.build(steps, sde="all", grad="all")
    theta_grad, bias_grad = _reward_grads(plan, schedule, model, x_T)
    # The same trajectory written by hand with plain autograd: same noise, no truncation logic.
    model.zero_grad()
    gen, x = torch.Generator().manual_seed(0), x_T
    for i in range(steps):
        v = model.predict(x, schedule.timesteps[i : i + 1].expand(3))
        x = flow_sde_step(
            v,
            x,
            schedule.sigmas[i],
            schedule.sigmas[i + 1],
            sigma_at_one=float(schedule.sigmas[1]),
            generator=gen,
        ).prev_sample
    (x**2).sum().backward()
    torch.testing.assert_close(theta_grad, model.theta.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias_grad, model.bias.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,k", [("all", None), ("last_k", 2)])
def test_checkpointing_changes_no_gradient(mode, k):
    steps = 6
    schedule = flow_schedule(steps, shift=3.0)
    model = StepScaledModel(schedule)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    plain = SamplingPlan.build(steps, sde="all", grad=mode, k=k)
    grads = _reward_grads(plain, schedule, model, x_T)
    grads_ckpt = _reward_grads(plain.with_checkpointing(), schedule, model, x_T)
    for a, b in zip(grads, grads_ckpt):
        assert (a - b).abs().max() <= 1e-6


def test_gradient_reaches_initial_noise_for_noise_optimization():
    steps = 4
    schedule = flow_schedule(steps)
    model = StepScaledModel(schedule)
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).requires_grad_()
    out = rollout(model, None, x_T, schedule, SamplingPlan.build(steps, sde="none", grad="all"), decode=False)
    out.final.sum().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0


def test_random_k_draws_different_windows():
    gen = torch.Generator().manual_seed(0)
    sizes = {
        sum(SamplingPlan.build(10, grad="random_k", k=6, k_min=1, generator=gen).grad) for _ in range(50)
    }
    assert sizes == set(range(1, 7))


def test_single_step_plan_stops_and_outputs_x0():
    steps = 6
    schedule = flow_schedule(steps)
    model = MixtureFlowModel(MIXTURE)
    plan = SamplingPlan.build(steps, sde="none", grad="single", grad_step=2)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(5))
    out = rollout(model, None, x_T, schedule, plan, decode=False)
    assert out.latents.shape == (5, 4, 2)
    sigma = schedule.sigmas[2]
    expected = out.latents[:, 2] - sigma * model.predict(out.latents[:, 2], schedule.timesteps[2:3].expand(5))
    torch.testing.assert_close(out.final, expected)


def test_plan_validation_errors():
    with pytest.raises(ValueError, match="contiguous"):
        SamplingPlan(sde=(True,) * 4, grad=(True, False, True, True), checkpoint=(False,) * 4)
    with pytest.raises(ValueError, match="end at step 3"):
        SamplingPlan(sde=(True,) * 4, grad=(True, True, False, False), checkpoint=(False,) * 4)
    with pytest.raises(ValueError, match="unknown dynamics"):
        SamplingPlan.build(4, dynamics="euler_maruyama")
    with pytest.raises(ValueError, match="does not fit"):
        SamplingPlan.build(4, sde=(2, 5))
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        SamplingPlan.build(4, grad="last_k", k=9)
    schedule = flow_schedule(4)
    with pytest.raises(ValueError, match="the plan has 5 steps"):
        rollout(
            MixtureFlowModel(MIXTURE), None, torch.zeros(1, 2), schedule, SamplingPlan.ode(5), decode=False
        )
    with pytest.raises(ValueError, match="for diffusion models"):
        rollout(
            MixtureFlowModel(MIXTURE),
            None,
            torch.zeros(1, 2),
            schedule,
            SamplingPlan.build(4, dynamics="ddim"),
            decode=False,
        )
