"""The moving-shapes world's image-to-video flow model: :class:`MovingShapesPipeline` and its adapter.

A video of ``F`` frames (frame 0 given) lives in the shapes model's pixel space: each frame is
space-to-depth rearranged (``pixel_unshuffle``, patch ``p``: ``[3, 32, 32] -> [3 p^2, 16, 16]``), and the
latent is ``[3 p^2, F, 32 / p, 32 / p]``, frame 0's slot included, like Wan's video latents ``[C, T, h, w]``.

**The network** is a ``UNet2DConditionModel`` over frames stacked in channels: its input is the clean
first frame and the ``F - 1`` noisy frames (``3 p^2 F`` channels), its output the velocities of those
``F - 1`` frames; cross-attention and an attention-pooled embedding of the prompt condition it, as in the
shapes model. (A Wan-style 3-D transformer over the same pixels was measured as the alternative; see the
model card, ``assets/moving_shapes/model/README.md``.)

**Frame 0's slot** follows the straight path to the given frame exactly: its velocity is
``(x_sigma - x_first) / sigma``, which the flow ODE integrates to ``x_first`` at ``sigma = 0`` from any
start; it does not depend on the weights, so it adds nothing to a log-prob ratio or a gradient. The stock
pipeline and the adapter do the same, so decoded videos start with the conditioning frame.

Flow matching as the shapes model: ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity ``eps - x0`` at model
time ``1000 sigma``, the scheduler's shift; classifier-free guidance over ``[negative; positive]`` prompts
with the same first frame in both halves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor

from flowalign.models.base import Cond, check_images
from flowalign.models.shapes import (
    COLOR_WORDS,
    SHAPE_WORDS,
    SPECIAL_TOKENS,
    ShapesAdapter,
    ShapesPipeline,
    shapes_tokenizer,
)

__all__ = [
    "SHIPPED_VIDEO_MODEL",
    "VIDEO_VOCABULARY",
    "MovingShapesAdapter",
    "MovingShapesArchitecture",
    "MovingShapesPipeline",
    "build_moving_shapes_pipeline",
]

SHIPPED_VIDEO_MODEL = Path(__file__).resolve().parents[2] / "assets" / "moving_shapes" / "model"
VIDEO_VOCABULARY: tuple[str, ...] = (
    *SPECIAL_TOKENS, "the", "moves", "while", "stays", "left", "right", "up", "down", *SHAPE_WORDS, *COLOR_WORDS,
)  # fmt: skip
"""Token strings, id = index: the special tokens and every word of the moving-shapes prompts."""


@dataclass(frozen=True)
class MovingShapesArchitecture:
    """Sizes of a moving-shapes model (defaults: the shipped model); fields as
    :class:`~flowalign.models.shapes.ShapesArchitecture`, plus ``num_frames`` (frame 0 included)."""

    block_out_channels: tuple[int, ...] = (48, 96, 128)
    cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 16
    patch_size: int = 2
    resolution: int = 32
    num_frames: int = 5
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_length: int = 16
    shift: float = 3.0
    token_embedding_std: float = 1.0


def build_moving_shapes_pipeline(
    architecture: MovingShapesArchitecture | None = None, seed: int = 0
) -> MovingShapesPipeline:
    """A randomly initialised moving-shapes pipeline (components seeded as diffusers' dummy components)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = architecture or MovingShapesArchitecture()
    channels = 3 * arch.patch_size**2
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.cross_attention))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=arch.resolution // arch.patch_size, in_channels=channels * arch.num_frames,
        out_channels=channels * (arch.num_frames - 1), block_out_channels=arch.block_out_channels,
        layers_per_block=arch.layers_per_block, down_block_types=down, up_block_types=up,
        cross_attention_dim=arch.text_hidden, norm_num_groups=arch.norm_num_groups,
        attention_head_dim=tuple(max(1, c // arch.attention_head_dim) for c in arch.block_out_channels),
        addition_embed_type="text", addition_embed_type_num_heads=max(1, arch.text_hidden // arch.attention_head_dim),
    )  # fmt: skip
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(VIDEO_VOCABULARY), hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
            max_position_embeddings=arch.max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3,
            projection_dim=arch.text_hidden,
        )
    )  # fmt: skip
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=arch.token_embedding_std)
    return MovingShapesPipeline(
        unet=unet, text_encoder=text_encoder, tokenizer=shapes_tokenizer(arch.max_length, VIDEO_VOCABULARY),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=arch.shift), patch_size=arch.patch_size,
        num_frames=arch.num_frames,
    )  # fmt: skip


class MovingShapesPipeline(ShapesPipeline):
    """Image-to-video flow pipeline of the moving-shapes world (see the module docstring); the shapes
    pipeline's text encoding and LoRA loading, with video latents.

    ``pipeline(prompts, images, num_inference_steps=10, guidance_scale=1.0, generator=g)`` samples with the
    scheduler's Euler steps; ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` are the first frames; returns videos
    ``[B, F, 3, H, W]`` in ``[0, 1]``."""

    model_name = "moving-shapes model"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, patch_size: int = 2, num_frames: int = 5):
        super().__init__(unet, text_encoder, tokenizer, scheduler, patch_size)
        self.register_to_config(num_frames=int(num_frames))

    @property
    def num_frames(self) -> int:
        return int(self.config.num_frames)

    def to_latents(self, frames: Tensor) -> Tensor:
        """``[B, F, 3, H, W]`` (or one frame ``[B, 3, H, W]``) in ``[0, 1]`` -> ``[B, 3 p^2, F, H / p, W / p]``
        (``[B, 3 p^2, H / p, W / p]``) in ``[-1, 1]``."""
        x = F.pixel_unshuffle(frames * 2 - 1, self.patch_size)
        return x.transpose(1, 2) if x.ndim == 5 else x

    def to_frames(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`to_latents` for videos, clamped to ``[0, 1]``: ``[B, F, 3, H, W]``."""
        x = F.pixel_shuffle(latents.transpose(1, 2), self.patch_size)
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def velocity(self, net, x: Tensor, timestep: Tensor, first: Tensor, embeds: Tensor) -> Tensor:
        """The velocity of every frame slot of ``x`` ``[B, C, F, h, w]``: the network's for frames 1.. (it
        sees the clean first frame ``first`` ``[B, C, h, w]`` and the noisy frames), the exact one for frame 0."""
        batch, channels, frames, h, w = x.shape
        inputs = torch.cat([first.to(x.dtype), x[:, :, 1:].transpose(1, 2).reshape(batch, -1, h, w)], 1)
        out = net(inputs, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        out = out.view(batch, frames - 1, channels, h, w).transpose(1, 2)
        sigma = (timestep.to(torch.float32) / self.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        slot = torch.where(sigma > 0, (x[:, :, 0].float() - first.float()) / sigma.clamp(min=1e-12), 0.0)
        return torch.cat([slot.unsqueeze(2).to(out.dtype), out], 2)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        images: Tensor,
        num_inference_steps: int = 10,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
    ) -> Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.unet.device
        embeds = self.encode_prompt(prompts, device)
        first = self.to_latents(images.to(device).float())
        cfg = guidance_scale > 1
        if cfg:
            embeds = torch.cat([self.encode_prompt([""] * len(prompts), device), embeds])
            first = torch.cat([first, first])
        if latents is None:
            shape = (len(prompts), first.shape[1], self.num_frames, *first.shape[-2:])
            latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if cfg else latents
            v = self.velocity(self.unet, x.to(self.unet.dtype), t.expand(x.shape[0]), first, embeds)
            if cfg:
                uncond, text = v.chunk(2)
                v = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
        return self.to_frames(latents)


class MovingShapesAdapter(ShapesAdapter):
    """The moving-shapes model behind the adapter protocol (a video flow model; see the module docstring):
    the shapes model's adapter (text, schedule, LoRA targets) with video latents and a first frame.
    ``encode(prompts, images=first_frames)``; latents ``[B, 12, 5, 16, 16]``; ``decode`` -> ``[B, 5, 3, 32, 32]``."""

    family = "moving_shapes"
    pipeline_classes = ("MovingShapesPipeline",)
    pipeline_module = "flowalign.models.moving_shapes"
    default_steps = 10
    default_guidance = 1.0

    @property
    def is_video(self) -> bool:
        return True

    @property
    def num_frames(self) -> int:
        return self.pipeline.num_frames

    @num_frames.setter
    def num_frames(self, value: int) -> None:
        if value != self.pipeline.num_frames:
            raise ValueError(
                f"the moving-shapes model makes {self.pipeline.num_frames} frames, got {value!r}."
            )

    def _condition(self, images: Tensor) -> dict[str, Tensor]:
        """The first frame's latent, ``first_frame`` ``[B, 12, 16, 16]``."""
        return {"first_frame": self.pipeline.to_latents(images.to(self.device).float())}

    def resolution_of(self, cond: Cond) -> tuple[int, int] | None:
        first = cond.embeds.get("first_frame")
        return None if first is None else tuple(s * self.pipeline.patch_size for s in first.shape[-2:])

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        if "first_frame" not in embeds:
            raise ValueError("cond has no first frame; encode with model.encode(prompts, images=...).")
        return self.pipeline.velocity(self.net, x, timestep, embeds["first_frame"], embeds["prompt_embeds"])

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        size = self.default_resolution
        if (height, width) != (size, size):
            raise ValueError(f"the moving-shapes model makes {size}x{size} videos, got {height}x{width}.")
        p = self.pipeline.patch_size
        return (3 * p * p, self.num_frames, height // p, width // p)

    def decode(self, latents: Tensor) -> Tensor:
        return self.pipeline.to_frames(latents)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` to latents (exact; ``generator`` is unused)."""
        if not isinstance(images, Tensor) or images.ndim != 5:
            raise ValueError(
                f"encode_images: the moving-shapes model takes videos [B, F, 3, H, W], got shape "
                f"{tuple(getattr(images, 'shape', ()))}."
            )
        check_images(images.flatten(0, 1), "encode_images")
        return self.pipeline.to_latents(images.to(self.device).float())


TINY_VIDEO_ARCHITECTURE = MovingShapesArchitecture(
    block_out_channels=(8, 16), cross_attention=(False, True), norm_num_groups=4, attention_head_dim=8,
    text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32,
)  # fmt: skip


def tiny_moving_shapes_pipeline() -> MovingShapesPipeline:
    """A seeded, untrained, tiny :class:`MovingShapesPipeline` (``load_model("tiny-moving_shapes")``)."""
    from flowalign.models.tiny import evaluated

    return evaluated(build_moving_shapes_pipeline(TINY_VIDEO_ARCHITECTURE, seed=0))
