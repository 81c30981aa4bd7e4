"""Exact tests of the online-RL losses and advantages on hand-built inputs."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.algorithms.advantages import group_advantages, group_ids_from_keys, multi_reward_advantages
from flowalign.algorithms.grpo import grpo_loss, guard_log_ratio, step_kl
from flowalign.algorithms.nft import nft_loss, optimality_probability
from flowalign.samplers.steps import gaussian_log_prob


def test_group_advantages_exact():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 6.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = group_advantages(rewards, ids, eps=0.0 + 1e-12)
    # group 0: mean 2, std 1 -> (-1, 1); group 1: all equal -> 0; group 2: mean 4, std 2 -> (-1, 1)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    glob = group_advantages(rewards, ids, scope="global", eps=0.0)
    std = rewards.std(unbiased=False)
    torch.testing.assert_close(glob, torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / std)
    assert group_advantages(rewards * 100, ids, clip=0.5).abs().max() == 0.5


def test_flow_grpo_eps_convention():
    """Flow-GRPO's PerPromptStatTracker: population std + 1e-4."""
    adv = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / (0.5 + 1e-4))


def test_group_ids_from_keys():
    assert group_ids_from_keys(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]


def test_multi_reward_modes():
    ids = torch.tensor([0, 0, 0, 0])
    a, b = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 100.0, 0.0, 100.0])
    per = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, ids, eps=0.0)
    # each reward normalized alone: a -> [-1,-1,1,1], b -> [-1,1,-1,1]
    torch.testing.assert_close(per, torch.tensor([-2.0, 0.0, 0.0, 2.0]), atol=1e-3, rtol=0)
    joint = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, ids, mode="weight_then_normalize")
    assert joint[1] > 0.9 and joint[2] < -0.9  # b dominates when summed first
    with pytest.raises(ValueError, match="no scores"):
        multi_reward_advantages({"a": a}, {"a": 1.0, "c": 1.0}, ids)


def test_advantages_reject_nonfinite_rewards():
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_grpo_loss_ratio_one_hand_computed():
    log_prob = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, metrics = grpo_loss(log_prob, log_prob.detach(), adv, clip_range=0.2)
    assert metrics["ratio"].item() == 1.0 and metrics["clip_frac"].item() == 0.0
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv / 3)  # d ratio / d log_prob = ratio = 1


def test_grpo_loss_clipping_on_constructed_ratios():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_prob = torch.log(ratio).requires_grad_()
    loss, metrics = grpo_loss(log_prob, torch.zeros(4), adv, clip_range=0.2, adv_clip=None)
    # max(-A r, -A clip(r)): A>0,r=1.5 -> -1.2 (clipped, no grad); A>0,r=0.5 -> -0.5 (unclipped)
    #                        A<0,r=1.5 -> 1.5 (unclipped);        A<0,r=0.5 -> 0.8 (clipped, no grad)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert metrics["clip_frac"].item() == 1.0
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.5, 1.5, 0.0]) / 4)


def test_advantage_clip_in_loss():
    loss, _ = grpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([10.0, -10.0]), adv_clip=5.0)
    assert loss.item() == pytest.approx(0.0)
    loss, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.tensor([10.0]), adv_clip=5.0)
    assert loss.item() == pytest.approx(-5.0)


def test_step_kl_forms():
    mean, ref = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    std = torch.full((2, 1), 0.5)
    gaussian = step_kl(mean, ref, std)
    torch.testing.assert_close(gaussian, torch.tensor([1.0, 4.0 / 3]) / (2 * 0.25))
    # the exact KL of the two Gaussians, summed over elements
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, 0.5), torch.distributions.Normal(ref, 0.5)
    ).sum(1)
    torch.testing.assert_close(step_kl(mean, ref, std, reduction="sum"), exact)
    torch.testing.assert_close(step_kl(mean, ref, std, form="flow_grpo", dsigma=-0.1), gaussian * 0.1)
    assert (step_kl(mean, mean, std) == 0).all()


def test_guard_log_ratio_removes_the_shift():
    """With x' = old_mean + s eps, RatioNorm's log-ratio equals mean(eps * d) exactly."""
    gen = torch.Generator().manual_seed(0)
    old_mean, d = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen) * 0.1
    s = torch.full((4, 1), 0.3)
    eps = torch.randn(4, 10, generator=gen)
    x = old_mean + s * eps
    lp, old_lp = gaussian_log_prob(x, old_mean + d, s), gaussian_log_prob(x, old_mean, s)
    normalized = guard_log_ratio(lp, old_lp, old_mean + d, old_mean, s)
    torch.testing.assert_close(normalized, (eps * d).mean(1), rtol=1e-4, atol=1e-5)


def test_nft_loss_values():
    assert optimality_probability(torch.tensor([-10.0, 0.0, 2.5, 10.0]), 5.0).tolist() == [
        0.0,
        0.5,
        0.75,
        1.0,
    ]
    x0 = torch.zeros(2, 4)
    x_t = torch.ones(2, 4)
    sigma = torch.tensor([0.5, 0.5])
    v_old = torch.full((2, 4), 2.0)  # x0 prediction x_t - 0.5 * 2 = 0: the old policy is exact
    v = v_old.clone().requires_grad_()
    loss, _ = nft_loss(v, v_old, x_t, x0, sigma, torch.tensor([5.0, -5.0]))
    assert loss.item() == pytest.approx(0.0)
    # moving v off the old velocity costs on both sides; a positive sample pulls v+ back to the target
    v2 = (v_old + 0.2).requires_grad_()
    loss2, _ = nft_loss(v2, v_old, x_t, x0, sigma, torch.tensor([5.0, 5.0]), beta=1.0)
    loss2.backward()
    assert loss2.item() > 0 and (v2.grad > 0).all()
    expected = 5.0 * ((0.5 * 0.2) ** 2 / (0.5 * 0.2))  # A_max * err^2 / |err| with r = 1, beta = 1
    assert loss2.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(v, v_old, x_t, x0, sigma, torch.zeros(2), beta=0.0)
    assert math.isfinite(loss.item())
