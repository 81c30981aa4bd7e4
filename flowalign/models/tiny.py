"""Tiny random diffusers pipelines of every family, built in code: no download, seconds on a CPU.

Like diffusers' own ``get_dummy_components``: each component seeded with ``torch.manual_seed`` before it
is built, a layer or two, a character-level CLIP tokenizer written to a temporary directory. They exist
for tests, benchmarks and the no-download demo; their images are noise-like because the weights are
random.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

__all__ = ["TINY_FAMILIES", "evaluated", "tiny_pipeline", "tiny_tokenizer"]

TINY_FAMILIES = ("sd3", "flux", "sd", "sdxl", "wan", "wan22", "wan-t2v", "wan22-t2v")
_MAX_TOKENS = 64


def tiny_tokenizer(max_length: int = _MAX_TOKENS):
    """A character-level CLIP BPE tokenizer (no merges) with ids below 100."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,'\"!?-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    # The tokenizer reads its files when built; the folder goes with the call (one per call was left in /tmp).
    with tempfile.TemporaryDirectory(prefix="flowalign-tokenizer-") as folder:
        directory = Path(folder)
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(directory / "vocab.json"),
            str(directory / "merges.txt"),
            model_max_length=max_length,
            pad_token="<|endoftext|>",
        )


def _clip_config(hidden: int = 16, projection: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=32,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=100, max_position_embeddings=_MAX_TOKENS,
        projection_dim=projection, hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(vocab_size=100, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)
    )  # fmt: skip


def _vae(levels: int, latent_channels: int, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    channels = (4, 8)[:levels]
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=latent_channels, norm_num_groups=2 if levels > 1 else 1, sample_size=32, **kwargs,
    )  # fmt: skip


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(2, 4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tiny_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(32), tokenizer_3=tiny_tokenizer(),
    )  # fmt: skip


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(2, 4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tiny_tokenizer(), text_encoder_2=_t5(32), tokenizer_2=tiny_tokenizer(),
    )  # fmt: skip


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip


def _unet(cross_attention_dim: int, **kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=4, **kwargs,
    )  # fmt: skip


def _sd():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    return StableDiffusionPipeline(
        unet=_unet(16), scheduler=_ddim(), vae=_vae(2, 4), text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _sdxl():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _unet(
        32, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, transformer_layers_per_block=(1, 1),
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=_ddim(), vae=_vae(2, 4), text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(), force_zeros_for_empty_prompt=True,
    )  # fmt: skip


def _wan_transformer(seed: int, image_dim: int | None, in_channels: int = 36):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=image_dim, added_kv_proj_dim=None if image_dim is None else 24,
    )  # fmt: skip


def _wan_parts():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)  # spatial x8 (3 down levels), temporal x4: the config's scale factors 8 and 4
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=100, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)
    )  # fmt: skip
    return dict(
        tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip


def _wan():
    """Wan 2.1 I2V style: one expert, a CLIP image encoder (17 image tokens at 32x32)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, intermediate_size=16, patch_size=8)
    )  # fmt: skip
    return WanImageToVideoPipeline(
        **_wan_parts(), image_encoder=image_encoder, image_processor=CLIPImageProcessor(crop_size=32, size=32),
        transformer=_wan_transformer(0, image_dim=4),
    )  # fmt: skip


def _wan22():
    """Wan 2.2 I2V A14B style: two experts switched at boundary_ratio 0.9, no image encoder."""
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline(
        **_wan_parts(), transformer=_wan_transformer(0, None), transformer_2=_wan_transformer(1, None),
        boundary_ratio=0.9,
    )  # fmt: skip


def _wan_t2v():
    """Wan 2.1 T2V style: one expert seeing ``x_t`` alone (16 channels)."""
    from diffusers import WanPipeline

    return WanPipeline(**_wan_parts(), transformer=_wan_transformer(0, None, in_channels=16))


def _wan22_t2v():
    """Wan 2.2 T2V A14B style: two experts switched at boundary_ratio 0.875 (the A14B T2V checkpoint's)."""
    from diffusers import WanPipeline

    return WanPipeline(
        **_wan_parts(), transformer=_wan_transformer(0, None, in_channels=16),
        transformer_2=_wan_transformer(1, None, in_channels=16), boundary_ratio=0.875,
    )  # fmt: skip


def tiny_pipeline(family: str):
    """A seeded tiny random pipeline of ``family`` (one of :data:`TINY_FAMILIES`), images 32x32 (``wan``: Wan 2.1
    image-to-video, ``wan22``: Wan 2.2 A14B with two experts; ``wan-t2v``, ``wan22-t2v``: their text-to-video
    counterparts)."""
    builders = {"sd3": _sd3, "flux": _flux, "sd": _sd, "sdxl": _sdxl, "wan": _wan, "wan22": _wan22,
                "wan-t2v": _wan_t2v, "wan22-t2v": _wan22_t2v}  # fmt: skip
    if family not in builders:
        raise ValueError(f"no tiny pipeline for family {family!r}; choose one of {TINY_FAMILIES}.")
    return evaluated(builders[family]())


def evaluated(pipeline):
    """``pipeline`` with every module in eval mode, as ``from_pretrained`` leaves them (no dropout)."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline
