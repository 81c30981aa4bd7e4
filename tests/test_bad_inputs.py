"""A corpus of bad inputs (issue 15): each is refused before any model loads, with one message that names
the key and where it came from. Values that used to be silently reinterpreted are here first: a negative
clipping norm (reversed update), guidance below 1 (CFG silently off), NaN or zero weights, zero epochs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowalign.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/grpo/tiny_sd3.yaml"
NFT = ROOT / "configs/nft/tiny_sd3.yaml"

# (config, override, what the message must name)
CASES = [
    (TINY, "optim.max_grad_norm=-1", r"optim\.max_grad_norm.*reverses the update"),
    (TINY, "optim.max_grad_norm=0", r"optim\.max_grad_norm.*> 0"),
    (TINY, "optim.max_grad_norm=nan", r"optim\.max_grad_norm"),
    (TINY, "optim.lr=-1e-4", r"optim\.lr.*>= 0"),
    (TINY, "optim.lr=nan", r"optim\.lr.*finite"),
    (TINY, "optim.lr=inf", r"optim\.lr.*finite"),
    (TINY, "optim.eps=0", r"optim\.eps.*> 0"),
    (TINY, "optim.weight_decay=-0.1", r"optim\.weight_decay"),
    (TINY, "optim.betas=[0.9,1.0]", r"optim\.betas.*\[0, 1\)"),
    (TINY, "optim.betas=[0.9]", r"optim\.betas"),
    (TINY, "optim.warmup_steps=-1", r"optim\.warmup_steps"),
    (TINY, "optim.schedule=step", r"optim\.schedule.*constant, linear, cosine"),
    (TINY, "optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio.*\[0, 1\]"),
    (TINY, "sampling.guidance=0.5", r"sampling\.guidance.*>= 1"),
    (TINY, "sampling.guidance=nan", r"sampling\.guidance.*finite"),
    (TINY, "sampling.guidance=-2", r"sampling\.guidance"),
    (TINY, "eval.guidance=0.9", r"eval\.guidance.*>= 1"),
    (TINY, "sampling.noise_level=-0.1", r"sampling\.noise_level"),
    (TINY, "sampling.noise_level=nan", r"sampling\.noise_level"),
    (TINY, "sampling.steps=1", r"sampling\.steps.*>= 2"),
    (TINY, "sampling.dynamics=euler", r"sampling\.dynamics.*flow_grpo, cps, dance"),
    (TINY, "sampling.sigmas=[1.0,0.5]", r"sampling\.sigmas.*4 sampling steps need 4 sigmas, got 2"),
    (TINY, "sampling.steps=3 sampling.sigmas=[1.0,0.5,0.6]", r"sampling\.sigmas.*strictly decreasing"),
    (TINY, "sampling.steps=2 sampling.sigmas=[1.5,0.5]", r"sampling\.sigmas.*\(0, 1\]"),
    (TINY, "sampling.steps=2 sampling.timesteps=[1000,10]", r"sampling\.timesteps.*integers in \[0, 1000\)"),
    (
        TINY,
        "sampling.steps=2 sampling.sigmas=[1,0.5] sampling.timesteps=[999,499]",
        r"sampling\.timesteps.*not both",
    ),
    (TINY, "sampling.reduction=max", r"sampling\.reduction"),
    (TINY, "sampling.sde_window=[5,3]", r"sampling\.sde_window.*does not fit"),
    (TINY, "sampling.group_noise=same", r"sampling\.group_noise"),
    (TINY, "grpo.clip_range=-1", r"grpo\.clip_range.*> 0"),
    (TINY, "grpo.clip_range=0", r"grpo\.clip_range"),
    (TINY, "grpo.adv_clip=0", r"grpo\.adv_clip"),
    (TINY, "grpo.kl_beta=-0.1", r"grpo\.kl_beta"),
    (TINY, "grpo.inner_epochs=0", r"grpo\.inner_epochs.*>= 1"),
    (TINY, "grpo.minibatch_size=0", r"grpo\.minibatch_size"),
    (TINY, "grpo.kl_form=exact", r"grpo\.kl_form"),
    (TINY, "grpo.std_scope=batch", r"grpo\.std_scope"),
    (NFT, "nft.beta=0", r"nft\.beta"),
    (NFT, "nft.inner_epochs=0", r"nft\.inner_epochs"),
    (NFT, "nft.timesteps_per_sample=0", r"nft\.timesteps_per_sample"),
    (NFT, "nft.adv_clip=-5", r"nft\.adv_clip"),
    (NFT, "sampling.guidance=3", r"sampling\.guidance.*CFG-free"),
    (TINY, "reward.incompressibility.weight=nan", r"reward\.incompressibility\.weight.*finite, non-zero"),
    (TINY, "reward.incompressibility.weight=inf", r"reward\.incompressibility\.weight"),
    (TINY, "reward.incompressibility.weight=0", r"reward\.incompressibility\.weight"),
    (TINY, "train.checkpoint_every=-1", r"train\.checkpoint_every.*>= 0"),
    (TINY, "train.keep_checkpoints=0", r"train\.keep_checkpoints.*>= 1"),
    (TINY, "train.steps=0", r"train\.steps"),
    (TINY, "train.max_minutes=0", r"train\.max_minutes"),
    (TINY, "train.ema_decay=1", r"train\.ema_decay"),
    (TINY, "train.mixed_precision=fp8", r"train\.mixed_precision.*no, bf16 or fp16"),
    (TINY, "train.micro_batch_size=0", r"train\.micro_batch_size"),
    (TINY, "train.sharding=zero3", r"train\.sharding.*ddp or fsdp"),
    (TINY, "train.algorithm=ppo", r"train\.algorithm.*register a recipe"),
    (TINY, "eval.every=-1", r"eval\.every"),
    (TINY, "eval.images_per_prompt=0", r"eval\.images_per_prompt"),
    (TINY, "eval.max_prompts=0", r"eval\.max_prompts"),
    (TINY, "eval.detector=yolo", r"eval\.detector.*shapes, mask2former or owlv2"),
    (TINY, "eval.detector=mask2former", r"eval\.detector_args.*model_path"),
    (TINY, "data.group_size=1", r"data\.group_size"),
    (TINY, "data.groups_per_step=0", r"data\.groups_per_step"),
    (TINY, "model.lora_rank=-1", r"model\.lora_rank"),
    (TINY, "model.dtype=float64", r"model\.dtype"),
    (TINY, "model.lora_rank=0", r"grpo\.kl_beta.*LoRA disabled"),
    (TINY, "dpo.beta=0", r"dpo\.beta"),
    (TINY, "dpo.latent_cache_size=-1", r"dpo\.latent_cache_size"),
    (TINY, "dpo.timesteps=cosine", r"dpo\.timesteps"),
    (TINY, "backprop.mode=reinforce", r"backprop\.mode"),
    (TINY, "backprop.kl_beta=-1", r"backprop\.kl_beta"),
    (TINY, "optim.lrr=0.1", r"optim\.lrr"),
    (TINY, "optim.lr=fast", r"optim\.lr"),
    (TINY, "train.steps=2.5", r"train\.steps"),
    (TINY, "trainsteps", r"must look like key=value"),
]


@pytest.mark.parametrize("path,override,message", CASES, ids=[c[1] for c in CASES])
def test_bad_config_values_are_refused_naming_the_key(path, override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, override.split())
    assert "\n" not in str(caught.value)  # one line


def test_an_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'optim\.lr=fast'"):
        load_config(TINY, ["optim.lr=fast"])
    with pytest.raises(
        ConfigError, match=r"^override 'optim\.max_grad_norm=-1': invalid key 'optim\.max_grad_norm'"
    ):
        load_config(TINY, ["optim.max_grad_norm=-1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("optim: {lr: 1.0e-3}", "optim: {lr: 1.0e-3, max_grad_norm: -1}"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid key 'optim\.max_grad_norm'"):
        load_config(bad)
    bad.write_text(TINY.read_text() + "optim: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not a valid YAML config:.*duplicate key optim"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not a valid YAML config"):
        load_config(bad)


def test_a_config_cannot_run_code_unless_allowed(tmp_path):
    """The reported exploit: a reward key naming torch.hub.load with a local repository ran its hubconf.py.
    Now the key is refused at load; opting in still refuses anything but a Reward class, before calling."""
    bad = tmp_path / "hub.yaml"
    bad.write_text(
        TINY.read_text().replace(
            "  incompressibility: {weight: 1.0}",
            '  "torch.hub:load": {weight: 1.0, args: {repo_or_dir: /tmp/nowhere, model: x, source: local}}',
        )
    )
    with pytest.raises(ConfigError, match=r"reward\.torch\.hub:load.*code path.*train\.allow_code=true"):
        load_config(bad)
    from flowalign.train.loop import build_reward

    config = load_config(bad, ["train.allow_code=true"])
    import torch

    with pytest.raises(ValueError, match="not a rewards.Reward subclass.*was not called"):
        build_reward(config, torch.device("cpu"))
