"""Every online recipe on video: GRPO, DiffusionNFT and reward backprop train tiny Wan image-to-video models
from YAML configs whose prompt records name their first frames; one expert of two trains only its own steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from probes import probe as make_probe
from safetensors.torch import load_file

from flowalign.config import load_config
from flowalign.models import load_model
from flowalign.train import train
from flowalign.train.loop import run_training
from flowalign.train.online import GRPORecipe, NFTRecipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _config(path, tmp_path, *overrides):
    return load_config(ROOT / path, [f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_grpo_on_video_is_on_policy_at_the_first_update_and_moves_the_lora(tmp_path):
    seen = {}

    def probe(recipe, step):
        seen.update(GRPORecipe.iteration(recipe, step))
        return seen

    config = _config("configs/grpo/tiny_wan_i2v.yaml", tmp_path, "train.steps=1", "train.checkpoint_every=1")
    run_training(config, make_probe(probe, GRPORecipe))
    assert seen["ratio"] == 1.0 and seen["clip_frac"] == 0.0 and seen["kl"] == 0.0
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    assert any(
        v.abs().sum() > 0
        for k, v in load_file(str(checkpoint / "trainable.safetensors")).items()
        if "lora_B" in k
    )


def test_one_expert_trains_only_the_noise_levels_it_serves(tmp_path):
    """Wan 2.2 with model.expert=low: NFT draws its training levels among the low-noise expert's (3 steps:
    t = 1000, 751, 8.9 with the boundary at 900, so 751 and 8.9), its LoRA lands on transformer_2 and loads
    back there by itself."""
    drawn = []
    model_of = {}

    def probe(recipe, step):
        model = recipe.ctx.model
        model_of["model"] = model
        original = model.predict

        def recording(x_t, timestep, cond, guidance=1.0):
            drawn.extend(torch.as_tensor(timestep).flatten().tolist())
            return original(x_t, timestep, cond, guidance)

        model.predict = recording
        try:
            return NFTRecipe.iteration(recipe, step)
        finally:
            del model.predict

    config = _config("configs/nft/tiny_wan22_i2v.yaml", tmp_path, "train.steps=1", "train.checkpoint_every=1")
    run_training(config, make_probe(probe, NFTRecipe))
    rollout, trained = drawn[:12], drawn[12:]  # the rollout: 3 steps x 4 samples (2 groups of 2)
    assert (
        max(rollout) == 1000
        and trained
        and max(trained) < 900
        and model_of["model"].denoiser is model_of["model"].pipeline.transformer_2
    )
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    fresh = load_model("tiny-wan22")
    fresh.load_lora(checkpoint / "lora")
    assert fresh.expert == "low" and fresh.has_lora


def test_reward_backprop_through_the_last_step_of_the_low_noise_expert(tmp_path):
    result = train(_config("configs/backprop/tiny_wan22_i2v.yaml", tmp_path, "train.steps=1"))
    assert result.steps_done == 1 and result.last_metrics["grad_norm"] > 0
    with pytest.raises(RuntimeError, match="the training loss carries no gradient.*model.expert must be"):
        train(
            _config(
                "configs/backprop/tiny_wan22_i2v.yaml",
                tmp_path / "high",
                "train.steps=1",
                "model.expert=high",
            )
        )


def test_bad_video_settings_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="model.num_frames=5: the sd3 model has no such option"):
        train(_config("configs/grpo/tiny_sd3.yaml", tmp_path, "model.num_frames=5"))
    with pytest.raises(ValueError, match=r"model.num_frames: .*4k \+ 1 frames"):
        train(_config("configs/grpo/tiny_wan_i2v.yaml", tmp_path / "a", "model.num_frames=6"))
    with pytest.raises(
        ValueError, match="model.expert: expert='low' trains transformer_2, which this model lacks"
    ):
        train(_config("configs/grpo/tiny_wan_i2v.yaml", tmp_path / "b", "model.expert=low"))
    with pytest.raises(
        ValueError, match="data.train_prompts: an image-to-video model needs a conditioning first"
    ):
        train(
            _config(
                "configs/grpo/tiny_wan_i2v.yaml",
                tmp_path / "c",
                "data.train_prompts=assets/shapes/prompts/train.jsonl",
            )
        )
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (32, 32)).save(rgba)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "image": "rgba.png"}\n{"prompt": "b", "image": "rgba.png"}\n')
    with pytest.raises(ValueError, match="rgba.png' is a RGBA image; conditioning images must be RGB"):
        train(_config("configs/grpo/tiny_wan_i2v.yaml", tmp_path / "d", f"data.train_prompts={prompts}"))
    prompts.write_text('{"prompt": "a", "image": "missing.png"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'image' must name an existing image file"):
        train(_config("configs/grpo/tiny_wan_i2v.yaml", tmp_path / "e", f"data.train_prompts={prompts}"))
    with pytest.raises(ValueError, match="train.algorithm=dpo does not train video models yet"):
        train(
            _config(
                "configs/dpo/tiny_sd3_online.yaml",
                tmp_path / "f",
                "model.path=tiny-wan",
                "model.num_frames=5",
                "model.resolution=null",
                "data.train_prompts=assets/video/tiny/prompts.jsonl",
            )
        )
