"""FLUX.1: flow model (``FluxTransformer2DModel``) on 2x2-packed latents with RoPE image/text ids.

Follows ``FluxPipeline``: pooled CLIP + T5 tokens; the distilled guidance of FLUX.1-dev enters as the
transformer's guidance embedding (``guidance`` here, no CFG batch); model time ``sigma`` (the pipeline
divides ``1000 sigma`` by 1000); the schedule ``linspace(1, 1/N, N)`` with the resolution-dependent
shift ``mu`` of the image-token count. Latents are kept unpacked, ``[B, C, H/8, W/8]`` like every other
family, and packed for each transformer call; the step math is elementwise, so this changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from flowalign.models.base import FLOW_SCHEDULER_DEFAULTS, ModelAdapter, refuse_options
from flowalign.samplers.schedules import Schedule, dynamic_shift_mu, flow_schedule

__all__ = ["FluxAdapter", "pack_latents", "unpack_latents"]


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``: each 2x2 patch becomes one token (FluxPipeline's layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height x width``."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> Tensor:
    """``[(H/2)(W/2), 3]`` RoPE positions of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(ModelAdapter):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_name = "transformer"
    kind = "flow"
    prediction_type = "flow"
    default_guidance = 3.5
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )

    def __init__(self, pipeline, *, max_sequence_length: int = 512, **kwargs):
        super().__init__(pipeline, **kwargs)
        self.max_sequence_length = max_sequence_length

    @property
    def uses_cfg(self) -> bool:
        # FLUX.1-dev is guidance-distilled: ``guidance`` is an input of the transformer, not a CFG scale.
        return False

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        batch, _, height, width = x.shape
        text = embeds["prompt_embeds"]
        guidance_input = None
        if self.denoiser.config.guidance_embeds:
            guidance_input = torch.full((batch,), guidance, device=x.device, dtype=torch.float32)
        out = self.net(
            hidden_states=pack_latents(x),
            timestep=timestep.to(x.dtype) / 1000,
            guidance=guidance_input,
            pooled_projections=embeds["pooled_prompt_embeds"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
            img_ids=image_ids(height, width, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor * 2
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for FLUX, got {height}x{width}."
            )
        return (self.denoiser.config.in_channels // 4, 2 * (height // factor), 2 * (width // factor))

    def schedule(
        self, num_steps: int, latent_shape: Sequence[int] | None = None, levels: Sequence[float] | None = None
    ) -> Schedule:
        refuse_options(self.pipeline.scheduler.config, "scheduler", FLOW_SCHEDULER_DEFAULTS)
        if latent_shape is None:
            raise ValueError("FLUX shifts sigmas by resolution: pass latent_shape to schedule().")
        config = self.pipeline.scheduler.config
        seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        mu = dynamic_shift_mu(
            seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
        return flow_schedule(
            num_steps, shift=config.get("shift", 1.0), mu=mu if config.get("use_dynamic_shifting", False) else None,
            num_train_timesteps=config.num_train_timesteps, time_shift_type=config.get("time_shift_type", "exponential"),
            shift_terminal=config.get("shift_terminal"),
            sigmas=np.linspace(1.0, 1 / num_steps, num_steps) if levels is None else levels,
        ).to(self.device)  # fmt: skip
