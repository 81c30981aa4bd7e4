"""Every recipe on video: GRPO, DiffusionNFT, reward backprop and DPO (online pairs, and pair files of videos)
train tiny image-to-video models from YAML configs whose records name their first frames; one expert of two
trains only its own steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from probes import probe as make_probe
from safetensors.torch import load_file

from flowalign.algorithms.dpo import denoising_error, dpo_loss
from flowalign.config import load_config
from flowalign.data.pairs import load_video
from flowalign.data.prompts import load_image
from flowalign.models import load_model
from flowalign.train import train
from flowalign.train.dpo import DPORecipe
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
    with pytest.raises(ValueError, match="rgba.png' is a RGBA image; it must be RGB"):
        train(_config("configs/grpo/tiny_wan_i2v.yaml", tmp_path / "d", f"data.train_prompts={prompts}"))
    prompts.write_text('{"prompt": "a", "image": "missing.png"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'image' must name an existing image file"):
        train(_config("configs/grpo/tiny_wan_i2v.yaml", tmp_path / "e", f"data.train_prompts={prompts}"))
    with pytest.raises(
        ValueError, match="train.sharding.: model.expert=both routes each sample to one expert"
    ):
        _config("configs/nft/tiny_wan22_i2v.yaml", tmp_path / "g", "model.expert=both", "train.sharding=fsdp")
    with pytest.raises(ValueError, match="model.expert: expert must be 'high', 'low' or 'both', got 'all'"):
        train(_config("configs/nft/tiny_wan22_i2v.yaml", tmp_path / "h", "model.expert=all"))
    with pytest.raises(ValueError, match="model.cpu_offload=True: the sd3 model has no such option"):
        train(_config("configs/grpo/tiny_sd3.yaml", tmp_path / "i", "model.cpu_offload=true"))
    with pytest.raises(ValueError, match="train.algorithm=sft does not train video models yet"):
        train(
            _config(
                "configs/sft/tiny_shapes.yaml", tmp_path / "f", "model.path=tiny-wan", "model.num_frames=5"
            )
        )


def _recording_calls(model, drawn: list, images: list):
    """Record the model times ``model.predict`` sees and the first frames ``model.encode`` is given."""
    predict, encode = model.predict, model.encode

    def recording_predict(x_t, timestep, cond, guidance=1.0):
        drawn.append(torch.as_tensor(timestep).flatten().tolist())
        return predict(x_t, timestep, cond, guidance)

    def recording_encode(prompts, cfg=False, **kwargs):
        images.append(kwargs.get("images"))
        return encode(prompts, cfg=cfg, **kwargs)

    model.predict, model.encode = recording_predict, recording_encode


@pytest.mark.parametrize("inversion", [False, True])
def test_online_dpo_on_video_conditions_pairs_on_their_first_frame_and_trains_one_experts_levels(
    inversion, tmp_path
):
    """Online Flow-DPO (and InPO) on Wan 2.2 with model.expert=low: the first update starts at the policy =
    reference value log 2, the pairs are conditioned on their group's first frame, and every level DPO trains
    on is one the low-noise expert serves (below the 900 boundary; the rollout's first step is at 1000)."""
    drawn, images, seen = [], [], {}

    def probe(recipe, step):
        _recording_calls(recipe.ctx.model, drawn, images)
        seen.update(DPORecipe.iteration(recipe, step))
        return seen

    config = _config(
        "configs/dpo/tiny_wan22_i2v_online.yaml", tmp_path, "train.steps=1", f"dpo.inversion={inversion}",
        "dpo.inversion_steps=4", "dpo.timesteps_per_pair=2",
    )  # fmt: skip
    run_training(config, make_probe(probe, DPORecipe))
    assert seen["pairs"] == 2 and seen["loss"] != 0.0
    rollout, trained = [t for call in drawn[:3] for t in call], [t for call in drawn[3:] for t in call]
    assert max(rollout) == 1000 and trained and max(trained) < 900
    sampled, paired = images[0], images[-1]
    firsts = [
        load_image(ROOT / "assets/video/tiny" / name)
        for name in ("red_circle.png", "blue_square_green_triangle.png")
    ]
    assert torch.equal(sampled, torch.stack([firsts[0]] * 2 + [firsts[1]] * 2))  # groups of 2
    assert torch.equal(paired, torch.stack(firsts))  # one pair per group


def test_dpo_loss_starts_at_log_two_on_video():
    """Policy = reference before the first update, on video latents too."""
    model = load_model("tiny-moving_shapes")
    model.add_lora(rank=4)
    cond = model.encode(["the red circle moves right"] * 2, images=torch.rand(2, 3, 32, 32))
    x0 = torch.randn(2, *model.latent_shape(32, 32))
    t = torch.full((2,), 500.0)
    with torch.no_grad(), model.reference():
        ref = denoising_error(model.predict(x0, t, cond), torch.zeros_like(x0))
    policy = denoising_error(model.predict(x0, t, cond), torch.zeros_like(x0))
    loss, _ = dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def _frames(seed: int) -> torch.Tensor:
    """5 distinct 32x32 frames of eight pure colours (a GIF holds them exactly)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (5, 3, 32, 32), generator=gen).float()


def _save_gif(frames: torch.Tensor, path: Path) -> None:
    images = [Image.fromarray((f.permute(1, 2, 0) * 255).byte().numpy()) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def _video_pair_file(directory: Path, pairs: int = 2) -> Path:
    lines = []
    for i in range(pairs):
        chosen, rejected = _frames(2 * i), _frames(2 * i + 1)
        rejected[0] = chosen[0]  # both generated from one first frame
        _save_gif(chosen, directory / f"w{i}.gif")
        _save_gif(rejected, directory / f"l{i}.gif")
        Image.fromarray((chosen[0].permute(1, 2, 0) * 255).byte().numpy()).save(directory / f"first{i}.png")
        lines.append(json.dumps({"prompt": "the red circle moves right", "chosen": f"w{i}.gif",
                                 "rejected": f"l{i}.gif", "image": f"first{i}.png"}))  # fmt: skip
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_offline_video_pairs_train_toward_the_chosen_videos(tmp_path):
    """A pair file of GIF videos on the tiny moving-shapes model: the videos are read exactly, the pairs'
    latents are the model's encoding of them, and one update lowers the DPO loss on the pairs' own noised
    latents (the winner's error falls relative to the loser's, against the reference)."""
    pairs = _video_pair_file(tmp_path)
    assert torch.equal(load_video(tmp_path / "w1.gif", 5, (32, 32)), _frames(2))
    recorded, seen, context = [], {}, {}

    def probe(recipe, step):
        import flowalign.train.dpo as dpo

        noised = dpo._noised

        def recording(ctx, x0, level, noise):
            out = noised(ctx, x0, level, noise)
            recorded.append((x0, *out))
            return out

        dpo._noised = recording
        try:
            seen.update(DPORecipe.iteration(recipe, step))
        finally:
            dpo._noised = noised
        context["model"] = recipe.ctx.model
        return seen

    config = _config(
        "configs/dpo/tiny_sd3_online.yaml", tmp_path, "model.path=tiny-moving_shapes", "model.resolution=null",
        f"dpo.pairs={pairs}", "dpo.pairs_per_step=2", "train.steps=1", "optim.lr=1e-2",
    )  # fmt: skip
    config.reward = {}
    run_training(config, make_probe(probe, DPORecipe))
    model = context["model"]
    ((x0, x_t, timestep, target),) = recorded
    expected = model.encode_images(torch.stack([_frames(0), _frames(2), _frames(1), _frames(3)]))
    expected[2:, :, 0] = expected[:2, :, 0]  # the losers' first frames are the winners'
    assert torch.equal(x0, expected) or torch.equal(x0, expected[[1, 0, 3, 2]])  # the step's pair order
    cond = model.encode(["the red circle moves right"] * 4, images=model.decode(x0)[:, 0])
    with torch.no_grad():
        with model.reference():
            ref = denoising_error(model.predict(x_t, timestep, cond), target)
        after = denoising_error(model.predict(x_t, timestep, cond), target)
    loss, _ = dpo_loss(after[:2], after[2:], ref[:2], ref[2:], config.dpo.beta)
    assert seen["loss"] == pytest.approx(math.log(2), abs=1e-6) and loss.item() < math.log(2) - 1e-3


def test_bad_video_pairs_are_one_line(tmp_path):
    pairs = _video_pair_file(tmp_path, pairs=1)
    overrides = (
        "model.path=tiny-moving_shapes",
        "model.resolution=null",
        f"dpo.pairs={pairs}",
        "dpo.pairs_per_step=1",
    )

    def run(name):
        config = _config("configs/dpo/tiny_sd3_online.yaml", tmp_path / name, *overrides, "train.steps=1")
        config.reward = {}
        return train(config)

    record = json.loads(pairs.read_text())
    pairs.write_text(json.dumps({k: v for k, v in record.items() if k != "image"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: a video pair needs the conditioning first frame"):
        run("a")
    pairs.write_text(json.dumps(record) + "\n")
    _save_gif(_frames(0)[:4], tmp_path / "w0.gif")
    with pytest.raises(ValueError, match=r"w0.gif' has 4 frames, the model makes 5; cut or pad it first"):
        run("b")
    Image.new("RGB", (16, 16)).save(tmp_path / "first0.png")
    _save_gif(_frames(0), tmp_path / "w0.gif")
    with pytest.raises(
        ValueError, match=r"w0.gif' is 32x32, the model trains at 16x16 \(the pair's first frame"
    ):
        run("c")


def test_prompt_records_name_reference_pools_relative_to_the_file(tmp_path):
    from flowalign.data.prompts import load_prompt_set

    (tmp_path / "pool").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pool" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "x", "reference": "pool"}\n{"prompt": "y", "reference": ["b.png", "pool/a.png"]}\n'
    )
    first, second = load_prompt_set(prompts)
    assert first.metadata["reference"] == str(tmp_path / "pool")
    assert second.metadata["reference"] == [str(tmp_path / "b.png"), str(tmp_path / "pool" / "a.png")]
    prompts.write_text('{"prompt": "x", "reference": ["b.png", "gone.png"]}\n')
    with pytest.raises(
        ValueError, match=r"p.jsonl:1: 'reference' names paths that do not exist: \[.*gone.png'\]"
    ):
        load_prompt_set(prompts)
    prompts.write_text('{"prompt": "x", "reference": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'reference' must be a path or a list of paths"):
        load_prompt_set(prompts)


def test_both_experts_train_in_one_run_and_their_lora_reloads(tmp_path):
    """Wan 2.2 with model.expert=both: NFT trains on levels of both experts (3 levels: 1000 and 751 on either
    side of the 900 boundary, and 8.9), the first update moves the LoRA of each, and the checkpoint's LoRA
    reloads onto both experts of a fresh model."""
    drawn, images = [], []

    def probe(recipe, step):
        _recording_calls(recipe.ctx.model, drawn, images)
        return NFTRecipe.iteration(recipe, step)

    config = _config(
        "configs/nft/tiny_wan22_i2v.yaml", tmp_path, "train.steps=1", "train.checkpoint_every=1",
        "model.expert=both", "nft.timesteps_per_sample=3",
    )  # fmt: skip
    run_training(config, make_probe(probe, NFTRecipe))
    trained = {t for call in drawn[3:] for t in call}
    assert any(t >= 900 for t in trained) and any(t < 900 for t in trained)
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    moved = {
        k.split(".")[0]
        for k, v in load_file(str(checkpoint / "trainable.safetensors")).items()
        if "lora_B" in k and v.abs().sum() > 0
    }
    assert moved == {"transformer", "transformer_2"}
    fresh = load_model("tiny-wan22")
    fresh.load_lora(checkpoint / "lora")
    assert fresh.expert == "both" and fresh.has_lora


def test_text_to_video_trains_from_prompts_and_from_video_pairs_without_first_frames(tmp_path):
    """Wan text-to-video: GRPO on both experts from a plain prompt file, and DPO from a pair file of videos
    (no first frames; the videos have model.resolution's size)."""
    result = train(_config("configs/grpo/tiny_wan22_t2v.yaml", tmp_path / "grpo", "train.steps=1"))
    assert result.steps_done == 1 and result.last_metrics["ratio"] == 1.0
    pairs = _video_pair_file(tmp_path)
    config = _config(
        "configs/dpo/tiny_sd3_online.yaml", tmp_path / "dpo", "model.path=tiny-wan-t2v", "model.num_frames=5",
        f"dpo.pairs={pairs}", "dpo.pairs_per_step=2", "train.steps=1",
    )  # fmt: skip
    config.reward = {}
    assert train(config).last_metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_still_gif_reads_back_with_all_its_frames(tmp_path):
    """GIF writers store identical consecutive frames once with their durations summed (a still video of 5
    frames is one stored frame); load_video restores the frames from the durations."""
    frames = _frames(0)
    still = frames[:1].expand(5, -1, -1, -1)
    _save_gif(still, tmp_path / "still.gif")
    assert Image.open(tmp_path / "still.gif").n_frames == 1
    assert torch.equal(load_video(tmp_path / "still.gif", 5, (32, 32)), still)
    mixed = frames[[0, 1, 1, 0, 0]]
    _save_gif(mixed, tmp_path / "mixed.gif")
    assert torch.equal(load_video(tmp_path / "mixed.gif", 5, (32, 32)), mixed)


def test_weights_and_resumes_go_to_the_expert_the_run_trained(tmp_path):
    """The two Wan experts' tensors have the same names: a full fine-tune of the low-noise expert loads back
    into transformer_2 (its run's model.expert), and resuming a run with another model.expert is refused."""
    run = tmp_path / "full"
    train(_config("configs/backprop/tiny_wan22_i2v.yaml", run, "train.steps=1", "train.checkpoint_every=1",
                  "model.lora_rank=0", "backprop.kl_beta=0"))  # fmt: skip
    (checkpoint,) = (run / "run" / "checkpoints").glob("step-*")
    model = load_model("tiny-wan22")
    model.load_weights(checkpoint)
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert model.expert == "low" and model.denoiser is model.pipeline.transformer_2
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in saved.items())
    untouched = load_model("tiny-wan22").pipeline.transformer.state_dict()  # the high expert as built
    high = model.pipeline.transformer.state_dict()
    assert all(torch.equal(high[k], untouched[k]) for k in untouched)  # nothing landed on the other expert
    assert any(not torch.equal(untouched[k], v) for k, v in saved.items())  # (which it would have shown)
    with pytest.raises(
        ValueError,
        match=r"train.resume: checkpoint .* trained model.expert=low, this run sets model.expert=high",
    ):
        train(_config("configs/backprop/tiny_wan22_i2v.yaml", run, "train.steps=2", "model.lora_rank=0",
                      "backprop.kl_beta=0", "model.expert=high", "train.resume=latest"))  # fmt: skip


def test_cpu_offload_trains_the_same_weights(tmp_path):
    """Reward backprop on Wan 2.2's low-noise expert with model.cpu_offload (UMT5 and the frozen high-noise
    expert wait on the CPU while idle) gives the same trained LoRA as without, bitwise."""
    weights = {}
    for offload in (False, True):
        out = tmp_path / f"offload_{offload}"
        train(_config("configs/backprop/tiny_wan22_i2v.yaml", out, "train.steps=2", "train.checkpoint_every=2",
                      f"model.cpu_offload={offload}"))  # fmt: skip
        (checkpoint,) = (out / "run" / "checkpoints").glob("step-*")
        weights[offload] = load_file(str(checkpoint / "trainable.safetensors"))
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    assert any(v.abs().sum() > 0 for k, v in weights[True].items() if "lora_B" in k)
