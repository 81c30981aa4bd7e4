"""The supervised control recipe (``train.algorithm: sft``): its loss is the pretraining loss exactly, its
draws are keyed by (seed, iteration, sample), it lowers the held-out flow-matching loss, it resumes exactly,
and it refuses models outside the shapes world."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from probes import probe as make_probe
from safetensors.torch import load_file

from flowalign.config import ConfigError, load_config
from flowalign.models import load_model
from flowalign.train import run_training, train
from flowalign.train.loop import Clock, TrainContext
from flowalign.train.sft import PRETRAINING, SFTRecipe, draw_batch
from flowalign.worlds.shapes.data import SceneStream, names_held_out_pair
from flowalign.worlds.shapes.pretrain import PretrainConfig, flow_matching_loss, sample_sigmas

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/sft/tiny_shapes.yaml"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def _config(tmp_path, *overrides):
    return load_config(TINY, [f"train.output_dir={tmp_path}", *overrides])


def _context(config, model, process_index=0, num_processes=1) -> TrainContext:
    accelerator = SimpleNamespace(process_index=process_index, num_processes=num_processes)
    return TrainContext(config, accelerator, model, None, None, None, None, None, Clock(), Path("."))


def test_the_control_uses_the_shipped_models_pretraining_recipe():
    stored = ROOT / "benchmarks/results/shapes_base/pretrain/config.json"
    assert PRETRAINING == PretrainConfig.from_json(json.loads(stored.read_text()))


def test_the_shapes_control_matches_the_grpo_demo_but_for_its_recipe():
    """Same LoRA, evaluation (sampler, prompts, images; only its cadence in iterations differs), EMA, optimizer."""
    control, grpo = (
        load_config(ROOT / "configs/sft/shapes.yaml"),
        load_config(ROOT / "configs/grpo/shapes.yaml"),
    )
    assert control.model == grpo.model and control.optim == grpo.optim
    assert (control.sampling.steps, control.sampling.guidance) == (
        grpo.sampling.steps,
        grpo.sampling.guidance,
    )
    assert replace(control.eval, every=grpo.eval.every) == grpo.eval
    assert control.train.ema_decay == grpo.train.ema_decay and not control.reward


def test_loss_on_hand_built_inputs_is_the_rectified_flow_loss():
    """SD3 Eq. 1-3: ``x_sigma = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, model time ``1000 sigma``."""
    pipeline = load_model("tiny-shapes").pipeline
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 12, 8, 8, generator=gen) * 2 - 1, torch.randn(3, 12, 8, 8, generator=gen)
    sigmas, captions = torch.tensor([0.25, 0.5, 0.9]), ["a photo of a circle", "", "a photo of a square"]

    def zero(x, t, encoder_hidden_states, return_dict):
        return (torch.zeros_like(x),)

    assert flow_matching_loss(pipeline, x0, captions, sigmas, noise, unet=zero) == ((noise - x0) ** 2).mean()

    def exact(x, t, encoder_hidden_states, return_dict):  # for x0 = 0 the velocity is eps = x_sigma / sigma
        return (x / (t / 1000).view(-1, 1, 1, 1),)

    zeros = torch.zeros_like(x0)
    assert flow_matching_loss(pipeline, zeros, captions, sigmas, noise, unet=exact) < 1e-12


def test_first_iteration_loss_is_the_base_models_pretraining_loss_exactly(tmp_path):
    """Through the loop's LoRA (B = 0 at the start) the recipe's loss equals the pretraining loss of the
    untouched base model on the same draw, computed directly."""
    base = load_model("tiny-shapes").pipeline
    seen = {}

    def probe(recipe, step):
        ctx = recipe.ctx
        batch = draw_batch(ctx, step)
        s = batch.sigmas.view(-1, 1, 1, 1)
        embeds = base.encode_prompt(batch.captions)
        with torch.no_grad():
            velocity = base.unet((1 - s) * batch.x0 + s * batch.noise, 1000 * batch.sigmas, embeds).sample
        seen["direct"] = F.mse_loss(velocity, batch.noise - batch.x0).item()
        seen.update(SFTRecipe.iteration(recipe, step))
        return seen

    run_training(_config(tmp_path, "train.steps=1"), make_probe(probe, SFTRecipe))
    assert seen["loss"] == seen["direct"]


def test_draws_are_keyed_by_sample_so_two_processes_share_one_global_batch():
    config = load_config(TINY, ["sft.batch_size=6"])
    model = load_model("tiny-shapes")
    whole = draw_batch(_context(config, model), 3)
    halves = [draw_batch(_context(config, model, i, 2), 3) for i in range(2)]
    for key in ("x0", "sigmas", "noise"):
        assert torch.equal(getattr(whole, key), torch.cat([getattr(h, key) for h in halves])), key
    assert whole.captions == halves[0].captions + halves[1].captions
    assert not torch.equal(whole.noise, draw_batch(_context(config, model), 4).noise)
    with pytest.raises(ValueError, match=r"sft\.batch_size=6 must be divisible by the number of processes"):
        draw_batch(_context(config, model, 0, 4), 3)


def test_batches_follow_the_pretraining_distribution():
    config = load_config(TINY, ["sft.batch_size=400"])
    batch = draw_batch(_context(config, load_model("tiny-shapes")), 0)
    dropped = sum(c == "" for c in batch.captions) / 400
    assert 0.06 < dropped < 0.14  # caption dropout 0.1
    assert batch.x0.min() == -1 and batch.x0.max() == 1 and batch.sigmas.min() > 0 and batch.sigmas.max() < 1
    # the shift by 3 moves the uniform draw's median 0.5 to 0.75
    assert 0.7 < batch.sigmas.median() < 0.8


def test_training_lowers_the_flow_matching_loss_on_held_out_scenes(tmp_path):
    """A planted effect on the shipped model: five LoRA steps at lr 1e-3 on fresh scenes lower the loss on a
    fixed batch of 64 other scenes (same sigmas and noise before and after)."""
    held_out = SceneStream(seed=999).next_batch(64)
    assert not any(names_held_out_pair(m) for m in held_out.metadata)
    gen = torch.Generator().manual_seed(7)
    noise, sigmas = torch.randn(64, 12, 16, 16, generator=gen), sample_sigmas(PRETRAINING, 64, gen)

    def held_out_loss(ctx) -> float:
        with torch.no_grad():
            x0 = ctx.model.encode_images(held_out.images)
            return flow_matching_loss(ctx.model.pipeline, x0, held_out.captions, sigmas, noise).item()

    losses = []

    def probe(recipe, step):
        ctx = recipe.ctx
        if step == 0:
            losses.append(held_out_loss(ctx))
        metrics = SFTRecipe.iteration(recipe, step)
        if step == ctx.config.train.steps - 1:
            losses.append(held_out_loss(ctx))
        return metrics

    shipped = ["model.path=shapes", "model.lora_rank=8", "sft.batch_size=16", "optim.lr=1e-3"]
    run_training(_config(tmp_path, *shipped, "train.steps=5"), make_probe(probe, SFTRecipe))
    before, after = losses
    assert after < before - 1e-4, (before, after)


def test_resume_is_bitwise_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train.checkpoint_every=2", "train.keep_checkpoints=5", "train.ema_decay=0.5"]
    train(_config(straight, "train.steps=4", *common))
    train(_config(resumed, "train.steps=2", *common))
    train(_config(resumed, "train.steps=4", "train.resume=latest", *common))
    final = {}
    for name in ("trainable.safetensors", "ema_ema.safetensors"):
        a = load_file(str(straight / "checkpoints/step-000004" / name))
        b = load_file(str(resumed / "checkpoints/step-000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        final[name] = a
    lora_b = [v for k, v in final["trainable.safetensors"].items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"


def test_other_model_families_and_bad_keys_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^train\.algorithm=sft continues the shapes world.*'sd3' family; use model\.path=shapes",
    ):
        train(_config(tmp_path, "model.path=tiny-sd3", "model.resolution=32"))
    with pytest.raises(
        ConfigError, match=r"override 'sft\.batch_size=0': invalid key 'sft\.batch_size': must be >= 1"
    ):
        load_config(TINY, ["sft.batch_size=0"])
    assert not load_config(TINY).reward  # the control needs no reward
