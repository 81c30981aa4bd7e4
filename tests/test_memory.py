"""``flowalign plan`` and :mod:`flowalign.memory`: real architectures on the meta device (exact parameter
counts), LoRA counts equal peft's, activations linear in the batch and cut by checkpointing, sharding
divides what it shards, and a config that cannot fit is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowalign.config import load_config
from flowalign.memory import ARCHITECTURES, GB, _lora_params, estimate

ROOT = Path(__file__).resolve().parents[1]
SD35 = ROOT / "configs/grpo/sd35m_geneval.yaml"


@pytest.mark.parametrize(
    "family,published",
    [
        ("sd3", 2_243_171_520),
        ("flux", 11_901_408_320),
        ("sdxl", 2_567_463_684),
        ("sd", 859_520_964),
        ("wan", 14_288_901_184),
    ],  # fmt: skip
)
def test_real_architectures_have_the_published_parameter_counts(family, published):
    with torch.device("meta"):
        net = ARCHITECTURES[family].build()
    assert sum(p.numel() for p in net.parameters()) == published


def test_lora_count_equals_peft():
    from flowalign.models import load_model

    model = load_model("tiny-sd3")
    targets = model.default_lora_targets
    expected = _lora_params(model.denoiser, 4, targets)
    model.add_lora(rank=4)
    assert expected == sum(p.numel() for p in model.trainable_parameters()) > 0


def test_estimate_scales_and_shards_as_it_should():
    config = load_config(SD35)
    one, two = estimate(config, 1), estimate(config, 2)
    # batch-independent block inputs (embeddings shared by the batch) make it slightly less than linear
    assert 1.9 * one.parts["activations"] < two.parts["activations"] <= 2 * one.parts["activations"]
    assert two.parts["denoiser weights"] == one.parts["denoiser weights"]
    plain = estimate(load_config(SD35, ["model.gradient_checkpointing=false"]), 1)
    assert plain.parts["activations"] > 3 * one.parts["activations"]
    sharded = estimate(load_config(SD35, ["train.sharding=fsdp", "eval.every=0"]), 1, processes=8)
    assert sharded.parts["denoiser weights"] == pytest.approx(one.parts["denoiser weights"] / 8)
    assert sharded.parts["text encoders + VAE"] == one.parts["text encoders + VAE"]


def test_plan_prints_the_largest_micro_batch_and_refuses_what_cannot_fit(capsys):
    from flowalign.cli import main

    assert main(["plan", str(SD35), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "largest micro-batch that fits 80 GiB: train.micro_batch_size=" in out
    with pytest.raises(
        SystemExit, match="does not fit 10 GiB even at train.micro_batch_size=1.*gradient_checkpointing"
    ):
        main(["plan", str(SD35), "--gpu-memory", "10"])
    assert main(["plan", str(ROOT / "configs/grpo/shapes.yaml")]) == 2
    assert "no real-size architecture" in capsys.readouterr().err


def test_wan_plan_counts_both_experts_and_the_checkpointed_decode():
    """The IPRO config on Wan 2.2 A14B: the frozen high-noise expert's weights next to the trained low-noise
    one's; with both experts trained, their LoRA doubles and no expert is frozen; the differentiable decode is
    checkpointed per latent frame, a fraction of the stock decode's saved activations; with model.cpu_offload
    (the config's setting) the frozen expert and UMT5 are not on the GPU and it fits 80 GiB."""
    from flowalign.memory import GB, wan_decode_bytes

    ipro = ROOT / "configs/backprop/wan22_i2v_ipro.yaml"
    low = estimate(load_config(ipro, ["model.cpu_offload=false"]), 1)
    expert = 14_288_901_184 * 2 / GB  # bf16
    assert low.parts["denoiser weights"] == low.parts["other expert weights"] == pytest.approx(expert)
    both = estimate(load_config(ipro, ["model.expert=both", "model.cpu_offload=false"]), 1)
    assert both.trainable_params == 2 * low.trainable_params and both.parts["other expert weights"] == 0.0
    assert both.parts["denoiser weights"] == pytest.approx(2 * expert)
    stock = wan_decode_bytes(9, 64, 64, torch.bfloat16, grad=True, checkpointed=False)["stock"]
    counts = wan_decode_bytes(9, 64, 64, torch.bfloat16, grad=True)
    assert counts["held"] + counts["frame"] < stock / 2
    assert 100 < low.total < 141  # fits an H200-class card, not an 80 GB one (118.7 GiB at 480x480)
    offloaded = estimate(load_config(ipro), 1)  # the config's own setting: model.cpu_offload
    assert "other expert weights" not in offloaded.parts
    assert low.total - offloaded.total == pytest.approx((expert + 5_680_910_336 * 2 / GB) * 1.1)
    assert offloaded.total < 80
    with pytest.raises(ValueError, match="model.cpu_offload is for the wan family"):
        estimate(load_config(SD35, ["model.cpu_offload=true"]), 1)


def test_dmd_counts_its_fake_score_and_teachers_copies():
    """DMD's fake score trains like the student (the same trainable state); a full-weight teacher is a frozen
    float32 copy; under FSDP a LoRA fake score holds its own shards of the frozen base."""
    sdxl = ROOT / "configs/dmd/sdxl_4step.yaml"
    lora = estimate(load_config(sdxl), 1)
    fake = "DMD fake score (+ teacher copy)"
    assert lora.parts[fake] == pytest.approx(lora.parts["trainable (fp32) + grads + AdamW"])
    sharded = estimate(load_config(sdxl, ["train.sharding=fsdp"]), 1, processes=8)
    assert sharded.parts[fake] == pytest.approx(lora.parts[fake] / 8 + sharded.parts["denoiser weights"])
    full = estimate(load_config(sdxl, ["model.lora_rank=0", "model.dtype=float32"]), 1)
    assert full.parts[fake] == pytest.approx(full.parts["trainable (fp32) + grads + AdamW"] * 5 / 4)
    assert "DMD fake score (+ teacher copy)" not in estimate(load_config(SD35), 1).parts


def test_dmd_copies_both_experts_of_a_wan22_student():
    """With ``model.expert: both`` the full-weight student's teacher copy and the fake score hold both experts."""
    wan = ROOT / "configs/dmd/wan21_i2v_4step.yaml"
    path = "model.path=Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    one, both = (estimate(load_config(wan, [path, f"model.expert={e}"]), 1) for e in ("high", "both"))
    fake = "DMD fake score (+ teacher copy)"
    assert both.parts[fake] == pytest.approx(2 * one.parts[fake])
    assert one.parts[fake] == pytest.approx(one.denoiser_params * (4 * 4 + 4) / GB)


def test_dmd_counts_every_forward_its_backward_keeps_alive():
    """A DMD micro-batch keeps several forwards' activations until one backward: the GAN term's forward through
    the fake score (and the discriminator's real side), the regression's student forward, the consistency
    regulariser's two; a reward tilt decodes with gradient."""
    sdxl = ROOT / "configs/dmd/sdxl_4step.yaml"
    plain = estimate(load_config(sdxl), 4).parts
    for overrides, times in (
        (["dmd.gan_weight=5e-3"], 2),
        (["dmd.divergence=js"], 2),  # the discriminator's real side, in the fake-score update
        (["dmd.regression_weight=1"], 2),
        (["dmd.gan_weight=5e-3", "dmd.regression_weight=1"], 3),
        (["dmd.consistency_weight=0.01"], 3),
    ):
        assert estimate(load_config(sdxl, overrides), 4).parts["activations"] == pytest.approx(
            plain["activations"] * times
        ), overrides
    tilted = estimate(load_config(sdxl, ["dmd.reward_beta=1", "reward={aesthetic: {weight: 1}}"]), 4).parts
    assert tilted["VAE decode"] > plain["VAE decode"]


@pytest.mark.parametrize(
    "path,variant,published",
    [
        ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "Wan 2.2 I2V A14B", 14_288_901_184),
        ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan 2.2 T2V A14B", 14_288_491_584),
        ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan 2.1 I2V 14B", 16_394_878_784),
        ("/models/wan_2_1_t2v_14b", "Wan 2.1 T2V 14B", 14_288_491_584),
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan 2.1 T2V 1.3B", 1_418_996_800),
    ],  # fmt: skip
)
def test_a_wan_checkpoints_name_picks_its_architecture(path, variant, published):
    """Wan 2.1 has one expert (I2V: plus CLIP image cross-attention, 16.39B, and a CLIP ViT-H image encoder);
    Wan 2.2 A14B has two of the same architecture. The name in model.path picks the variant."""
    from flowalign.memory import WAN_VARIANTS, architecture, wan_variant

    assert wan_variant(path) == variant
    arch = WAN_VARIANTS[variant]
    with torch.device("meta"):
        count = sum(p.numel() for p in arch.build().parameters())
    assert count == published
    assert arch.other_params.get("transformer_2", count) == count  # the second expert is the same network
    assert ("transformer_2" in arch.other_params) == variant.startswith("Wan 2.2")
    assert ("image_encoder" in arch.other_params) == (variant == "Wan 2.1 I2V 14B")
    config = load_config(ROOT / "configs/dmd/wan21_i2v_4step.yaml", [f"model.path={path}"])
    assert architecture(config) == (arch, f"{variant}, from the name in model.path")


def test_wan21_plan_has_no_second_expert_and_refuses_training_one():
    """The Wan 2.1 I2V DMD config is planned as Wan 2.1 (was: as Wan 2.2 A14B, with a second expert's 53 GiB);
    an unnamed Wan checkpoint is planned as Wan 2.2 A14B and says so; model.expert=both on Wan 2.1 names its key."""
    from flowalign.memory import architecture

    wan21 = ROOT / "configs/dmd/wan21_i2v_4step.yaml"
    one = estimate(load_config(wan21, ["train.sharding=fsdp"]), 1, processes=8)
    assert one.denoiser_params == 16_394_878_784 and "other expert weights" not in one.parts
    assert one.architecture == "Wan 2.1 I2V 14B, from the name in model.path"
    unnamed = load_config(wan21, ["model.path=/models/my-video-model"])
    assert (
        "Wan 2.2 I2V A14B, the family's default: model.path names no Wan version" in architecture(unnamed)[1]
    )
    with pytest.raises(ValueError, match=r"model.expert='both' trains transformer_2, which this model lacks"):
        estimate(load_config(wan21, ["model.expert=both"]), 1)
    with pytest.raises(ValueError, match=r"names Wan 2.2 TI2V, which flowalign does not train"):
        architecture(load_config(wan21, ["model.path=Wan-AI/Wan2.2-TI2V-5B-Diffusers"]))


@pytest.mark.parametrize("family,config", [("wan", "dmd/tiny_wan_i2v"), ("wan22", "dmd/tiny_wan_i2v"),
                                           ("sd3", "dmd/tiny_sd3"), ("sdxl", "dmd/tiny_sd3")])  # fmt: skip
def test_a_local_checkpoint_is_planned_from_its_own_configs(tmp_path, family, config):
    """A local diffusers directory is read, not assumed: its denoiser is built from its own config and every other
    component counted from its config, equal to the saved pipeline's counts (a tiny one saved here)."""
    from flowalign.memory import architecture
    from flowalign.models.tiny import tiny_pipeline

    pipe = tiny_pipeline(family)
    pipe.save_pretrained(tmp_path)
    name = "wan" if family.startswith("wan") else family
    arch, source = architecture(
        load_config(ROOT / f"configs/{config}.yaml", [f"model.path={tmp_path}", f"model.family={name}"])
    )
    assert source == f"{tmp_path}: read from model_index.json and the components' configs"
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    with torch.device("meta"):
        built = sum(p.numel() for p in arch.build().parameters())
    assert built == sum(p.numel() for p in denoiser.parameters())
    others = {k: sum(p.numel() for p in v.parameters()) for k, v in pipe.components.items()
              if isinstance(v, torch.nn.Module) and v is not denoiser}  # fmt: skip
    assert arch.other_params == others
    assert ("transformer_2" in others) == (family == "wan22")
    assert ("image_encoder" in others) == (family == "wan")


def test_a_local_checkpoint_with_a_missing_config_is_one_clear_error(tmp_path):
    """A partly downloaded diffusers directory (a component's config.json missing) names model.path and what
    to do, instead of a traceback from deep inside transformers."""
    from flowalign.memory import architecture
    from flowalign.models.tiny import tiny_pipeline

    tiny_pipeline("wan").save_pretrained(tmp_path)
    (tmp_path / "text_encoder" / "config.json").unlink()
    config = load_config(
        ROOT / "configs/dmd/tiny_wan_i2v.yaml", [f"model.path={tmp_path}", "model.family=wan"]
    )
    with pytest.raises(
        ValueError, match=r"is a diffusers directory whose components cannot all be read \(OSError"
    ):
        architecture(config)
