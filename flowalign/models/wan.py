"""Wan video: ``WanImageToVideoPipeline`` (Wan 2.1 I2V and Wan 2.2 I2V A14B) and ``WanPipeline`` (Wan 2.1
T2V and Wan 2.2 T2V A14B, text-to-video: no first frame, the transformer sees ``x_t`` alone).

Conditioning and guidance follow the stock pipelines (diffusers 0.42, ``pipelines/wan/pipeline_wan_i2v.py``
and ``pipeline_wan.py``):

- text: UMT5 ``last_hidden_state`` trimmed to each prompt's tokens and zero-padded to
  ``max_sequence_length`` (512, which Wan 2.1's image cross-attention hard-codes);
- the first frame: the VAE's posterior mode of ``[image, zeros x (F - 1)]`` normalised by
  ``latents_mean`` / ``latents_std``, behind a 4-channel mask that is 1 on latent frame 0; the transformer
  sees ``[x_t (16) | mask (4) | image latent (16)]``, 36 channels;
- Wan 2.1 also: the CLIP image encoder's penultimate hidden states (``encoder_hidden_states_image``),
  which the unconditional half of CFG keeps, as the stock pipeline does;
- Wan 2.2 A14B: two experts, ``transformer`` for model times ``t >= boundary_ratio * 1000`` and
  ``transformer_2`` below, each with its own guidance scale (``guidance_2``, default: the same);
- the flow schedule of ``FlowMatchEulerDiscreteScheduler(shift=...)``, model time ``1000 sigma``.

Latents are ``[B, 16, T, H / 8, W / 8]`` with ``T = (F - 1) / 4 + 1`` latent frames for ``F`` video frames;
:meth:`WanAdapter.decode` gives ``[B, F, 3, H, W]`` in ``[0, 1]``.

Deviations, each stated where it happens:

- the hub checkpoints ship ``UniPCMultistepScheduler`` (a 2nd-order multistep solver on a different grid);
  flowalign's samplers are Euler, so the adapter samples with ``FlowMatchEulerDiscreteScheduler`` at the
  checkpoint's ``flow_shift`` and says so once (the stock pipeline with that scheduler reproduces it);
- the CLIP image encoder sees the conditioning image quantised to 8 bits, as the stock pipeline's PIL
  input is (``CLIPImageProcessor`` resizes PIL images and float tensors differently);
- LoRA trains one expert of a two-expert model or both (``expert``): a LoRA is saved in diffusers format and
  loads with ``load_lora_weights(dir)`` (``transformer``) or ``load_lora_weights(dir,
  load_into_transformer_2=True)`` (``transformer_2``). Wan 2.2 TI2V (``expand_timesteps``) is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.models.base import FLOW_SCHEDULER_DEFAULTS, Cond, ModelAdapter, ModelLoadError, refuse_options
from flowalign.samplers.schedules import Schedule, flow_schedule

__all__ = ["WanAdapter", "check_video_frames"]

logger = logging.getLogger(__name__)

_EXPERTS = {"high": "transformer", "low": "transformer_2"}


def check_video_frames(num_frames: Any, where: str = "num_frames") -> int:
    """Wan's VAE makes ``4k + 1`` frames (frame 0, then 4 per latent frame); anything else is an error
    naming ``where`` (the stock pipeline silently rounds it down)."""
    if (
        isinstance(num_frames, bool)
        or not isinstance(num_frames, int)
        or num_frames < 1
        or num_frames % 4 != 1
    ):
        nearest = max(1, (int(num_frames) - 1) // 4 * 4 + 1) if isinstance(num_frames, int) else 5
        raise ValueError(
            f"{where}: Wan video models make 4k + 1 frames (1, 5, 9, ..., 81), got {num_frames!r}; use {nearest} "
            f"or {nearest + 4}."
        )
    return num_frames


class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2 image-to-video and text-to-video; see the module docstring.

    Args:
        num_frames: video frames per sample (``4k + 1``); settable later (``model.num_frames = 9``).
        max_sequence_length: text tokens (512 as in the stock pipeline's call).
        expert: ``"high"`` (``transformer``), ``"low"`` (``transformer_2``, Wan 2.2 only) or ``"both"`` (Wan 2.2):
            the expert(s) that LoRA and full fine-tuning train. Reward backprop through the last steps trains the
            low-noise one. With ``both``, :attr:`denoiser` is a :class:`WanExperts` holding the two.
        guidance_2: the low-noise expert's guidance scale (the stock ``guidance_scale_2``); None: the same
            as ``guidance``.
    """

    family = "wan"
    pipeline_classes = ("WanImageToVideoPipeline", "WanPipeline")
    denoiser_name = "transformer"
    kind = "flow"
    prediction_type = "flow"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_steps = 40
    default_guidance = 5.0

    def __init__(
        self,
        pipeline,
        *,
        num_frames: int = 81,
        max_sequence_length: int = 512,
        expert: str = "high",
        guidance_2: float | None = None,
        **kwargs,
    ):
        _use_euler(pipeline)
        name = type(pipeline).__name__
        if pipeline.config.get("expand_timesteps", False):
            raise ModelLoadError(
                f"this {name} sets expand_timesteps (Wan 2.2 TI2V: per-token timesteps with the first frame at "
                "t = 0), which flowalign does not implement yet; use a Wan 2.1 or Wan 2.2 A14B model."
            )
        if pipeline.transformer is None:
            raise ModelLoadError(f"this {name} has no transformer; flowalign needs the high-noise expert.")
        self._image_to_video = name != "WanPipeline"
        super().__init__(pipeline, **kwargs)
        self.expert = expert
        self.num_frames = num_frames
        self.max_sequence_length = max_sequence_length
        self.guidance_2 = guidance_2
        self._condition_cache: dict[tuple, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ shapes

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @num_frames.setter
    def num_frames(self, value: int) -> None:
        self._num_frames = check_video_frames(value)

    @property
    def expert(self) -> str:
        """The expert(s) that LoRA and full fine-tuning train: ``high`` (``transformer``), ``low``
        (``transformer_2``) or ``both``; set it before adding a LoRA."""
        return getattr(self, "_expert", "high")

    @expert.setter
    def expert(self, value: str) -> None:
        if value not in (*_EXPERTS, "both"):
            raise ValueError(f"expert must be 'high', 'low' or 'both', got {value!r}.")
        if value != "high" and getattr(self.pipeline, "transformer_2", None) is None:
            raise ValueError(
                f"expert={value!r} trains transformer_2, which this model lacks (Wan 2.1 has one expert); use 'high'."
            )
        if value != self.expert and self.cpu_offload:
            raise ValueError("choose the expert before cpu_offload: the frozen expert is the offloaded one.")
        if value != self.expert and self.has_lora:
            raise ValueError(
                f"the {self.expert} expert already has a LoRA; choose the expert before add_lora()."
            )
        self._expert = value
        self.denoiser_name = _EXPERTS.get(value, "transformer")
        both = value == "both"
        self._experts = WanExperts(self.pipeline.transformer, self.pipeline.transformer_2) if both else None

    @property
    def denoiser(self) -> nn.Module:
        """The trained expert, or a :class:`WanExperts` of both (``expert="both"``)."""
        experts = getattr(self, "_experts", None)
        return experts if experts is not None else getattr(self.pipeline, self.denoiser_name)

    def _adapted(self) -> list[nn.Module]:
        if self.expert == "both":
            return [self.pipeline.transformer, self.pipeline.transformer_2]
        return [self.denoiser]

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor_spatial

    @property
    def default_resolution(self) -> int:
        return 480

    @property
    def is_video(self) -> bool:
        return True

    @property
    def takes_images(self) -> bool:
        return self._image_to_video

    def trains(self, timesteps: Tensor) -> Tensor:
        timesteps = torch.as_tensor(timesteps)
        if self.boundary is None or self.expert == "both":
            return torch.ones_like(timesteps, dtype=torch.bool)
        low = timesteps < self.boundary
        return low if self.expert == "low" else ~low

    def trained_sigmas(self) -> tuple[float, float]:
        if self.boundary is None or self.expert == "both":
            return 0.0, 1.0
        sigma = self.boundary / self.pipeline.scheduler.config.num_train_timesteps  # model time = 1000 sigma
        return (0.0, sigma) if self.expert == "low" else (sigma, 1.0)

    def resolution_of(self, cond: Cond) -> tuple[int, int] | None:
        condition = cond.embeds.get("condition")
        if condition is None:
            return None
        return condition.shape[-2] * self.vae_scale_factor, condition.shape[-1] * self.vae_scale_factor

    @property
    def boundary(self) -> float | None:
        """Model time where the experts switch (``boundary_ratio * num_train_timesteps``), or None."""
        ratio = self.pipeline.config.get("boundary_ratio")
        if ratio is None or getattr(self.pipeline, "transformer_2", None) is None:
            return None
        return ratio * self.pipeline.scheduler.config.num_train_timesteps

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor * self.pipeline.transformer.config.patch_size[1]
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for this model, got {height}x{width}."
            )
        return (
            self.pipeline.vae.config.z_dim,
            self.latent_frames,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )

    def schedule(
        self, num_steps: int, latent_shape: Sequence[int] | None = None, levels: Sequence[float] | None = None
    ) -> Schedule:
        config = self.pipeline.scheduler.config
        refuse_options(config, "scheduler", FLOW_SCHEDULER_DEFAULTS)
        if config.get("use_dynamic_shifting", False):
            raise ModelLoadError(
                "this Wan scheduler sets use_dynamic_shifting, which the Wan pipelines do not use; remove it."
            )
        return flow_schedule(
            num_steps, shift=config.get("shift", 1.0), num_train_timesteps=config.num_train_timesteps,
            shift_terminal=config.get("shift_terminal"), sigmas=levels,
        ).to(self.device)  # fmt: skip

    # ------------------------------------------------------------------ conditioning

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )  # fmt: skip
        self._offload("text_encoder")
        return {"prompt_embeds": embeds}

    # ------------------------------------------------------------------ CPU offload of idle frozen modules

    @property
    def cpu_offload(self) -> bool:
        """Whether the frozen modules that idle most of an iteration -- the text encoder (UMT5-XXL, 5.7B) and
        the expert that does not train (14.3B in Wan 2.2 A14B) -- wait on the CPU: accelerate's
        ``cpu_offload_with_hook`` moves one to the compute device when it runs, and flowalign moves it back
        once the text is encoded / when the trained expert runs. Values are unchanged; each iteration moves
        them over once each way. Set after ``expert``."""
        return bool(getattr(self, "_offload_hooks", None))

    @cpu_offload.setter
    def cpu_offload(self, value: bool) -> None:
        if value == self.cpu_offload:
            return
        if not value:
            raise ValueError("cpu_offload cannot be turned off once on; load the model again.")
        from accelerate import cpu_offload_with_hook

        idle = ["text_encoder"]
        if self.expert != "both" and getattr(self.pipeline, "transformer_2", None) is not None:
            idle.append("transformer_2" if self.denoiser_name == "transformer" else "transformer")
        self._offload_hooks = {
            name: cpu_offload_with_hook(getattr(self.pipeline, name), execution_device=self.device)[1]
            for name in idle
        }

    def _offload(self, name: str) -> None:
        hook = getattr(self, "_offload_hooks", {}).get(name)
        if hook is not None:
            hook.offload()

    def _condition(self, images: Tensor) -> dict[str, Tensor]:
        """The stock pipeline's image conditioning of ``images`` ``[B, 3, H, W]`` in ``[0, 1]``: ``condition``
        ``[B, 20, T, h, w]`` (mask and first-frame latent) and, for Wan 2.1, ``image_embeds``."""
        height, width = images.shape[-2:]
        unique, inverse = torch.unique(images.detach().cpu(), dim=0, return_inverse=True)
        if len(unique) < len(images):  # a group's samples share their prompt's frame: encode it once
            return {k: v[inverse.to(v.device)] for k, v in self._condition(unique.to(images.device)).items()}
        pipe = self.pipeline
        with torch.no_grad():
            first = (images * 2 - 1).unsqueeze(2)  # the later frames are zeros in [-1, 1], i.e. grey
            video = torch.cat(
                [first, first.new_zeros(first.shape[0], 3, self.num_frames - 1, height, width)], 2
            )
            z = pipe.vae.encode(video.to(self.device, pipe.vae.dtype)).latent_dist.mode().float()
            z = self._normalise(z)
            mask = torch.zeros(z.shape[0], pipe.vae_scale_factor_temporal, *z.shape[2:], device=z.device)
            mask[:, :, 0] = 1
            out = {"condition": torch.cat([mask, z], 1)}
            if self.pipeline.transformer.config.get("image_dim") is not None:
                from PIL import Image

                pils = [
                    Image.fromarray(i.mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
                    for i in images
                ]
                out["image_embeds"] = pipe.encode_image(pils, self.device)
        return out

    def _normalise(self, z: Tensor, inverse: bool = False) -> Tensor:
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(shape)
        return z * std + mean if inverse else (z - mean) / std

    # ------------------------------------------------------------------ prediction

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        """As :meth:`ModelAdapter.predict`; with two experts, samples past the boundary use ``guidance_2``."""
        if self.guidance_2 is None or self.boundary is None or self.guidance_2 == guidance:
            return super().predict(x_t, timestep, cond, guidance)
        timestep = torch.as_tensor(timestep, device=x_t.device).expand(x_t.shape[0])
        low = timestep < self.boundary
        if low.all() or not low.any():
            return super().predict(x_t, timestep, cond, self.guidance_2 if low.all() else guidance)
        out = torch.empty_like(x_t, dtype=torch.float32)
        for mask, scale in ((~low, guidance), (low, self.guidance_2)):
            index = mask.nonzero().squeeze(1)
            out[index] = super().predict(x_t[index], timestep[index], cond.select(index), scale)
        return out

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        inputs = x
        if self.takes_images:
            condition = embeds.get("condition")
            if condition is None:
                raise ValueError(
                    "cond has no image conditioning; encode with model.encode(prompts, images=...)."
                )
            if condition.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"the conditioning image's latent {tuple(condition.shape[2:])} does not fit the video latent "
                    f"{tuple(x.shape[2:])}: encode the images at the video's size and num_frames ({self.num_frames})."
                )
            inputs = torch.cat([x, condition.to(x.dtype)], 1)
        image = embeds.get("image_embeds")
        kwargs = {
            "encoder_hidden_states": embeds["prompt_embeds"],
            "encoder_hidden_states_image": None if image is None else image.to(inputs.dtype),
        }
        if self.expert == "both":  # one call of the (possibly DDP-wrapped) pair of experts, which routes
            return self.net(inputs, timestep, self.boundary, **kwargs)
        return route_experts(self._expert_call, inputs, timestep, self.boundary, kwargs)

    def _expert_call(self, name: str, inputs: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        if name == self.denoiser_name:  # the frozen expert, if offloaded, is done for this rollout
            self._offload({"transformer": "transformer_2", "transformer_2": "transformer"}[name])
        net = self.net if name == self.denoiser_name else getattr(self.pipeline, name)
        return net(hidden_states=inputs, timestep=timestep, return_dict=False, **kwargs)[0]

    # ------------------------------------------------------------------ pixels

    def decode(self, latents: Tensor) -> Tensor:
        """``[B, 16, T, h, w]`` latents to ``[B, F, 3, H, W]`` frames in ``[0, 1]``, differentiable (the stock
        ``z * latents_std + latents_mean``, the VAE's decode, ``[-1, 1] -> [0, 1]``). With gradient, each latent
        frame's decoder call is checkpointed (:func:`checkpointed_decode`): the same frames, a fraction of the
        memory."""
        vae = self.pipeline.vae
        z = self._normalise(latents.float(), inverse=True).to(vae.dtype)
        if torch.is_grad_enabled() and z.requires_grad:
            video = checkpointed_decode(vae, z)
        else:
            video = vae.decode(z, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` to latents ``[B, 16, T, h, w]`` (the VAE's posterior mode,
        or a sample with ``generator``; normalised by ``latents_mean`` / ``latents_std``)."""
        from flowalign.models.base import check_images

        if not isinstance(images, Tensor) or images.ndim != 5:
            raise ValueError(
                f"encode_images: Wan takes videos [B, F, 3, H, W] in [0, 1], got shape "
                f"{tuple(getattr(images, 'shape', ()))}; add a frame axis to images with images.unsqueeze(1)."
            )
        check_video_frames(images.shape[1], "encode_images: the videos' frame count")
        check_images(images.flatten(0, 1), "encode_images")
        vae = self.pipeline.vae
        posterior = vae.encode((images.transpose(1, 2) * 2 - 1).to(self.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        return self._normalise(latents.float())

    # ------------------------------------------------------------------ LoRA of one expert or both

    def save_lora(self, directory: str | Path, write: bool = True) -> Path:
        """As :meth:`ModelAdapter.save_lora`. The file names the ``transformer`` either way (the stock format);
        a LoRA of ``transformer_2`` loads with ``load_lora_weights(dir, load_into_transformer_2=True)``, which
        ``lora_expert.txt`` beside it records. With both experts trained, ``directory`` holds the high-noise
        expert's LoRA and ``directory/transformer_2`` the low-noise one's (``lora_expert.txt``: ``both``)."""
        if self.expert != "both":
            path = super().save_lora(directory, write)
            if write:
                (path / "lora_expert.txt").write_text(self.denoiser_name + "\n")
            return path
        if not self.has_lora:
            raise ValueError("this model has no LoRA adapter to save; call add_lora() first.")
        directory = Path(directory)
        self._save_lora_of(self.pipeline.transformer, directory, write)
        self._save_lora_of(self.pipeline.transformer_2, directory / "transformer_2", write)
        if write:
            (directory / "lora_expert.txt").write_text("both\n")
            (directory / "transformer_2" / "lora_expert.txt").write_text("transformer_2\n")
        return directory

    def load_lora(self, directory: str | Path, trainable: bool = False) -> None:
        """As :meth:`ModelAdapter.load_lora`, into the expert(s) that ``lora_expert.txt`` beside the LoRA names
        (saved by :meth:`save_lora`; without it, the current ``expert``)."""
        directory = Path(directory)
        record = directory / "lora_expert.txt"
        if record.is_file():
            name = record.read_text().strip()
            expert = {v: k for k, v in _EXPERTS.items()}.get(name, "both" if name == "both" else None)
            if expert is None:
                raise ModelLoadError(
                    f"{record}: names {name!r}; expected 'transformer', 'transformer_2' or 'both'."
                )
            try:
                self.expert = expert
            except ValueError as err:
                raise ModelLoadError(f"LoRA {str(directory)!r}: {err}") from None
        if self.expert != "both":
            super().load_lora(directory, trainable)
            return
        pipe = self.pipeline
        self._load_lora_into(pipe.transformer, directory, {}, "transformer")
        self._load_lora_into(
            pipe.transformer_2,
            directory / "transformer_2",
            {"load_into_transformer_2": True},
            "transformer_2",
        )
        for name, param in self.denoiser.named_parameters():
            param.requires_grad_(trainable and "lora_" in name)

    def load_weights(self, path: str | Path) -> None:
        """As :meth:`ModelAdapter.load_weights`, into the expert(s) the checkpoint's run trained (its
        ``state.json`` config's ``model.expert``): the experts' tensors have the same names."""
        from flowalign.config import saved_setting

        path = Path(path)
        checkpoint = path if path.is_dir() else path.parent
        if (checkpoint / "state.json").is_file():
            expert = saved_setting(checkpoint, "model.expert") or "high"
            try:
                self.expert = expert
            except ValueError as err:
                raise ModelLoadError(f"weights {str(path)!r} (model.expert={expert}): {err}") from None
        super().load_weights(path)

    @property
    def _trained_name(self) -> str:
        return "transformer and transformer_2" if self.expert == "both" else self.denoiser_name

    @property
    def _lora_file_name(self) -> str:
        return "transformer"

    @property
    def _lora_load_kwargs(self) -> dict[str, Any]:
        return {"load_into_transformer_2": True} if self.denoiser_name == "transformer_2" else {}

    def _cast(self, dtype: torch.dtype) -> None:
        """Cast the modules not already in ``dtype``: one loaded with ``from_pretrained(dtype=...)`` keeps its
        ``_keep_in_fp32_modules`` (the time embedder, norms) in float32, which ``pipeline.to(dtype)`` would
        cast down, unlike the stock pipeline."""
        for module in self._modules().values():
            if module.dtype != dtype:
                module.to(dtype=dtype)


def checkpointed_decode(vae, z: Tensor) -> Tensor:
    """diffusers' ``AutoencoderKLWan._decode`` of ``z`` ``[B, 16, T, h, w]`` (the VAE's own latents) to
    ``[B, 3, F, H, W]`` in ``[-1, 1]``, with each latent frame's decoder call under activation checkpointing.

    The Wan VAE decodes causally, one latent frame at a time, each causal convolution reading the last frames
    of its input from a feature cache the previous frame wrote. Here every frame's call takes the cache as
    its inputs and returns the new cache as outputs (a copy, never mutated in place), so a recomputation in
    backward sees exactly what the forward saw; values and gradients are the stock decode's. What autograd
    keeps is every frame's cache (the last two frames of each causal convolution's input) and, during
    backward, one frame's activations at a time, instead of every frame's activations: for 81 frames at
    624x352 the stock differentiable decode keeps 171.5 GiB (bf16), which no GPU holds
    (``benchmarks/video/wan_decode_memory.py``). diffusers' ``AutoencoderKLWan`` has no gradient
    checkpointing of its own (``_supports_gradient_checkpointing = False``). Tiled decoding and patchified
    VAEs (Wan 2.2 TI2V's) are not covered: they fall back to the stock decode."""
    from torch.utils.checkpoint import checkpoint

    if vae.use_tiling or vae.config.get("patch_size") is not None:
        return vae.decode(z, return_dict=False)[0]
    x = vae.post_quant_conv(z)
    cache: list = [None] * vae._cached_conv_counts["decoder"]
    frames = []
    for i in range(x.shape[2]):
        out, *cache = checkpoint(
            _decode_frame, vae.decoder, x[:, :, i : i + 1], i == 0, *cache, use_reentrant=False
        )
        frames.append(out)
    return torch.clamp(torch.cat(frames, 2), min=-1.0, max=1.0)


def _decode_frame(decoder, x: Tensor, first_chunk: bool, *cache) -> tuple:
    """One latent frame through the Wan decoder with the feature cache ``cache`` (read, not mutated): its
    frames and the cache the next frame reads."""
    cache = list(cache)
    out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
    return (out, *cache)


def route_experts(
    call, inputs: Tensor, timestep: Tensor, boundary: float | None, kwargs: dict[str, Any]
) -> Tensor:
    """Each sample of ``inputs`` through the expert its model time selects, as the stock pipeline switches:
    ``transformer`` at ``t >= boundary`` (or always, without one), ``transformer_2`` below.
    ``call(name, inputs, timestep, kwargs)`` runs one expert on a sub-batch (``kwargs``: per-sample tensors or
    None); a mixed batch is split and reassembled in order."""
    if boundary is None:
        return call("transformer", inputs, timestep, kwargs)
    low = timestep < boundary
    if not low.any() or low.all():
        return call("transformer_2" if low.all() else "transformer", inputs, timestep, kwargs)
    out = None
    for mask, name in ((~low, "transformer"), (low, "transformer_2")):
        index = mask.nonzero().squeeze(1)
        part = {k: None if v is None else v[index] for k, v in kwargs.items()}
        y = call(name, inputs[index], timestep[index], part)
        out = y.new_empty((inputs.shape[0], *y.shape[1:]), dtype=inputs.dtype) if out is None else out
        out[index] = y.to(out.dtype)  # one expert may answer in float32 under autocast, the other in bf16
    return out


class WanExperts(nn.Module):
    """Both experts of a Wan 2.2 model as one trained module (``expert="both"``). Its forward routes each
    sample to its expert (:func:`route_experts`) inside one call, so that a DDP wrapper sees one forward per
    backward and, with ``find_unused_parameters`` (set by the training loop), reduces the gradients of an
    expert that only another process used this step. Parameters are named ``transformer.*`` and
    ``transformer_2.*`` in checkpoints."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    def forward(self, inputs: Tensor, timestep: Tensor, boundary: float | None, **kwargs) -> Tensor:
        return route_experts(self._call, inputs, timestep, boundary, kwargs)

    def _call(self, name: str, inputs: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        return getattr(self, name)(hidden_states=inputs, timestep=timestep, return_dict=False, **kwargs)[0]


def _use_euler(pipeline) -> None:
    """Sample with ``FlowMatchEulerDiscreteScheduler``: a Wan checkpoint's ``UniPCMultistepScheduler`` with
    flow sigmas is replaced by Euler at its ``flow_shift`` (said once); any other scheduler is an error."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = pipeline.scheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return
    config = scheduler.config
    if type(scheduler).__name__ == "UniPCMultistepScheduler" and config.get("use_flow_sigmas", False):
        shift = config.get("flow_shift", 1.0)
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.num_train_timesteps, shift=shift
        )
        logger.warning(
            "this Wan checkpoint ships UniPCMultistepScheduler; flowalign samples with "
            "FlowMatchEulerDiscreteScheduler(shift=%s), which the stock pipeline reproduces with that scheduler.",
            shift,
        )
        return
    raise ModelLoadError(
        f"the Wan pipeline's scheduler is a {type(scheduler).__name__}; flowalign samples flow models with "
        "FlowMatchEulerDiscreteScheduler (or a Wan UniPCMultistepScheduler with use_flow_sigmas, replaced by it)."
    )
