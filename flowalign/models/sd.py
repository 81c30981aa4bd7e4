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

from torch import Tensor

from flowalign.models.base import ModelAdapter
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

    def schedule(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Schedule:
        config = self.pipeline.scheduler.config
        return diffusion_schedule(
            num_steps, self.pipeline.scheduler.alphas_cumprod,
            timestep_spacing=config.get("timestep_spacing", "leading"), steps_offset=config.get("steps_offset", 0),
            set_alpha_to_one=config.get("set_alpha_to_one", True),
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

    def _unet_kwargs(self, x: Tensor, embeds: dict[str, Tensor]) -> dict:
        height, width = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        # original size, crop top-left, target size: an uncropped image generated at its own size.
        time_ids = x.new_tensor([height, width, 0, 0, height, width]).expand(x.shape[0], 6)
        return {"added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": time_ids}}
