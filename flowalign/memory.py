"""Per-GPU memory of a training config at real size, without the weights: ``flowalign plan CONFIG``.

The real architectures (SD3.5-Medium, FLUX.1-dev, SDXL, SD1.5; for the ``wan`` family the Wan 2.1 or 2.2
checkpoint that ``model.path``'s name names, :data:`WAN_VARIANTS`, else Wan 2.2 I2V A14B) are built on the
``meta`` device from their published configs (no weights, no memory), so parameter counts are exact. A local
diffusers directory is read instead: its denoiser and components are built from their own configs
(:func:`architecture`; SD3.5 Large, FLUX.1-schnell and fine-tunes are then exact too). Videos (``wan``) have
``model.num_frames`` frames (default 81) of ``model.resolution`` squared (default 480, about the area of Wan's
832x480). Per process:

- **weights**: every pipeline component in ``model.dtype`` (the denoiser, its text encoders and the VAE;
  text-encoder and VAE sizes are the published checkpoints' parameter counts, :data:`ARCHITECTURES`);
  under ``train.sharding=fsdp`` the denoiser's share is ``1 / processes``.
- **trainable state**: the trainable parameters (LoRA on the config's target modules, counted on the meta
  model, or the whole denoiser) in float32, their gradients (float32) and AdamW's two moments; plus one
  float32 copy per kept policy (the evaluation EMA, NFT's old policy, DPO's reference snapshot). Sharded by
  FSDP.
- **DMD** (``train.algorithm: dmd``): the fake score's trainable state, as large as the student's; with
  ``lora_rank: 0`` also the teacher, a frozen float32 copy of the denoiser; a LoRA fake score shares the
  student's frozen base, except under FSDP, where it holds a second set of shards.
- **VAE decode**: decoding the micro-batch: the decoder's saved activations under reward backprop,
  otherwise its transient peak (largest layer input + output) where it exceeds the training activations
  (Wan: under reward backprop, :func:`flowalign.models.wan.checkpointed_decode`'s peak: every frame's
  feature cache plus one frame's activations). With ``model.cpu_offload`` (Wan) the text encoder and the
  frozen expert wait on the CPU and are not counted (they visit the GPU one at a time, outside the backward
  pass, when the trained expert's activations are not alive).
- **activations**: the bytes autograd saves for backward in one training forward of the denoiser on one
  micro-batch at the config's resolution, measured by running the meta model under
  ``torch.autograd.graph.saved_tensors_hooks`` (classifier-free guidance doubles GRPO's batch; reward
  backprop keeps ``backprop.k`` steps). With gradient checkpointing only each block's inputs are kept,
  plus one block's activations while it is recomputed. A margin of 10% of the total covers allocator
  fragmentation and temporaries not saved for backward.

What it does not count: the reward models (and, under reward backprop, their activations) (user weights of unknown size; add them with
``--extra-gb``), the rollout's stored latents (``[B, steps + 1, C, h, w]`` float32, small), and CUDA
context / kernels (~1 GB, inside the margin on 80 GB cards). ``benchmarks/perf/memory_table.py``
writes the table for every shipped config and checks the activation count against a real CPU run.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowalign.train.sharding import blocks

__all__ = [
    "ARCHITECTURES", "WAN_VARIANTS", "MemoryEstimate", "activation_bytes", "architecture", "estimate",
    "largest_micro_batch", "wan_variant",
]  # fmt: skip

GB = 1024**3
MARGIN = 0.10


def _sd3_medium():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    )  # fmt: skip


def _flux_dev():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    )  # fmt: skip


def _wan(
    in_channels: int = 36, image_dim: int | None = None, heads: int = 40, layers: int = 40, ffn: int = 13824
):
    """A Wan transformer at real size: one expert of Wan 2.2 A14B by default (``Wan-AI/Wan2.2-I2V-A14B-Diffusers``'
    config); Wan 2.1 I2V adds CLIP image cross-attention (``image_dim`` 1280, ``added_kv_proj_dim`` 5120, diffusers'
    ``scripts/convert_wan_to_diffusers.py``); text-to-video models see 16 channels; Wan 2.1 T2V 1.3B is 12
    heads, 30 layers, FFN 8960."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=in_channels,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else heads * 128, rope_max_seq_len=1024,
    )  # fmt: skip


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


@dataclass(frozen=True)
class Architecture:
    """A family's real-size pipeline: the denoiser built from its published config, and the parameter
    counts of the other components (published checkpoints; ``text_tokens`` as the pipelines pad)."""

    build: Callable[[], nn.Module]
    other_params: dict[str, int]
    latent_channels: int
    vae_factor: int
    text_tokens: int
    text_dim: int
    pooled_dim: int
    lora_targets: tuple[str, ...]
    resolution: int = 1024  # the default of model.resolution


# The Wan checkpoints, by name. Published components: UMT5-XXL encoder 5680.9M and the Wan VAE 126.9M in all;
# Wan 2.2 A14B's second expert (transformer_2, the same architecture); Wan 2.1 I2V's CLIP ViT-H/14 image
# encoder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision tower as CLIPVisionModel, 630.8M). The transformer's
# input: 16 latent channels, plus 4 mask and 16 first-frame channels for image-to-video.
def _wan_checkpoint(build: Callable[[], nn.Module], **components: int) -> Architecture:
    others = {**components, "text_encoder": 5_680_910_336, "vae": 126_892_531}
    return Architecture(build, others, 36, 8, 512, 4096, 0, ("to_q", "to_k", "to_v", "to_out.0"), 480)


WAN_VARIANTS: dict[str, Architecture] = {
    "Wan 2.2 I2V A14B": _wan_checkpoint(_wan, transformer_2=14_288_901_184),
    "Wan 2.2 T2V A14B": _wan_checkpoint(partial(_wan, 16), transformer_2=14_288_491_584),
    "Wan 2.1 I2V 14B": _wan_checkpoint(partial(_wan, 36, 1280), image_encoder=630_766_080),
    "Wan 2.1 T2V 14B": _wan_checkpoint(partial(_wan, 16)),
    "Wan 2.1 T2V 1.3B": _wan_checkpoint(partial(_wan, 16, None, 12, 30, 8960)),
}

ARCHITECTURES: dict[str, Architecture] = {
    # stabilityai/stable-diffusion-3.5-medium: CLIP-L 123.7M, CLIP-G 694.7M, T5-XXL encoder 4762.3M, VAE 83.8M.
    "sd3": Architecture(
        _sd3_medium,
        {
            "text_encoder": 123_650_304,
            "text_encoder_2": 694_659_840,
            "text_encoder_3": 4_762_310_656,
            "vae": 83_819_683,
        },
        16,
        8,
        333,
        4096,
        2048,
        ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    ),  # fmt: skip
    # black-forest-labs/FLUX.1-dev: CLIP-L 123.1M, T5-XXL encoder 4762.3M, VAE 83.8M.
    "flux": Architecture(
        _flux_dev,
        {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683},
        16,
        8,
        512,
        4096,
        768,
        ("to_q", "to_k", "to_v", "to_out.0"),
    ),  # fmt: skip
    # stabilityai/stable-diffusion-xl-base-1.0: CLIP-L 123.1M, OpenCLIP-G 694.7M, VAE 83.7M.
    "sdxl": Architecture(
        _sdxl_unet,
        {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
        4,
        8,
        77,
        2048,
        1280,
        ("to_q", "to_k", "to_v", "to_out.0"),
    ),  # fmt: skip
    # Wan: one expert of Wan 2.2 I2V A14B; the other checkpoints in WAN_VARIANTS, chosen by architecture().
    "wan": WAN_VARIANTS["Wan 2.2 I2V A14B"],
    # stable-diffusion-v1-5: CLIP-L 123.1M, VAE 83.7M.
    "sd": Architecture(
        _sd15_unet,
        {"text_encoder": 123_060_480, "vae": 83_653_863},
        4,
        8,
        77,
        768,
        0,
        ("to_q", "to_k", "to_v", "to_out.0"),
    ),  # fmt: skip
}


_DEFAULTS = {"sd3": "SD3.5-Medium", "flux": "FLUX.1-dev", "sdxl": "SDXL base 1.0", "sd": "SD1.5"}


def wan_variant(path: str) -> str | None:
    """The :data:`WAN_VARIANTS` entry that a Wan checkpoint's name (``model.path``) names, or None when it names no
    version: ``Wan2.1`` / ``Wan2.2`` (any separator), ``T2V`` (else image-to-video), ``1.3B``; ``"Wan 2.2 TI2V"``
    (not in :data:`WAN_VARIANTS`: flowalign does not train it) for a TI2V name."""
    name = re.sub(r"[^a-z0-9.]", "", str(path).lower())
    if "ti2v" in name:
        return "Wan 2.2 TI2V"
    version = re.search(r"wan2\.?([12])", name)
    if version is None:
        return None
    task = "T2V" if "t2v" in name else "I2V"
    if version.group(1) == "2":
        return f"Wan 2.2 {task} A14B"
    return "Wan 2.1 T2V 1.3B" if "1.3b" in name and task == "T2V" else f"Wan 2.1 {task} 14B"


def _component_params(directory: Path, library: str, name: str) -> int | None:
    """The parameter count of one pipeline component saved in ``directory`` (built on the meta device from its
    ``config.json``), or None for what has no weights (schedulers, tokenizers, processors)."""
    import diffusers
    import transformers

    if library == "diffusers":
        cls = getattr(diffusers, name, None)
        if cls is None or not issubclass(cls, diffusers.ModelMixin):
            return None
        with torch.device("meta"):
            module = cls.from_config(cls.load_config(directory))
    elif library == "transformers":
        cls = getattr(transformers, name, None)
        if cls is None or not issubclass(cls, transformers.PreTrainedModel):
            return None
        if not (directory / "config.json").is_file():  # from_pretrained would return the class's defaults
            raise OSError(f"{directory / 'config.json'} is missing")
        config = cls.config_class.from_pretrained(directory)
        with torch.device("meta"):
            module = cls(config)
    else:
        return None
    return sum(p.numel() for p in module.parameters())


def architecture(config: Any) -> tuple[Architecture, str]:
    """The real-size architecture that ``config`` (a :class:`flowalign.config.Config`) trains, and where it came
    from, in words. A local diffusers directory (``model_index.json``) is read: its denoiser is built from its
    own config and every other component counted from its config (SD3.5 Large, FLUX.1-schnell, a fine-tune, Wan
    2.1 or 2.2: exact). Otherwise the family's published architecture; a Wan checkpoint's version and task
    are read from its name (:func:`wan_variant`)."""
    m = config.model
    family = m.family
    if family not in ARCHITECTURES:
        raise ValueError(
            f"flowalign plan: model.family={family!r} has no real-size architecture here; known: {sorted(ARCHITECTURES)}."
        )
    base = ARCHITECTURES[family]
    directory = Path(m.path)
    if (directory / "model_index.json").is_file():
        index = json.loads((directory / "model_index.json").read_text())
        key = "unet" if "unet" in index else "transformer"
        import diffusers

        cls = getattr(diffusers, index[key][1])
        others = {}
        try:
            denoiser = cls.load_config(directory / key)
            for part, spec in index.items():
                if part.startswith("_") or part == key or not isinstance(spec, list) or None in spec:
                    continue
                count = _component_params(directory / part, *spec)
                if count is not None:
                    others[part] = count
        except (OSError, ValueError) as error:  # a component's config.json missing or unreadable
            raise ValueError(
                f"flowalign plan: model.path={str(directory)!r} is a diffusers directory whose components cannot "
                f"all be read ({type(error).__name__}: {str(error).splitlines()[0]}); complete the download, or "
                "point model.path at the hub id to plan the family's published architecture."
            ) from error
        built = replace(base, build=lambda: cls.from_config(denoiser), other_params=others)
        return built, f"{directory}: read from model_index.json and the components' configs"
    if family == "wan":
        variant = wan_variant(m.path)
        if variant == "Wan 2.2 TI2V":
            raise ValueError(
                f"flowalign plan: model.path={m.path!r} names Wan 2.2 TI2V, which flowalign does not train "
                "(per-token timesteps); use a Wan 2.1 or Wan 2.2 A14B model."
            )
        if variant is None:
            return base, (
                "Wan 2.2 I2V A14B, the family's default: model.path names no Wan version (Wan2.1 / Wan2.2); "
                "point it at the local diffusers directory for exact counts"
            )
        return WAN_VARIANTS[variant], f"{variant}, from the name in model.path"
    return (
        base,
        f"{_DEFAULTS[family]}, the family's published architecture (a local model.path is read exactly)",
    )


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _forward(
    family: str, net: nn.Module, batch: int, resolution: int, dtype: torch.dtype, device: str = "meta",
    frames: int = 1,
) -> Callable[[], Any]:  # fmt: skip
    arch = ARCHITECTURES[family]
    side = resolution // arch.vae_factor
    kw = {"device": device, "dtype": dtype}
    t = torch.ones(batch, device=device, dtype=dtype)
    if family == "wan":  # [B, C, T, h, w], T = (frames - 1) / 4 + 1 latent frames, C = 36 (I2V) or 16 (T2V)
        x = torch.randn(batch, net.config.in_channels, (frames - 1) // 4 + 1, side, side, **kw)
        text = torch.randn(batch, arch.text_tokens, net.config.text_dim, **kw)
        image = None  # Wan 2.1 I2V: the CLIP image encoder's 257 penultimate hidden states
        if net.config.image_dim is not None:
            image = torch.randn(batch, 257, net.config.image_dim, **kw)
        return lambda: net(hidden_states=x, timestep=t, encoder_hidden_states=text,
                           encoder_hidden_states_image=image, return_dict=False)[0]  # fmt: skip
    text = torch.randn(batch, arch.text_tokens, arch.text_dim, **kw)
    if family == "sd3":
        x = torch.randn(batch, arch.latent_channels, side, side, **kw)
        return lambda: net(hidden_states=x, timestep=t, encoder_hidden_states=text,
                           pooled_projections=torch.randn(batch, arch.pooled_dim, **kw)).sample  # fmt: skip
    if family == "flux":
        tokens = (side // 2) ** 2
        x = torch.randn(batch, tokens, 64, **kw)
        img_ids = torch.zeros(tokens, 3, **kw)
        txt_ids = torch.zeros(arch.text_tokens, 3, **kw)
        return lambda: net(hidden_states=x, timestep=t, guidance=t, encoder_hidden_states=text, img_ids=img_ids,
                           txt_ids=txt_ids, pooled_projections=torch.randn(batch, arch.pooled_dim, **kw)).sample  # fmt: skip
    x = torch.randn(batch, arch.latent_channels, side, side, **kw)
    added = None
    if family == "sdxl":
        added = {
            "text_embeds": torch.randn(batch, arch.pooled_dim, **kw),
            "time_ids": torch.zeros(batch, 6, **kw),
        }
    return lambda: net(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample


class _FlashLikeAttention(torch.autograd.Function):
    """Attention that keeps for backward what flash / memory-efficient kernels keep (q, k, v, the output and
    the float32 log-sum-exp per query), not the ``N x N`` weights the meta device's math path would keep.
    Its values are never computed: it runs on ``meta`` tensors only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedAttentionMode(torch.overrides.TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` (without mask or dropout) of a meta forward to
    :class:`_FlashLikeAttention`, so the count matches the fused kernels the CPU and GPUs run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args)) | kwargs
            if named.get("attn_mask") is None and not named.get("dropout_p") and not named.get("is_causal"):
                return _FlashLikeAttention.apply(named["query"], named["key"], named["value"])
        return func(*args, **kwargs)


def _storage_counter(seen: set[int], total: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A saved-tensor pack hook adding to ``total[0]`` the bytes of each storage autograd keeps alive: a saved
    view keeps its whole storage, and a storage saved by several operations (the output of one, the input
    of the next) counts once; storages in ``seen`` (the weights) do not count."""

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total[0] += storage.nbytes()
        return tensor

    return pack


def activation_bytes(
    family: str,
    net: nn.Module,
    batch: int,
    resolution: int,
    dtype: torch.dtype,
    checkpointing: bool,
    device: str = "meta",
    frames: int = 1,
) -> int:
    """Bytes saved for backward by one training forward of ``net`` (meta, with its trainable parameters
    marked) on ``batch`` samples: the storages autograd keeps alive, each counted once, other than the
    weights. With ``checkpointing``: the non-block parts, every block's inputs, and the
    largest block's own activations (it is recomputed, one block at a time, during backward)."""
    total, per_block, inputs = [0], [], [0]
    # Weights saved for backward (to form the input gradient) are resident anyway: not activations.
    seen = {t.untyped_storage()._cdata for t in (*net.parameters(), *net.buffers())}
    units = list(blocks(net))

    pack = _storage_counter(seen, total)

    def before(module, args, kwargs):
        module._flowalign_start = total[0]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        inputs[0] += sum(a.numel() * a.element_size() for a in tensors)

    def after(module, args, kwargs, output):
        per_block.append(total[0] - module._flowalign_start)

    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in units]
    handles += [b.register_forward_hook(after, with_kwargs=True) for b in units]
    try:
        fused = _FusedAttentionMode() if device == "meta" else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused:
            _forward(family, net, batch, resolution, dtype, device, frames)()
    finally:
        for h in handles:
            h.remove()
    if not checkpointing or not per_block:
        return total[0]
    return total[0] - sum(per_block) + inputs[0] + max(per_block)


def _vae(latent_channels: int) -> nn.Module:
    """The SD / SDXL (4 latent channels) or SD3 / FLUX (16) ``AutoencoderKL`` at real size."""
    from diffusers import AutoencoderKL

    blocks = ("DownEncoderBlock2D",) * 4
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=blocks, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
        use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4,
    )  # fmt: skip


def wan_decode_bytes(
    frames: int, height: int, width: int, dtype: torch.dtype, grad: bool, checkpointed: bool = True
) -> dict[str, int]:
    """The Wan VAE decoding one ``frames``-frame video of ``height x width`` (meta device, real architecture):
    ``stock`` (with ``grad``: the bytes the stock decode saves for backward), and with ``checkpointed``
    (:func:`flowalign.models.wan.checkpointed_decode`) ``held`` (every frame's feature cache and the clamp's
    input, alive until backward) and ``frame`` (the largest frame's activations while recomputed); without
    ``grad``, ``peak``: the largest input + output of any decoder layer."""
    from diffusers import AutoencoderKLWan

    from flowalign.models.wan import _decode_frame

    with torch.device("meta"):
        vae = AutoencoderKLWan().to(dtype).requires_grad_(False)
    weights = {t.untyped_storage()._cdata for t in vae.parameters()}
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta", dtype=dtype)
    if not grad:
        peak = [0]

        def layer(module, args, output):
            tensors = [a for a in (*args, output) if isinstance(a, torch.Tensor)]
            peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in tensors))

        handles = [m.register_forward_hook(layer) for m in vae.decoder.modules() if not list(m.children())]
        try:
            with torch.no_grad(), _FusedAttentionMode():
                vae.decode(z)
        finally:
            for h in handles:
                h.remove()
        return {"peak": peak[0]}
    z.requires_grad_(True)
    out = {}
    if not checkpointed:
        total = [0]
        with torch.autograd.graph.saved_tensors_hooks(_storage_counter(set(weights), total), lambda t: t):
            with _FusedAttentionMode():
                vae.decode(z)
        out["stock"] = total[0]
        return out
    x = vae.post_quant_conv(z)
    cache: list = [None] * vae._cached_conv_counts["decoder"]
    held, frame = 3 * frames * height * width * _bytes(dtype), 0
    for i in range(x.shape[2]):
        held += sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor))
        one = [0]
        with torch.autograd.graph.saved_tensors_hooks(_storage_counter(set(weights), one), lambda t: t):
            with _FusedAttentionMode():
                _, *cache = _decode_frame(vae.decoder, x[:, :, i : i + 1], i == 0, *cache)
        frame = max(frame, one[0])
    return {"held": held, "frame": frame}


def decode_bytes(
    family: str, batch: int, resolution: int, dtype: torch.dtype, grad: bool, frames: int = 1
) -> int:
    """VAE decoding of ``batch`` latents at ``resolution``: with ``grad`` (reward backprop) the bytes saved
    for backward; without, the largest input + output of any single layer (the transient peak). Wan
    videos (``frames``): :func:`wan_decode_bytes`, checkpointed under ``grad``, the samples one after another."""
    if family == "wan":
        counts = wan_decode_bytes(frames, resolution, resolution, dtype, grad)
        return counts["held"] * batch + counts["frame"] if grad else counts["peak"]
    arch = ARCHITECTURES[family]
    with torch.device("meta"):
        vae = _vae(arch.latent_channels).to(dtype).requires_grad_(False)
    side = resolution // arch.vae_factor
    z = torch.randn(batch, arch.latent_channels, side, side, device="meta", dtype=dtype, requires_grad=grad)
    if grad:
        total = [0]
        pack = _storage_counter({t.untyped_storage()._cdata for t in vae.parameters()}, total)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionMode():
            vae.decode(z)
        return total[0]
    peak = [0]

    def layer(module, args, output):
        tensors = [a for a in (*args, output) if isinstance(a, torch.Tensor)]
        peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in tensors))

    leaves = [m for m in vae.decoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(layer) for m in leaves]
    try:
        with torch.no_grad(), _FusedAttentionMode():
            vae.decode(z)
    finally:
        for h in handles:
            h.remove()
    return peak[0]


@dataclass
class MemoryEstimate:
    """GiB per process for one config and micro-batch; :attr:`total` includes the margin."""

    family: str
    micro_batch: int
    processes: int
    parts: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    denoiser_params: int = 0
    architecture: str = ""  # which architecture, and from where (:func:`architecture`)

    @property
    def total(self) -> float:
        return sum(self.parts.values()) * (1 + MARGIN)


def _lora_params(net: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA A and B of every targeted ``nn.Linear`` (peft's module-name suffix matching)."""
    count = 0
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            count += rank * (module.in_features + module.out_features)
    return count


def dmd_forwards_alive(d: Any) -> int:
    """How many denoiser forwards with gradient a DMD micro-batch keeps alive until its backward (``d``: the
    ``dmd`` config), the larger of its two phases. The fake-score update: its denoising forward, the
    discriminator's forward on the real side, and two for the consistency regulariser. The generator step:
    the student's last step, the GAN term's forward through the fixed fake score, and the regression's
    student forward. (The teacher's and the fake score's predictions are made without gradient; the
    discriminator head, a width x width MLP, is left out.)"""
    discriminating = d.gan_weight > 0 or d.divergence != "rkl"
    fake = 1 + int(discriminating) + 2 * int(d.consistency_weight > 0)
    generator = 1 + int(d.gan_weight > 0) + int(d.regression_weight > 0)
    return max(fake, generator)


def estimate(
    config: Any,
    micro_batch: int,
    processes: int = 1,
    net: nn.Module | None = None,
    resolved: tuple[Architecture, str] | None = None,
) -> MemoryEstimate:
    """The memory of ``config`` (a :class:`flowalign.config.Config`) per process at ``micro_batch``
    samples per denoiser call, on ``processes`` processes (see the module docstring); ``net`` and
    ``resolved`` (:func:`architecture`'s answer) save rebuilding them for each micro-batch."""
    m, t = config.model, config.train
    family = m.family
    arch, source = resolved or architecture(config)
    dtype = getattr(torch, m.dtype)
    if net is None:
        with torch.device("meta"):
            net = arch.build()
    denoiser = sum(p.numel() for p in net.parameters())
    trainable = (
        _lora_params(net, m.lora_rank, tuple(m.lora_targets or arch.lora_targets))
        if m.lora_rank
        else denoiser
    )
    shard = processes if t.sharding == "fsdp" else 1
    size = _bytes(dtype)
    copies = int(t.ema_decay is not None) + int(t.algorithm == "nft")
    copies += int(t.algorithm == "dpo" and (config.dpo.ref_refresh_every > 0 or not m.lora_rank))
    resolution = m.resolution or arch.resolution
    frames = (m.num_frames or 81) if family == "wan" else 1
    batch = micro_batch * (2 if t.algorithm == "grpo" and config.sampling.guidance > 1 else 1)
    experts = 2 if m.expert == "both" else 1  # Wan 2.2: both experts train (the same architecture)
    if m.expert not in (None, "high") and "transformer_2" not in arch.other_params:
        raise ValueError(
            f"flowalign plan: model.expert={m.expert!r} trains transformer_2, which this model lacks (planned as "
            f"{source}; Wan 2.1 has one expert): use model.expert=high, or a Wan 2.2 A14B model.path."
        )
    trainable *= experts
    net.requires_grad_(False)
    for name, p in net.named_parameters():
        trained = not m.lora_rank or any(
            f"{target}." in name for target in (m.lora_targets or arch.lora_targets)
        )
        p.requires_grad_(trained)
    net.to(dtype)
    act = activation_bytes(family, net, batch, resolution, dtype, m.gradient_checkpointing, frames=frames)
    if t.algorithm == "backprop" and not config.backprop.checkpoint:
        act *= max(1, config.backprop.k)  # every differentiated step's activations stay alive
    # (with backprop.checkpoint each step keeps only its input latent and is recomputed alone: one step's)
    if t.algorithm == "dmd":
        act *= dmd_forwards_alive(config.dmd)
    # Decoding: with reward backprop (and DMD's reward tilt or perceptual regression) the decoder's activations
    # live next to the rollout's; otherwise decoding happens before the training forward and only its excess
    # over the training activations adds up.
    backprop = t.algorithm == "backprop" or (
        t.algorithm == "dmd" and (config.dmd.reward_beta > 0 or config.dmd.regression_loss != "mse")
    )
    decode = decode_bytes(family, micro_batch, resolution, dtype, grad=backprop, frames=frames)
    others = dict(arch.other_params)
    second = others.pop("transformer_2", 0)  # Wan 2.2's other expert: frozen, or trained too (experts == 2)
    if m.cpu_offload:  # the idle frozen modules wait on the CPU (WanAdapter.cpu_offload)
        if family != "wan":
            raise ValueError(f"flowalign plan: model.cpu_offload is for the wan family, not {family!r}.")
        others.pop("text_encoder", None)
        second = 0
    parts = {
        "denoiser weights": denoiser * experts * size / shard / GB,
        "text encoders + VAE": sum(others.values()) * size / GB,
        "trainable (fp32) + grads + AdamW": trainable * 4 * 4 / shard / GB,
        "policy copies (EMA, old, reference)": trainable * 4 * copies / shard / GB,
        "activations": act / GB,
        "VAE decode": (decode if backprop else max(0, decode - act)) / GB,
    }
    if t.algorithm == "dmd":
        # DMD's fake score trains like the student; a full-weight teacher is a frozen copy.
        # With model.expert: both (Wan 2.2) the copies hold both experts.
        dmd = trainable * 4 * 4 / shard
        if not m.lora_rank:
            dmd += denoiser * experts * 4 / shard
        elif shard > 1:  # the fake score's frozen base: shared unsharded, a second set of shards under FSDP
            dmd += denoiser * experts * size / shard
        parts["DMD fake score (+ teacher copy)"] = dmd / GB
    if second:
        parts["other expert weights"] = second * size / GB if experts == 1 else 0.0
    if not m.lora_rank:  # the trainable float32 weights replace the dtype copy of the denoiser
        parts["denoiser weights"] = 0.0
    return MemoryEstimate(family, micro_batch, processes, parts, trainable, denoiser, source)


def largest_micro_batch(
    config: Any, gpu_gb: float, processes: int = 1, extra_gb: float = 0.0, limit: int = 256
):
    """The largest micro-batch (powers of two up to ``limit``) whose estimate fits ``gpu_gb``, with every
    estimate made: ``(best or None, [MemoryEstimate, ...])``."""
    resolved = architecture(config)
    with torch.device("meta"):
        net = resolved[0].build()
    rows, best = [], None
    for k in range(int(math.log2(limit)) + 1):
        row = estimate(config, 2**k, processes, net=net, resolved=resolved)
        row.parts["extra (--extra-gb)"] = extra_gb
        rows.append(row)
        if row.total > gpu_gb:
            break
        best = 2**k
    return best, rows
