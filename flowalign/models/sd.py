"""Stable Diffusion 1.x/2.x and SDXL: ``UNet2DConditionModel`` diffusion models, epsilon or v prediction.

Sampling is DDIM (eta = 0 reproduces ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with a
``DDIMScheduler``; eta > 0 gives DDPO's stochastic transitions with log-probs). The beta table,
timestep spacing, ``steps_offset``, ``set_alpha_to_one``, ``prediction_type`` and ``clip_sample`` come
from the pipeline's scheduler config. SDXL adds the pooled CLIP-G embedding and the micro-conditioning
time ids ``(original size, crop top-left, target size)`` (Podell et al. 2023, Sec. 2.2), zeros as the
unconditional input when the pipeline forces them for an empty prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowalign.models.base import ModelAdapter, refuse_options
from flowalign.samplers.schedules import Schedule, diffusion_schedule

__all__ = ["StableDiffusionAdapter", "StableDiffusionXLAdapter"]


class StableDiffusionAdapter(ModelAdapter):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    kind = "diffusion"
    default_steps = 50
    default_guidance = 7.5

    def __init__(self, pipeline, **kwargs):
        super().__init__(pipeline, **kwargs)
        config = pipeline.scheduler.config
        self.prediction_type = config.get("prediction_type", "epsilon")
        if config.get("thresholding", False):
            raise ValueError(
                "dynamic thresholding schedulers are not supported; use a scheduler config without it."
            )
        self.clip_sample = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
        # The stock SD/SDXL pipelines decode with the scaling factor only (SDXL: and latents_mean/std).
        refuse_options(pipeline.vae.config, "VAE", {"shift_factor": (None, 0, 0.0)})

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def _unet_kwargs(self, x: Tensor, embeds: dict[str, Tensor]) -> dict:
        return {}

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        return self.net(
            x,
            timestep,
            encoder_hidden_states=embeds["prompt_embeds"],
            return_dict=False,
            **self._unet_kwargs(x, embeds),
        )[0]

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for this model, got {height}x{width}."
            )
        return (self.denoiser.config.in_channels, height // factor, width // factor)

    def schedule(
        self, num_steps: int, latent_shape: Sequence[int] | None = None, levels: Sequence[float] | None = None
    ) -> Schedule:
        config = self.pipeline.scheduler.config
        return diffusion_schedule(
            num_steps, self.pipeline.scheduler.alphas_cumprod,
            timestep_spacing=config.get("timestep_spacing", "leading"), steps_offset=config.get("steps_offset", 0),
            set_alpha_to_one=config.get("set_alpha_to_one", True), timesteps=levels,
        ).to(self.device)  # fmt: skip


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_guidance = 5.0

    @property
    def zero_negative(self) -> bool:
        return bool(self.pipeline.config.get("force_zeros_for_empty_prompt", False))

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """The VAE's per-channel ``latents_mean`` / ``latents_std`` (``[1, C, 1, 1]``) when its config has both."""
        config = self.pipeline.vae.config
        if config.get("latents_mean") is None or config.get("latents_std") is None:
            return None
        mean, std = (torch.tensor(config[k], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
                     for k in ("latents_mean", "latents_std"))  # fmt: skip
        return mean, std

    def decode(self, latents: Tensor) -> Tensor:
        """As ``StableDiffusionXLPipeline``: with ``latents_mean``/``latents_std`` in the VAE config,
        ``latents * std / scaling_factor + mean``; else ``latents / scaling_factor``."""
        stats = self._latent_stats(latents)
        if stats is None:
            return super().decode(latents)
        vae = self.pipeline.vae
        mean, std = stats
        z = latents.float() * std / vae.config.scaling_factor + mean
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The inverse of :meth:`decode`: ``(z - mean) * scaling_factor / std`` with latent statistics."""
        latents = super().encode_images(images, generator)
        stats = self._latent_stats(latents)
        if stats is None:
            return latents
        mean, std = stats
        return (
            (latents / self.pipeline.vae.config.scaling_factor - mean)
            * self.pipeline.vae.config.scaling_factor
            / std
        )

    def _unet_kwargs(self, x: Tensor, embeds: dict[str, Tensor]) -> dict:
        height, width = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        # original size, crop top-left, target size: an uncropped image generated at its own size.
        time_ids = x.new_tensor([height, width, 0, 0, height, width]).expand(x.shape[0], 6)
        return {"added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": time_ids}}
