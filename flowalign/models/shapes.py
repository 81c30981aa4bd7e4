"""The shapes world's text-to-image flow model: a pixel-space ``UNet2DConditionModel``, a tiny CLIP text
encoder and a word-level tokenizer, wrapped in :class:`ShapesPipeline` and adapted by :class:`ShapesAdapter`.

**Flow matching in pixel space** (rectified flow; Liu et al. 2022, Lipman et al. 2022; the SD3
parameterization of Esser et al. 2024, Sec. 2): an image in ``[0, 1]`` is scaled to ``x0 = 2 image - 1``,
noised as ``x_sigma = (1 - sigma) x0 + sigma eps`` and the network predicts the velocity ``v = eps - x0``
at model time ``1000 sigma``. There is no VAE. With ``patch_size p > 1`` the latent is the space-to-depth
rearrangement of the pixels (``pixel_unshuffle``: ``[3, 32, 32] -> [3 p^2, 32 / p, 32 / p]``), a lossless
reshuffle, not a learned autoencoder: the UNet then runs at ``1 / p`` resolution, which is what makes
this model fast on a CPU (see the model card, ``assets/shapes/model/README.md``, for the measurements).

**Text.** A word-level ``tokenizers`` model over the shapes world's vocabulary (:data:`VOCABULARY`),
wrapped in a ``transformers`` fast tokenizer, ``[BOS] words [EOS]`` padded to ``max_length``; a tiny
``CLIPTextModel`` whose last hidden states are the UNet's cross-attention context. The empty prompt is
the unconditional input of classifier-free guidance (trained with caption dropout). A prompt with a word
outside the vocabulary is an error, not a silent ``[UNK]``.

Everything saves and loads with ``save_pretrained`` / ``ShapesPipeline.from_pretrained`` offline, and
:func:`flowalign.models.load_model` recognises the directory by its ``model_index.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from torch import Tensor

from flowalign.models.base import ModelAdapter
from flowalign.samplers.schedules import Schedule, flow_schedule

__all__ = [
    "SHIPPED_MODEL",
    "VOCABULARY",
    "ShapesAdapter",
    "ShapesArchitecture",
    "ShapesPipeline",
    "UnknownWordError",
    "build_shapes_pipeline",
    "shapes_tokenizer",
]

# The pretrained shapes-world model shipped with the repository (card: its README.md); ``load_model("shapes")``.
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "shapes" / "model"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


# The shapes world's words (models import nothing from `rewards`; a test checks these equal the sprites'
# SHAPES and COLORS, in the same order, which fixes the shipped tokenizer's ids).
SHAPE_WORDS = ("circle", "square", "triangle", "diamond")
COLOR_WORDS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white")


def _vocabulary() -> tuple[str, ...]:
    SHAPES, COLORS = SHAPE_WORDS, COLOR_WORDS  # noqa: N806
    numbers = ("two", "three", "four")
    plurals = tuple(f"{s}es" if s.endswith("s") else f"{s}s" for s in SHAPES)
    glue = ("a", "an", "photo", "of", "and", "left", "right", "above", "below", ".", ",")
    return (*SPECIAL_TOKENS, *glue, *SHAPES, *plurals, *COLORS, *numbers)


VOCABULARY: tuple[str, ...] = _vocabulary()
"""Token strings, id = index: the special tokens, then every word of the shapes world's GenEval prompts."""


class UnknownWordError(ValueError):
    """A prompt uses a word outside the shapes model's vocabulary or is too long."""


def shapes_tokenizer(max_length: int = 16, vocabulary: Sequence[str] = VOCABULARY):
    """A word-level fast tokenizer over ``vocabulary`` (:data:`VOCABULARY`; it starts with
    :data:`SPECIAL_TOKENS`): lower-cased, whitespace/punctuation split, ``[BOS] ... [EOS]``, pad id 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
    )


@dataclass(frozen=True)
class ShapesArchitecture:
    """Sizes of a shapes model (defaults: the shipped model).

    Attributes:
        block_out_channels: UNet channels per resolution level.
        cross_attention: per level, whether it has self- and cross-attention transformer blocks.
        layers_per_block: ResNet layers per down block (up blocks have one more, as in diffusers).
        norm_num_groups: GroupNorm groups.
        attention_head_dim: channels per attention head (the UNet gets ``channels // this`` heads).
        patch_size: space-to-depth factor ``p`` of the latent (1 = plain pixels).
        resolution: image side in pixels.
        text_hidden, text_layers, text_heads, text_intermediate: the CLIP text encoder.
        max_length: tokens per prompt, ``[BOS]`` and ``[EOS]`` included.
        shift: the scheduler's static timestep shift for sampling.
        pooled_text: also add an attention-pooled text embedding to the timestep embedding
            (diffusers' ``addition_embed_type="text"``, as in unCLIP/Imagen), so every ResNet block is
            conditioned on the prompt, not only the attention levels.
        token_embedding_std: init std of the text encoder's token embeddings. CLIP's default (0.02) leaves
            a random encoder's outputs for "blue" and "yellow" at cosine 0.95 and in our runs they did not
            separate in training (colour prompts stayed at chance); std 1 makes each word's identity
            dominate its position's output from the start.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 96)
    cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 16
    patch_size: int = 2
    resolution: int = 32
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 256
    max_length: int = 16
    shift: float = 3.0
    pooled_text: bool = True
    token_embedding_std: float = 1.0

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != len(self.cross_attention):
            raise ValueError(
                f"block_out_channels {self.block_out_channels} and cross_attention {self.cross_attention} "
                "must have one entry per UNet level."
            )
        if self.resolution % (self.patch_size * 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(
                f"resolution {self.resolution} must be divisible by patch_size * 2^(levels - 1) = "
                f"{self.patch_size * 2 ** (len(self.block_out_channels) - 1)}."
            )


def build_shapes_pipeline(architecture: ShapesArchitecture | None = None, seed: int = 0) -> ShapesPipeline:
    """A randomly initialised shapes pipeline (each component seeded with ``torch.manual_seed(seed)``
    before it is built, as diffusers' ``get_dummy_components`` does)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = architecture or ShapesArchitecture()
    channels = 3 * arch.patch_size**2
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.cross_attention))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=arch.resolution // arch.patch_size, in_channels=channels, out_channels=channels,
        block_out_channels=arch.block_out_channels, layers_per_block=arch.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=arch.text_hidden,
        norm_num_groups=arch.norm_num_groups,
        # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads.
        attention_head_dim=tuple(max(1, c // arch.attention_head_dim) for c in arch.block_out_channels),
        addition_embed_type="text" if arch.pooled_text else None,
        addition_embed_type_num_heads=max(1, arch.text_hidden // arch.attention_head_dim),
    )  # fmt: skip
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(VOCABULARY), hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
            max_position_embeddings=arch.max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3,
            projection_dim=arch.text_hidden,
        )
    )  # fmt: skip
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=arch.token_embedding_std)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=arch.shift)
    return ShapesPipeline(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=shapes_tokenizer(arch.max_length),
        scheduler=scheduler,
        patch_size=arch.patch_size,
    )


class ShapesPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image flow pipeline of the shapes world (see the module docstring).

    ``pipeline(prompts, num_inference_steps=20, guidance_scale=1.5, generator=g)`` samples with the
    scheduler's Euler steps and classifier-free guidance over ``[negative; positive]``, like
    ``StableDiffusion3Pipeline``; ``output_type="pt"`` returns ``[B, 3, H, W]`` in ``[0, 1]``. LoRA loads
    with the stock ``load_lora_weights`` (the Stable Diffusion loader: ``unet`` and ``text_encoder``).
    """

    model_cpu_offload_seq = "text_encoder->unet"
    model_name = "shapes model"  # in unknown-word errors

    def __init__(self, unet, text_encoder, tokenizer, scheduler, patch_size: int = 1):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(patch_size=int(patch_size))

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """``[B, max_length]`` token ids; raises :class:`UnknownWordError` for out-of-vocabulary words or
        prompts longer than ``max_length`` tokens."""
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=False
        ).input_ids
        unk = self.tokenizer.unk_token_id
        for prompt, row in zip(prompts, ids):
            if unk in row:
                vocab = self.tokenizer.get_vocab()
                words = self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt.lower())
                unknown = sorted({w for w, _ in words if w not in vocab})
                known = sorted(vocab, key=vocab.get)[len(SPECIAL_TOKENS) :]
                raise UnknownWordError(
                    f"prompt {prompt!r} uses words outside the {self.model_name}'s vocabulary: {unknown}. "
                    f"Known words: {' '.join(known)}."
                )
            if len(row) > max_length:
                raise UnknownWordError(
                    f"prompt {prompt!r} is {len(row)} tokens with [BOS]/[EOS]; the {self.model_name} reads at most "
                    f"{max_length}."
                )
        return torch.tensor(ids, dtype=torch.long)

    def encode_prompt(self, prompts: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """``[B, max_length, text_hidden]``: the text encoder's last hidden states (differentiable)."""
        ids = self.tokenize(prompts).to(device or self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    def to_latents(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3 p^2, H / p, W / p]`` in ``[-1, 1]``."""
        x = images * 2 - 1
        return F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x

    def to_images(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`to_latents`, clamped to ``[0, 1]``."""
        x = F.pixel_shuffle(latents, self.patch_size) if self.patch_size > 1 else latents
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.5,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pt",
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.unet.device
        embeds = self.encode_prompt(prompts, device)
        cfg = guidance_scale > 1
        if cfg:
            embeds = torch.cat([self.encode_prompt([""] * len(prompts), device), embeds])
        size = self.unet.config.sample_size
        if latents is None:
            shape = (len(prompts), self.unet.config.in_channels, size, size)
            latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if cfg else latents
            v = self.unet(x.to(self.unet.dtype), t.expand(x.shape[0]), encoder_hidden_states=embeds).sample
            if cfg:
                uncond, text = v.chunk(2)
                v = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
        images = self.to_images(latents)
        if output_type == "pil":
            return [self.numpy_to_pil(im.permute(1, 2, 0).cpu().numpy()[None])[0] for im in images]
        return images


class ShapesAdapter(ModelAdapter):
    """The shapes model behind the adapter protocol: a flow model (``prediction_type="flow"``, velocity
    ``eps - x0``, model time ``1000 sigma``), sigmas from :func:`~flowalign.samplers.flow_schedule` with the
    scheduler's shift. Defaults are the settings measured best for the shipped model (model card)."""

    family = "shapes"
    pipeline_classes = ("ShapesPipeline",)
    pipeline_module = "flowalign.models.shapes"
    denoiser_name = "unet"
    kind = "flow"
    prediction_type = "flow"
    # Attention (self and cross) and the transformer blocks' feed-forward layers of the UNet.
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
    )
    default_steps = 20
    default_guidance = 1.5

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        return {"prompt_embeds": self.pipeline.encode_prompt(prompts, self.device)}

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        return self.net(x, timestep, encoder_hidden_states=embeds["prompt_embeds"], return_dict=False)[0]

    @property
    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * self.pipeline.patch_size

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        p = self.pipeline.patch_size
        factor = p * 2 ** (len(self.denoiser.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for this model, got {height}x{width}."
            )
        return (self.denoiser.config.in_channels, height // p, width // p)

    def schedule(
        self, num_steps: int, latent_shape: Sequence[int] | None = None, levels: Sequence[float] | None = None
    ) -> Schedule:
        config = self.pipeline.scheduler.config
        return flow_schedule(
            num_steps,
            shift=config.get("shift", 1.0),
            num_train_timesteps=config.num_train_timesteps,
            sigmas=levels,
        ).to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        return self.pipeline.to_images(latents)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` to latents (exact; ``generator`` is unused: there is no posterior)."""
        from flowalign.models.base import check_images

        check_images(images, "encode_images")
        return self.pipeline.to_latents(images.to(self.device).float())


TINY_ARCHITECTURE = ShapesArchitecture(
    block_out_channels=(8, 16), cross_attention=(False, True), norm_num_groups=4, attention_head_dim=8,
    text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32,
)  # fmt: skip
"""A few-thousand-parameter shapes model for tests (``load_model("tiny-shapes")``)."""


def tiny_shapes_pipeline() -> ShapesPipeline:
    """A seeded, untrained, tiny :class:`ShapesPipeline` (like ``flowalign.models.tiny``'s pipelines)."""
    from flowalign.models.tiny import evaluated

    return evaluated(build_shapes_pipeline(TINY_ARCHITECTURE, seed=0))
