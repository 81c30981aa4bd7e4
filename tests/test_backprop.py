"""Reward backprop and ReNO: KL at initialization, the regularizer, best-iterate selection, and one
backprop step per model family."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowalign.algorithms.backprop import draft_lv_loss, velocity_kl
from flowalign.algorithms.noise_opt import chi_regularizer, optimize_noise
from flowalign.config import RewardSpec, load_config
from flowalign.models import load_model
from flowalign.samplers import SamplingPlan, rollout
from flowalign.train import train
from rewards import Reward, RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]


@register_reward("redness_for_test")
class Redness(Reward):
    differentiable = True

    def score_batch(self, images, prompts, metadata):
        return RewardOutput(images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1))


def test_chi_regularizer_value_and_gradient():
    z = torch.tensor([[3.0, 4.0, 0.0, 0.0]], requires_grad=True)  # |z| = 5, d = 4
    value = chi_regularizer(z)
    assert value.item() == pytest.approx(0.5 * 25 - 3 * math.log(5))
    value.sum().backward()
    # d/dz [0.5 |z|^2 - (d-1) log|z|] = z - (d-1) z / |z|^2
    torch.testing.assert_close(z.grad, z.detach() - 3 * z.detach() / 25)


def test_noise_optimization_returns_the_best_iterate():
    target = torch.tensor([[1.0, -1.0]])

    def generate(z):
        return z

    def reward(images):  # maximal at the target; SGD with a huge lr overshoots after the first steps
        return -((images - target) ** 2).sum(1)

    z0 = torch.zeros(1, 2)
    result = optimize_noise(
        generate,
        reward,
        z0,
        iterations=6,
        lr=0.8,
        momentum=0.0,
        nesterov=False,
        grad_clip=10.0,
        reg_weight=0.0,
        progress=False,
    )
    rewards = [row["reward"][0] for row in result.trace]
    best = max(range(len(rewards)), key=rewards.__getitem__)
    assert result.best_iteration.item() == best
    assert result.best_rewards.item() == pytest.approx(rewards[best])
    assert result.best_rewards.item() >= rewards[0] and result.initial_rewards.item() == pytest.approx(
        rewards[0]
    )
    assert len(result.trace) == 6


def test_noise_optimization_per_sample_clipping_and_batching():
    """Each sample of a batch follows the trajectory it would follow alone."""

    def generate(z):
        return z.tanh()

    def reward(images):
        return images.sum(1)

    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    together = optimize_noise(generate, reward, z, iterations=4, progress=False)
    alone = optimize_noise(generate, reward, z[1:2], iterations=4, progress=False)
    torch.testing.assert_close(together.best_noise[1:2], alone.best_noise)


def test_velocity_kl_is_zero_at_initialization():
    model = load_model("tiny-sd3")
    model.add_lora(rank=4)
    cond = model.encode(["a red circle", "a blue square"], cfg=False)
    noise = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(0))
    schedule = model.schedule(3, noise.shape[1:])
    out = rollout(
        model, cond, noise, schedule, SamplingPlan.build(3, sde="none", grad="last_k", k=2), decode=False
    )
    kl = velocity_kl(model, out, cond)
    assert kl.shape == (2,) and (kl == 0).all()
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    out = rollout(
        model, cond, noise, schedule, SamplingPlan.build(3, sde="none", grad="last_k", k=2), decode=False
    )
    kl = velocity_kl(model, out, cond)
    assert (kl > 0).all()
    kl.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


def test_ipro_kl_weights_each_step_by_its_noise_level():
    """IPRO's multi-step KL: each gradient step's mean squared velocity difference over 2 sigma_t^2, then the
    mean over steps (the per-step terms are the plain form's, recomputed here one step at a time)."""
    model = load_model("tiny-sd3")
    model.add_lora(rank=4)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    cond = model.encode(["a red circle", "a blue square"], cfg=False)
    noise = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(0))
    schedule = model.schedule(3, noise.shape[1:])
    out = rollout(
        model, cond, noise, schedule, SamplingPlan.build(3, sde="none", grad="last_k", k=2), decode=False
    )
    per_step = []
    for i in (1, 2):
        with torch.no_grad():
            v = model.predict(out.latents[:, i], schedule.timesteps[i], cond)
            with model.reference():
                ref = model.predict(out.latents[:, i], schedule.timesteps[i], cond)
        per_step.append((v - ref).pow(2).flatten(1).mean(1) / (2 * schedule.sigmas[i] ** 2))
    ipro = velocity_kl(model, out, cond, form="ipro")
    torch.testing.assert_close(ipro.detach(), torch.stack(per_step, 1).mean(1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="KL form must be 'velocity' or 'ipro'"):
        velocity_kl(model, out, cond, form="kl")


def test_draft_lv_loss_has_gradients():
    model = load_model("tiny-sd3")
    model.add_lora(rank=4, init="gaussian")
    cond = model.encode(["a red circle"], cfg=False)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    schedule = model.schedule(4, x0.shape[1:])
    loss = draft_lv_loss(
        model,
        lambda im: Redness()(im, ["p"] * len(im)).scores,
        x0,
        cond,
        schedule.timesteps[-1],
        schedule.sigmas[-2],
        repeats=2,
    )
    loss.backward()
    assert torch.isfinite(loss) and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters()
    )


@pytest.mark.parametrize(
    "family,mode",
    [("sd3", "alignprop"), ("flux", "draft"), ("sd", "refl"), ("sdxl", "full"), ("sd3", "draft_lv")],
)
def test_one_backprop_step_moves_parameters(family, mode, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(
        ROOT / "configs/grpo/tiny_sd3.yaml",
        [f"model.path=tiny-{family}", "train.algorithm=backprop", f"backprop.mode={mode}", "backprop.k=2",
         "backprop.k_min=1", "backprop.kl_beta=0.1", "sampling.steps=3", "data.group_size=1",
         f"train.output_dir={tmp_path}", "train.steps=1", "train.checkpoint_every=1"],
    )  # fmt: skip
    config.reward = {"redness_for_test": RewardSpec()}
    train(config)
    from safetensors.torch import load_file

    params = load_file(str(tmp_path / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in params.items() if "lora_B" in k)


def test_backprop_refuses_non_differentiable_rewards(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(
        ROOT / "configs/grpo/tiny_sd3.yaml",
        ["train.algorithm=backprop", f"train.output_dir={tmp_path}", "train.steps=1"],
    )
    with pytest.raises(ValueError, match="differentiable rewards"):
        train(config)


def test_noise_optimization_snapshots_hold_the_best_so_far():
    def generate(z):
        return z.sigmoid()

    def reward(images):
        return images.mean(1)

    z = torch.zeros(2, 4)
    result = optimize_noise(generate, reward, z, iterations=5, snapshot_at=(0, 2, 5), progress=False)
    assert set(result.snapshots) == {0, 2, 5}
    torch.testing.assert_close(result.snapshots[0], result.initial_images)
    torch.testing.assert_close(result.snapshots[5], result.best_images)
    assert (reward(result.snapshots[2]) <= reward(result.snapshots[5]) + 1e-6).all()
