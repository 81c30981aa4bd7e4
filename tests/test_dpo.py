"""DPO family: exact losses, pair mining, inversion, and tiny runs (online pairs, a pair file, InPO)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from analytic import GaussianMixture, MixtureEpsModel, MixtureFlowModel
from PIL import Image
from safetensors.torch import load_file
from tiny_weights import write_pair_file

from flowalign.algorithms.dpo import denoising_error, dpo_loss
from flowalign.config import load_config
from flowalign.data.pairs import load_pair_file, mine_pairs
from flowalign.models import load_model
from flowalign.samplers import (
    SamplingPlan,
    diffusion_schedule,
    flow_schedule,
    rollout,
    scaled_linear_alphas_cumprod,
)
from flowalign.samplers.inversion import invert
from flowalign.train import train

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = GaussianMixture(weights=[0.5, 0.5], means=[[-1.5, 0.0], [1.5, 0.5]], stds=[0.5, 0.4])


def test_loss_is_log_two_when_policy_equals_reference():
    errors = torch.tensor([0.3, 0.7, 1.1])
    loss, metrics = dpo_loss(errors, errors.flip(0), errors, errors.flip(0), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["implicit_accuracy"].item() == 0.0


def test_loss_exact_on_constructed_errors():
    # w improves by 0.01 over the reference, l worsens by 0.02: inside = -0.5 * 100 * (-0.01 - 0.02) = 1.5
    loss, metrics = dpo_loss(
        torch.tensor([0.49]), torch.tensor([0.52]), torch.tensor([0.5]), torch.tensor([0.5]), 100.0
    )
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))), rel=1e-5)  # float32 errors
    assert metrics["implicit_accuracy"].item() == 1.0
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0)


def test_gradient_lowers_the_winners_error_relative_to_the_losers():
    theta = torch.zeros(2, requires_grad=True)  # model predictions for (winner, loser)
    target = torch.tensor([1.0, -1.0])
    ref_pred = torch.zeros(2)
    opt = torch.optim.SGD([theta], lr=0.01)
    before = None
    for _ in range(3):
        opt.zero_grad()
        err = (theta - target) ** 2
        ref_err = (ref_pred - target) ** 2
        loss, _ = dpo_loss(err[:1], err[1:], ref_err[:1], ref_err[1:], beta=10.0)
        loss.backward()
        opt.step()
        margin = (err[0] - err[1]).item()
        before = margin if before is None else before
    after = (theta.detach() - target) ** 2
    assert (after[0] - after[1]).item() < before


def test_denoising_error_is_per_sample_mse():
    pred, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    target[1] *= 2
    assert denoising_error(pred, target).tolist() == [1.0, 4.0]


def test_pair_mining_skips_ties_and_small_gaps():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.2, 0.4, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert mine_pairs(rewards, groups) == [(1, 0), (5, 4), (7, 6)]
    assert mine_pairs(rewards, groups, min_gap=0.5) == [(1, 0), (7, 6)]


def test_pair_mining_pairs_ranks_from_both_ends():
    rewards = torch.tensor([0.3, 0.9, 0.0, 0.6, 0.6, 0.1, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    # group 0 by reward: 1 (0.9), 3, 4 (0.6 tie, first index first), 0 (0.3), 5 (0.1), 2 (0.0)
    assert mine_pairs(rewards, groups, per_group=3) == [(1, 2), (3, 5), (4, 0)]
    assert mine_pairs(rewards, groups, min_gap=0.5, per_group=3) == [(1, 2), (3, 5)]
    assert mine_pairs(rewards, groups, per_group=1) == [(1, 2)]  # group 1 ties: skipped
    assert mine_pairs(rewards, groups, per_group=10) == [(1, 2), (3, 5), (4, 0)]  # capped at half a group


def test_pair_file_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="missing \\['rejected'\\]"):
        load_pair_file(path)
    path.write_text(json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match="a.png"):
        load_pair_file(path)


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_inversion_then_sampling_reconstructs_exact_denoisers(kind):
    """The round trip's error is first order in the step size: measured max abs error 0.055 / 0.027 (flow)
    and 0.083 / 0.044 (DDIM) at 100 / 200 steps, on mixture samples of scale ~2."""
    x0 = MIXTURE.sample(64, torch.Generator().manual_seed(0)).float()
    errors = []
    for steps in (100, 200):
        if kind == "flow":
            model, schedule = MixtureFlowModel(MIXTURE), flow_schedule(steps)
        else:
            abar = scaled_linear_alphas_cumprod(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
            model, schedule = (
                MixtureEpsModel(MIXTURE, abar),
                diffusion_schedule(steps, abar, timestep_spacing="trailing"),
            )
        states = invert(model, x0, None, schedule)
        back = rollout(model, None, states[:, 0], schedule, SamplingPlan.ode(steps), decode=False).final
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 0.05 and errors[1] < 0.6 * errors[0]


def test_inversion_then_sampling_reconstructs_on_tiny_sd3():
    """Tolerance measured: 0.025 max abs error at 50 steps on latents of max |x| ~ 2 (0.13 at 10 steps)."""
    model = load_model("tiny-sd3")
    cond = model.encode(["a red circle", "a blue square"], cfg=False)
    x0 = model.initial_noise(2, 32, 32, torch.Generator().manual_seed(0)) * 0.5
    schedule = model.schedule(50, x0.shape[1:])
    states = invert(model, x0, cond, schedule)
    with torch.no_grad():
        back = rollout(model, cond, states[:, 0], schedule, SamplingPlan.ode(50), decode=False).final
    assert (back - x0).abs().max() < 0.05


def _lora_moved(run_dir: Path) -> bool:
    from safetensors.torch import load_file

    params = load_file(str(sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    return any(v.abs().sum() > 0 for k, v in params.items() if "lora_B" in k)


def test_online_flow_dpo_moves_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(
        ROOT / "configs/dpo/tiny_sd3_online.yaml",
        [f"train.output_dir={tmp_path}", "train.steps=1", "train.checkpoint_every=1"],
    )
    result = train(config)
    assert result.last_metrics["pairs"] >= 1 and result.last_metrics["loss"] == pytest.approx(
        math.log(2), abs=1e-4
    )
    assert _lora_moved(tmp_path)


@pytest.mark.parametrize("inversion", [False, True])
def test_online_dpo_reuses_each_pair_for_several_levels(inversion, tmp_path, monkeypatch):
    from probes import probe as make_probe

    from flowalign.train import run_training
    from flowalign.train.dpo import DPORecipe

    monkeypatch.chdir(ROOT)
    seen = {}

    def probe(recipe, step):
        metrics = DPORecipe.iteration(recipe, step)
        seen["updates"] = {int(state["step"]) for state in recipe.ctx.optimizer.state.values()}
        seen.update(metrics)
        return metrics

    config = load_config(
        ROOT / "configs/dpo/tiny_sd3_online.yaml",
        [f"train.output_dir={tmp_path}", "train.steps=1", "data.group_size=4", "dpo.pairs_per_group=2",
         "dpo.timesteps_per_pair=3", f"dpo.inversion={inversion}", "dpo.inversion_steps=4"],
    )  # fmt: skip
    run_training(config, make_probe(probe, DPORecipe))
    assert seen["pairs"] == 4  # two groups of four, two pairs each (random rewards never tie)
    assert seen["updates"] == {3}  # one optimizer step per drawn level
    assert seen["loss"] != pytest.approx(math.log(2), abs=1e-6)  # later levels see updated weights


@pytest.mark.parametrize("family,inversion", [("sd", False), ("sd", True), ("sd3", True)])
def test_offline_pairs_and_inpo_move_parameters(family, inversion, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    write_pair_file(tmp_path, [f"a photo of {i} circles" for i in range(2)])
    config = load_config(
        ROOT / "configs/dpo/tiny_sd3_online.yaml",
        [f"model.path=tiny-{family}", f"dpo.pairs={tmp_path / 'pairs.jsonl'}", "dpo.pairs_per_step=2",
         f"dpo.inversion={inversion}", "dpo.inversion_steps=4", "dpo.beta=2000", "dpo.timesteps=uniform",
         f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "train.checkpoint_every=1"],
    )  # fmt: skip
    config.reward = {}
    result = train(config)
    assert result.last_metrics["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert _lora_moved(tmp_path / "run")


def test_offline_pairs_reject_wrong_image_size(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n"
    )
    config = load_config(
        ROOT / "configs/dpo/tiny_sd3_online.yaml",
        [
            f"dpo.pairs={tmp_path / 'pairs.jsonl'}",
            "dpo.pairs_per_step=1",
            f"train.output_dir={tmp_path / 'run'}",
            "train.steps=1",
        ],
    )
    with pytest.raises(ValueError, match="16x16.*32x32"):
        train(config)


def test_offline_pair_latents_are_streamed_with_a_bounded_cache(tmp_path, monkeypatch):
    """The LRU latent cache changes nothing but memory: no cache, a one-latent cache and the default give
    the same weights, and the cache never holds more than its size."""
    from probes import probe as make_probe

    from flowalign.train import run_training
    from flowalign.train.dpo import DPORecipe

    monkeypatch.chdir(ROOT)
    write_pair_file(tmp_path, [f"a photo of {i + 2} circles" for i in range(3)], seed=1)
    sizes, weights = {}, {}
    for cache in (0, 1, 4096):

        def probe(recipe, step, cache=cache):
            metrics = DPORecipe.iteration(recipe, step)
            sizes[cache] = max(sizes.get(cache, 0), len(recipe.pairs.cache))
            return metrics

        out = tmp_path / f"run{cache}"
        config = load_config(
            ROOT / "configs/dpo/tiny_sd3_online.yaml",
            [f"dpo.pairs={tmp_path / 'pairs.jsonl'}", "dpo.pairs_per_step=2", f"dpo.latent_cache_size={cache}",
             f"train.output_dir={out}", "train.steps=3", "train.checkpoint_every=3"],
        )  # fmt: skip
        config.reward = {}
        run_training(config, make_probe(probe, DPORecipe))
        weights[cache] = load_file(str(out / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert sizes == {0: 0, 1: 1, 4096: 6}
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]) and torch.equal(
            weights[0][key], weights[4096][key]
        )
