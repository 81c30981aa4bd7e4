"""Distribution-matching distillation losses (issue 16, first slice): reference values on hand-built
inputs, the reverse-KL gradient of two Gaussians in closed form, f-distill's weights."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.algorithms.dmd import (
    F_DIVERGENCES,
    dmd_gradient,
    dmd_loss,
    f_divergence_weight,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)


def test_dmd2_loss_has_the_reference_value_and_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64, requires_grad=True)
    real = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    fake = torch.tensor([[1.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    # sample 0: (fake - real) = [1, 0], mean |x - real| = 1.5; sample 1: [0, 2], mean |x - real| = 3
    expected = torch.tensor([[2 / 3, 0.0], [0.0, 2 / 3]], dtype=torch.float64)
    assert torch.allclose(dmd_gradient(x, real, fake), expected)
    assert torch.equal(dmd_gradient(x, real, fake, normalize=False), fake - real)
    loss = dmd_loss(x, real, fake)
    assert loss.item() == pytest.approx(1 / 9, rel=1e-12)  # 0.5 * mean(grad^2) = 0.5 * (8/9) / 4
    loss.backward()
    assert torch.allclose(x.grad, expected / 4)  # d L / d x = grad / numel


def test_dmd_gradient_vanishes_when_the_student_matches_the_teacher():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    same = torch.randn(4, 3, 8, 8)
    loss = dmd_loss(x, same, same.clone())
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    # A zero distance to the teacher's prediction is 0, not NaN (DMD2's nan_to_num).
    assert torch.equal(dmd_gradient(same, same, same + 1), torch.zeros_like(same))


def _x0_prediction(x_t: torch.Tensor, t: float, mean: float, std: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, std^2) and x_t = (1 - t) x0 + t eps (Tweedie, exact)."""
    gain = (1 - t) * std**2 / ((1 - t) ** 2 * std**2 + t**2)
    return mean + gain * (x_t - (1 - t) * mean)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_the_raw_dmd_direction_is_the_reverse_kl_gradient_of_the_noised_marginals(t):
    """Student N(mu_q, s_q^2), teacher N(mu_p, s_p^2), exact scores: E[x0_fake - x0_real] over the student's
    re-noised samples = t^2 / (1 - t)^2 x dKL(q_t || p_t)/dmu_q, and E[(x0_fake - x0_real) z] the same
    for dKL/ds_q (reparameterised x = mu_q + s_q z), with KL between the noised Gaussians in closed form."""
    mu_q, s_q, mu_p, s_p = 0.7, 0.5, -0.4, 1.3
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    z, eps = (
        torch.randn(n, 1, generator=gen, dtype=torch.float64),
        torch.randn(n, 1, generator=gen, dtype=torch.float64),
    )
    x = mu_q + s_q * z
    x_t = (1 - t) * x + t * eps
    direction = dmd_gradient(
        x, _x0_prediction(x_t, t, mu_p, s_p), _x0_prediction(x_t, t, mu_q, s_q), normalize=False
    )
    a, big_a = (1 - t) * mu_q, (1 - t) ** 2 * s_q**2 + t**2
    b, big_b = (1 - t) * mu_p, (1 - t) ** 2 * s_p**2 + t**2
    dkl_dmu = (1 - t) * (a - b) / big_b
    dkl_ds = (-1 / (2 * big_a) + 1 / (2 * big_b)) * 2 * (1 - t) ** 2 * s_q
    scale = t**2 / (1 - t) ** 2
    assert direction.mean().item() == pytest.approx(scale * dkl_dmu, rel=0.01)
    assert (direction * z).mean().item() == pytest.approx(scale * dkl_ds, rel=0.03)
    # In expectation exactly (the direction is linear in x_t): (mu_q - mu_p) t^2 / B.
    assert scale * dkl_dmu == pytest.approx((mu_q - mu_p) * t**2 / big_b, rel=1e-12)


def test_f_divergence_weights_have_the_reference_values():
    r = torch.tensor([0.5, 1.0, 2.0, 4.0])
    logits = r.log()
    kl = f_divergence_weight(logits, "kl")
    assert torch.allclose(kl, r / (r.mean() + 1e-6))
    js = f_divergence_weight(logits, "js", normalize=False)
    assert torch.allclose(js, torch.tensor([1 / 3, 1 / 2, 2 / 3, 4 / 5]))
    assert torch.equal(f_divergence_weight(logits, "rkl", normalize=False), torch.ones(4))
    # The logit is clamped to +-10, the ratio to [0.1, 20]; heads are averaged.
    clamped = f_divergence_weight(torch.tensor([100.0, -100.0]), "kl", normalize=False)
    assert torch.allclose(clamped, torch.tensor([20.0, 0.1]))
    heads = f_divergence_weight(torch.tensor([[0.0, 2 * math.log(2)]]), "kl", normalize=False)
    assert torch.allclose(heads, torch.tensor([2.0]))
    # Per noise-level bin normalisation: r / (mean r in its bin).
    binned = f_divergence_weight(
        torch.tensor([1.0, 3.0, 2.0, 6.0]).log(),
        "kl",
        t=torch.tensor([0.05, 0.06, 0.95, 0.97]),
        normalize=False,
    )
    assert torch.allclose(binned, torch.tensor([0.5, 1.5, 0.5, 1.5]))
    with pytest.raises(ValueError, match="unknown f-divergence 'tv'"):
        f_divergence_weight(logits, "tv")
    for name, h in F_DIVERGENCES.items():  # every weight is positive and finite on the clipped range
        values = h(torch.tensor([0.1, 1.0, 20.0]))
        assert torch.isfinite(values).all() and (values > 0).all(), name


def test_f_distill_with_the_reverse_kl_is_plain_dmd():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    real, fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    weight = f_divergence_weight(torch.randn(3), "rkl")
    assert torch.allclose(dmd_loss(x, real, fake, weight=weight), dmd_loss(x, real, fake), rtol=1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \[3\]"):
        dmd_loss(x, real, fake, weight=torch.ones(3, 1))


def test_fake_score_and_gan_losses_have_the_reference_values():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    assert fake_score_loss(noise - x0, x0, noise).item() == 0.0
    assert fake_score_loss(noise - x0 + 1, x0, noise).item() == pytest.approx(1.0)
    zeros = torch.zeros(5)
    assert gan_generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert gan_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    # A confident discriminator: real logits high, fake logits low -> its loss near 0, the generator's high.
    assert gan_discriminator_loss(torch.full((5,), 20.0), torch.full((5,), -20.0)).item() < 1e-8
    assert gan_generator_loss(torch.full((5,), -20.0)).item() == pytest.approx(20.0, rel=1e-6)


def test_dmd_training_moves_a_misplaced_student_onto_a_gaussian_mixture():
    """A one-step generator (an MLP from 2-D noise) starts far from a two-mode mixture (weights 0.3 / 0.7);
    the teacher is the mixture's exact velocity, the fake score an MLP trained online on the student's
    samples (5 fake steps per generator step). 600 DMD2 steps put the student on the mixture: mode weights
    within 0.04, mean within 0.15 along the modes' axis, variance within 15% (over three seeds of this setup:
    weights within 0.015, means within 0.05, variance 8-11% low, as the reverse KL under-disperses)."""
    from analytic import GaussianMixture, MixtureDistillation

    torch.manual_seed(0)
    mixture = GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    toy = MixtureDistillation(mixture, start=(0.0, 3.0))  # misplaced: above both modes
    with torch.no_grad():
        before = toy.student(torch.randn(4096, 2))
    assert before[:, 1].mean() > 2.5  # nowhere near the mixture
    toy.distil()
    with torch.no_grad():
        samples = toy.student(torch.randn(20000, 2)).double()
    mean, cov = mixture.moments()
    assert torch.allclose(mixture.mode_weights(samples), mixture.weights, atol=0.04)
    assert abs(samples[:, 0].mean() - mean[0]) < 0.15 and abs(samples[:, 1].mean()) < 0.1
    assert abs(samples[:, 0].var() / cov[0, 0] - 1) < 0.15


def test_rtdmds_policy_term_moves_mode_weight_toward_the_rewarded_mode():
    """RTDMD's policy path on the mixture: a generator distilled onto two equal modes at x_0 = -2 and +2
    (600 DMD2 steps; samples carry Gaussian noise of sd 0.1, so they have log-probs), then 300 steps of
    DMD2 plus ``policy_weight`` x Flow-GRPO's loss of r(x) = x_0 with group-normalised advantages, as
    the dmd recipe adds it. Weight 0 keeps the modes at 0.50 +- 0.04; weight 1 moves the rewarded mode to
    more than 0.56 (0.60-0.71 measured after 200-1,600 steps; weight 0.1 gives 0.50-0.52, weight 10 collapses
    the student onto the rewarded mode).

    How far it moves is set by the policy weight, not by a tilted target exp(beta r): with normalised
    advantages beta has no fixed value. In the reverse KL's own units (unnormalised advantages, the raw DMD
    direction weighted (1 - t)^2 / t^2) the student stops at the minimiser of the noised KL's objective, not
    at the tilted mixture (0.636 [0.620, 0.652] over three seeds against 0.640 and 0.599 for beta 0.1;
    ``benchmarks/dmd/mode_tilt.py``,
    ``test_the_noised_kl_tilts_two_modes_further_than_the_tilted_target``)."""
    import copy

    from analytic import GaussianMixture, MixtureDistillation

    torch.manual_seed(0)
    mixture = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    toy = MixtureDistillation(mixture, policy_std=0.1)
    toy.distil()
    start = toy.mode_weights()
    assert abs(start[1] - 0.5) < 0.04
    reached = {}
    for weight in (0.0, 1.0):
        run = copy.deepcopy(toy)
        torch.manual_seed(1)
        for _ in range(300):
            run.generator_step(weight, reward=lambda x: x[:, 0])
        reached[weight] = run.mode_weights()[1].item()
    assert abs(reached[0.0] - 0.5) < 0.04
    assert reached[1.0] > 0.56 and reached[1.0] > reached[0.0] + 0.04, reached


def test_the_noised_kl_tilts_two_modes_further_than_the_tilted_target():
    """``noised_kl_minimiser``: the two-mode student that minimises E_t KL(q_t || p_t) - beta E_q[x], the
    objective DMD's raw direction weighted (1 - t)^2 / t^2 descends with a linear tilt. Without a reward it is
    the teacher; with t near 0 (KL(q_t || p_t) -> KL(q || p)) it is the tilted mixture p exp(beta x) / Z to
    1e-5 (weight e^{4 beta} / (1 + e^{4 beta}), modes shifted by beta s^2), which checks the quadrature. With
    DMD's t ~ U(0.02, 0.98) it tilts further, since noise shrinks every KL: 0.810 instead of 0.731 at beta
    0.25, and its modes shift 3.4x as far."""
    from analytic import noised_kl_minimiser

    plain = noised_kl_minimiser(0.0)
    assert [plain[k] for k in ("weight", "shift_plus", "shift_minus")] == pytest.approx(
        [0.5, 0.0, 0.0], abs=1e-7
    )
    exact = noised_kl_minimiser(0.25, t_range=(0.001, 0.01))
    assert exact["tilted_weight"] == pytest.approx(math.exp(1) / (1 + math.exp(1)), abs=1e-12)
    assert exact["weight"] == pytest.approx(exact["tilted_weight"], abs=1e-5)
    for key in ("shift_plus", "shift_minus"):
        assert exact[key] == pytest.approx(0.25 * 0.3**2, abs=1e-5)
    dmd = noised_kl_minimiser(0.25)
    assert dmd["weight"] == pytest.approx(0.810, abs=1e-3)
    assert dmd["shift_plus"] == pytest.approx(0.076, abs=1e-3)


def test_reward_hinge_pushes_only_the_samples_below_the_margin():
    """RTDMD's backprop hinge: beta * mean(max(0, margin - r)) in place of -beta * mean(r). On hand-built
    rewards [0.5, 2.0] with margin 1 and beta 0.1 it adds 0.1 * (0.5 + 0) / 2 = 0.025 to the DMD loss, and the
    reward's gradient is -beta / B for the sample below the margin and 0 for the one above it (the linear
    term gives -beta / B to both)."""
    from flowalign.algorithms.dmd import dmd_loss, reward_tilted_dmd_loss

    torch.manual_seed(0)
    x, real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    plain = dmd_loss(x, real, fake)
    rewards = torch.tensor([0.5, 2.0], requires_grad=True)
    hinge = reward_tilted_dmd_loss(x, real, fake, rewards, 0.1, margin=1.0)
    assert hinge.item() == pytest.approx(plain.item() + 0.025, abs=1e-7)
    (grad,) = torch.autograd.grad(hinge, rewards)
    assert grad.tolist() == pytest.approx([-0.05, 0.0])
    linear = reward_tilted_dmd_loss(x, real, fake, rewards, 0.1)
    assert linear.item() == pytest.approx(plain.item() - 0.1 * 1.25, abs=1e-7)
    assert torch.autograd.grad(linear, rewards)[0].tolist() == pytest.approx([-0.05, -0.05])
    with pytest.raises(ValueError, match="margin must be finite"):
        reward_tilted_dmd_loss(x, real, fake, rewards, 0.1, margin=float("nan"))


def test_reward_tilted_dmd_reaches_the_tilted_gaussian():
    """Student N(m, s^2 I) against teacher N(mu, s^2 I) with the exact x0-predictions of both at flow level t
    (their difference is (m - mu) t^2 / v_t, v_t = (1 - t)^2 s^2 + t^2, whatever x_t), and the linear reward
    r(x) = a.x, whose tilt of the teacher is N(mu + beta s^2 a, s^2 I). Gradient descent on
    reward_tilted_dmd_loss (raw direction, weight (1 - t)^2 / t^2, dmd_scale = D) stops at exactly
    m* = mu + beta a / E_t[(1 - t)^2 / v_t], which is the tilted mean to 0.1% for small t."""
    from flowalign.algorithms.dmd import reward_tilted_dmd_loss

    torch.manual_seed(0)
    dim, s, beta = 3, 0.5, 0.8
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64)
    t = torch.linspace(0.001, 0.01, 64, dtype=torch.float64)[:, None]  # one sample per level
    v = (1 - t) ** 2 * s**2 + t**2
    m = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([m], lr=0.05)
    for _ in range(400):
        x = m + s * torch.randn(len(t), dim, dtype=torch.float64)
        eps = torch.randn_like(x)
        x_t = (1 - t) * x.detach() + t * eps

        def x0(center, x_t=x_t):
            return center + (1 - t) * s**2 / v * (x_t - (1 - t) * center)

        loss = reward_tilted_dmd_loss(
            x, x0(mu), x0(m.detach()), x @ a, beta, dmd_scale=dim, weight=((1 - t) ** 2 / t**2)[:, 0],
            normalize=False,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fixed_point = mu + beta * a / ((1 - t) ** 2 / v).mean()
    assert torch.allclose(m.detach(), fixed_point, atol=1e-9)
    tilted = mu + beta * s**2 * a
    assert torch.allclose(m.detach(), tilted, rtol=1e-3)
    with pytest.raises(ValueError, match="rewards must have shape"):
        reward_tilted_dmd_loss(x, x, x, torch.zeros(3), beta)


def _gaussian_conditional_mean(y: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """For jointly Gaussian y and x given as coefficients over [1, z_1, ..., z_n] (independent standard
    normals), E[y | x] = intercept + slope * x: returns (intercept, slope)."""
    covariance, variance = float(y[1:] @ x[1:]), float(x[1:] @ x[1:])
    slope = covariance / variance
    return float(y[0]) - slope * float(x[0]), slope


@pytest.mark.parametrize("sigma_s,sigma_e", [(0.0, 0.6), (0.25, 0.3), (0.5, 0.9), (0.75, 0.98)])
def test_the_ambient_target_regresses_to_the_velocity_of_the_marginal(sigma_s, sigma_e):
    """AC-DMD's fake score sees only noisy states x_s = (1 - s) x0 + s eps0 of a Gaussian x0 ~ N(mu, s0^2). Its
    target at x_e = ambient_noised(x_s, s, e, eps) has, given x_e, exactly the mean of the true velocity
    (x_e - x0) / e of the marginal at e (slope and intercept to 1e-12; everything is jointly Gaussian, so
    the conditional means are linear and computed from coefficients over [1, z0, eps0, eps])."""
    from flowalign.algorithms.dmd import ambient_noised, ambient_velocity_target

    mu, s0 = 0.7, 1.3
    x0 = torch.tensor([[mu, s0, 0.0, 0.0]], dtype=torch.float64)
    x_s = (1 - sigma_s) * x0 + sigma_s * torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    eps = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    x_e = ambient_noised(x_s, sigma_s, sigma_e, eps)[0]
    assert float(x_e[1:] @ x_e[1:]) == pytest.approx((1 - sigma_e) ** 2 * s0**2 + sigma_e**2, abs=1e-12)
    target = ambient_velocity_target(x_s, sigma_s, sigma_e, eps)[0]
    velocity = (x_e - x0[0]) / sigma_e
    assert _gaussian_conditional_mean(target, x_e) == pytest.approx(
        _gaussian_conditional_mean(velocity, x_e), abs=1e-12
    )
    if sigma_s == 0:  # plain flow noising and target
        assert torch.allclose(x_e, ((1 - sigma_e) * x_s + sigma_e * eps)[0])
        assert torch.allclose(target, (eps - x_s)[0])


def test_the_ambient_loss_weight_is_rtdmds_clamped_scale():
    """min(1, 10 sigma_ts^2): RTDMD's clamp(1 / s^2, max=10) (s v - s target)^2 written on (v - target)^2."""
    from flowalign.algorithms.dmd import ambient_loss_weight

    s, e = torch.tensor([0.0, 0.75, 0.75]), torch.tensor([0.3, 0.76, 0.9])
    sigma_ts2 = e**2 - ((1 - e) / (1 - s)) ** 2 * s**2  # 0.09, 0.0592, 0.8064
    assert ambient_loss_weight(s, e).tolist() == pytest.approx([0.9, 0.592, 1.0], abs=1e-6)
    assert torch.allclose(ambient_loss_weight(s, e), torch.clamp(10 * sigma_ts2, max=1))


def test_flow_step_to_moves_along_the_prediction():
    from flowalign.algorithms.dmd import flow_step_to

    x_t, x0 = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]])
    assert torch.equal(flow_step_to(x_t, x0, 0.8, 0.0), x0)
    assert torch.allclose(flow_step_to(x_t, x0, 0.8, 0.8), x_t)
    # Euler with velocity (x_t - x0) / 0.8 from 0.8 to 0.2
    assert torch.allclose(flow_step_to(x_t, x0, 0.8, 0.2), x_t + (0.2 - 0.8) * (x_t - x0) / 0.8)


def test_ac_dmd_moves_a_misplaced_state_onto_the_teachers_marginal_at_its_level():
    """A student state x_s ~ N(m, c^2 I) at level s = 0.5 (c^2 = (1 - s)^2 s0^2 + s^2, the right spread)
    against a teacher N(mu, s0^2 I), with the exact x0-predictions of the teacher and of the fake score (the
    student's marginal, which the ambient target regresses to) at the re-noised x_e, both moved back to s.
    Gradient descent on dmd_loss at x_s converges to m = (1 - s) mu, the teacher's marginal at s (to 1e-6),
    not to mu, where matching x_s as a clean sample would take it."""
    from flowalign.algorithms.dmd import ambient_noised, dmd_loss, flow_step_to

    torch.manual_seed(0)
    dim, s0, s = 3, 0.6, 0.5
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c = ((1 - s) ** 2 * s0**2 + s**2) ** 0.5
    m = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([m], lr=0.5)
    for _ in range(300):
        e = s + 0.01 + (0.98 - s - 0.01) * torch.rand(256, 1, dtype=torch.float64)
        x_s = m + c * torch.randn(256, dim, dtype=torch.float64)
        x_e = ambient_noised(x_s.detach(), s, e[:, 0], torch.randn(256, dim, dtype=torch.float64))
        v_e = (1 - e) ** 2 * s0**2 + e**2

        def x0(center, x_e=x_e, e=e, v_e=v_e):  # E[x0 | x_e] for x0 ~ N(center, s0^2)
            return center + (1 - e) * s0**2 / v_e * (x_e - (1 - e) * center)

        real = flow_step_to(x_e, x0(mu), e[:, 0], s)
        fake = flow_step_to(x_e, x0(m.detach() / (1 - s)), e[:, 0], s)
        loss = dmd_loss(x_s, real, fake, normalize=False) * x_s.numel() / 256
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(m.detach(), (1 - s) * mu, atol=1e-6)


def _gaussian_denoiser(mu: float, c: float, slope: float = 1.0):
    """The x0-prediction of data N(mu, c^2) on the flow path, E[x0 | x_t] = mu + k_t (x_t - (1 - t) mu) with
    k_t = (1 - t) c^2 / ((1 - t)^2 c^2 + t^2); ``slope`` != 1 mis-scales k_t (a wrong denoiser)."""

    def h(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = (1 - t) * c**2 / ((1 - t) ** 2 * c**2 + t**2)
        return mu + slope * k * (x - (1 - t) * mu)

    return h


def test_the_consistency_step_is_cps_at_a_fixed_eta_and_the_flows_posterior_without():
    """With ``eta`` it is flow_sde_step's CPS step (RTDMD's transition); without, its noise is the flow's
    reverse Markov step's, std = s sigma_ts / t, and at s = 0 it lands on the prediction."""
    from flowalign.algorithms.dmd import consistency_step
    from flowalign.samplers.steps import flow_sde_step

    gen = torch.Generator().manual_seed(0)
    x_t, x0, z = (torch.randn(3, 2, 4, generator=gen) for _ in range(3))
    t, s = torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.6, 0.49, 0.1])
    velocity = (x_t - x0) / t.view(-1, 1, 1)
    cps = flow_sde_step(velocity, x_t, t, s, dynamics="cps", noise_level=0.9, noise=z).prev_sample
    assert torch.allclose(consistency_step(x_t, x0, t, s, z, eta=0.9), cps, atol=1e-6)
    a = (1 - t) / (1 - s)
    std = (s * (t**2 - a**2 * s**2).sqrt() / t).view(-1, 1, 1)
    eps_hat = (x_t - (1 - t.view(-1, 1, 1)) * x0) / t.view(-1, 1, 1)
    mean = (1 - s.view(-1, 1, 1)) * x0 + (s.view(-1, 1, 1) ** 2 - std**2).sqrt() * eps_hat
    assert torch.allclose(consistency_step(x_t, x0, t, s, z), mean + std * z, atol=1e-6)
    assert torch.equal(consistency_step(x_t, x0, t, torch.tensor([0.6, 0.49, 0.0]), z)[2], x0[2])
    assert torch.equal(consistency_step(x0, x0, torch.zeros(3), torch.zeros(3), z), x0)  # a clean input stays


@pytest.mark.parametrize("t,s", [(0.8, 0.6), (0.5, 0.3), (0.3, 0.1), (0.9, 0.05)])
def test_the_exact_denoiser_is_consistent_under_the_posterior_step_and_not_under_cps(t, s):
    """Data N(0.7, 0.5^2): the exact x0-prediction h is linear, so E[h(x_s, s) | x_t] = h(E[x_s | x_t], s), and
    E[x_s | x_t] is the step with zero noise. Under the flow's posterior step it equals h(x_t, t) to 1e-12 (the
    martingale property Daras et al. build on); under RTDMD's CPS at eta 0.9 it does not (drift above 0.01)."""
    from flowalign.algorithms.dmd import consistency_loss, consistency_step

    h = _gaussian_denoiser(0.7, 0.5)
    x_t = torch.linspace(-2, 2, 9, dtype=torch.float64).view(9, 1)
    level_t, level_s = torch.full((9,), t, dtype=torch.float64), torch.full((9,), s, dtype=torch.float64)
    anchor = h(x_t, t)
    zero = torch.zeros_like(x_t)
    posterior = h(consistency_step(x_t, anchor, level_t, level_s, zero), s)
    assert (posterior - anchor).abs().max() < 1e-12
    assert float(consistency_loss(anchor, posterior, posterior)) < 1e-24
    cps = h(consistency_step(x_t, anchor, level_t, level_s, zero, eta=0.9), s)
    assert (cps - anchor).abs().max() > 0.01


@pytest.mark.parametrize("eta", [None, 0.9])
def test_the_two_sample_consistency_estimator_is_unbiased(eta):
    """A wrong denoiser (k_t scaled by 0.6) on Gaussian data: averaged over independent pairs of moves, the
    two-sample estimator equals the squared drift ||h(E[x_s | x_t], s) - h(x_t, t)||^2 computed in closed form
    (within 4 standard errors of 400k pairs), and the one-sample MSE exceeds it by the moves' variance,
    (slope k_s std)^2."""
    from flowalign.algorithms.dmd import consistency_loss, consistency_step

    t, s, n = 0.5, 0.2, 400_000
    h = _gaussian_denoiser(0.7, 0.5, slope=0.6)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.full((n, 1), 2.0, dtype=torch.float64)
    level_t, level_s = torch.full((n,), t, dtype=torch.float64), torch.full((n,), s, dtype=torch.float64)
    anchor = h(x_t, t)
    z1, z2 = (torch.randn(n, 1, generator=gen, dtype=torch.float64) for _ in range(2))
    first = h(consistency_step(x_t, anchor, level_t, level_s, z1, eta), s)
    second = h(consistency_step(x_t, anchor, level_t, level_s, z2, eta), s)
    drift = float(h(consistency_step(x_t[:1], anchor[:1], level_t[:1], level_s[:1], torch.zeros(1, 1), eta), s)
                  - anchor[0])  # fmt: skip
    products = (first - anchor) * (second - anchor)
    estimate, error = float(consistency_loss(anchor, first, second)), float(products.std()) / math.sqrt(n)
    assert abs(estimate - drift**2) < 4 * error
    a = (1 - t) / (1 - s)
    std = s * math.sqrt(t**2 - a**2 * s**2) / t if eta is None else s * math.sin(eta * math.pi / 2)
    k_s = 0.6 * (1 - s) * 0.25 / ((1 - s) ** 2 * 0.25 + s**2)
    one_sample = float(consistency_loss(anchor, first))
    assert one_sample == pytest.approx(drift**2 + (k_s * std) ** 2, rel=0.02)
    assert abs(drift) > 0.05  # the planted error is visible
