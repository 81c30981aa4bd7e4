"""Stable Diffusion 3 / 3.5: MMDiT flow model (``SD3Transformer2DModel``), two CLIP encoders and an optional T5.

Conditioning and guidance follow ``StableDiffusion3Pipeline`` exactly: CLIP-L/CLIP-G penultimate hidden
states concatenated, zero-padded to the T5 width and stacked with the T5 tokens (zeros without T5),
pooled CLIP outputs concatenated; CFG over ``[negative; positive]``; model time ``1000 sigma``; the
scheduler's static shift (3.0 for SD3.5) or its dynamic shift if the config enables it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from flowalign.models.base import FLOW_SCHEDULER_DEFAULTS, ModelAdapter, refuse_options
from flowalign.samplers.schedules import Schedule, dynamic_shift_mu, flow_schedule

__all__ = ["SD3Adapter"]


class SD3Adapter(ModelAdapter):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    kind = "flow"
    prediction_type = "flow"
    # The attention projections of both the image and the text stream, as in Flow-GRPO's SD3 LoRA.
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

    def __init__(self, pipeline, *, max_sequence_length: int = 256, **kwargs):
        super().__init__(pipeline, **kwargs)
        self.max_sequence_length = max_sequence_length

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        return self.net(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor * self.denoiser.config.patch_size
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for this model, got {height}x{width}."
            )
        return (
            self.denoiser.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )

    def schedule(
        self, num_steps: int, latent_shape: Sequence[int] | None = None, levels: Sequence[float] | None = None
    ) -> Schedule:
        refuse_options(self.pipeline.scheduler.config, "scheduler", FLOW_SCHEDULER_DEFAULTS)
        config = self.pipeline.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            if latent_shape is None:
                raise ValueError(
                    "this scheduler shifts sigmas by resolution: pass latent_shape to schedule()."
                )
            patch = self.denoiser.config.patch_size
            mu = dynamic_shift_mu(
                (latent_shape[-2] // patch) * (latent_shape[-1] // patch),
                config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16),
            )  # fmt: skip
        return flow_schedule(
            num_steps, shift=config.get("shift", 1.0), mu=mu, num_train_timesteps=config.num_train_timesteps,
            time_shift_type=config.get("time_shift_type", "exponential"),
            shift_terminal=config.get("shift_terminal"), sigmas=levels,
        ).to(self.device)  # fmt: skip
