"""The model adapter protocol: one interface over diffusers pipelines of every family.

An adapter wraps a loaded diffusers pipeline and gives the samplers and algorithms what they need:

- :meth:`ModelAdapter.encode` — prompts to a :class:`Cond` (cached per prompt; positive and negative
  prompts encoded in one batched call);
- :meth:`ModelAdapter.predict` — the denoiser output in the model's native parameterization
  (``velocity`` for flow models, ``epsilon``/``v_prediction`` for diffusion models), with classifier-free
  guidance done as one batched call exactly as the stock pipeline does it;
- :meth:`ModelAdapter.schedule`, :meth:`ModelAdapter.initial_noise` — the stock pipeline's noise levels
  and latent shape;
- :meth:`ModelAdapter.decode` / :meth:`ModelAdapter.encode_images` — latents <-> images in ``[0, 1]``
  (differentiable);
- LoRA through peft (only LoRA parameters train; saved in diffusers format so the stock
  ``Pipeline.load_lora_weights(dir)`` loads it), :meth:`ModelAdapter.reference` (adapters disabled, no
  second model copy), gradient checkpointing, and the attention backend.

A family is one subclass in its own file; it writes ``_encode_batch``, ``_forward``, ``schedule``,
``latent_shape``, ``decode`` and ``encode_images``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flowalign.samplers.schedules import Schedule

__all__ = [
    "FLOW_SCHEDULER_DEFAULTS",
    "Cond",
    "ModelAdapter",
    "ModelLoadError",
    "check_images",
    "refuse_options",
]


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says what to check."""


@dataclass
class Cond:
    """Encoded prompts of ``B`` samples.

    Attributes:
        embeds: the family's conditioning tensors for the prompts, each ``[B, ...]`` (e.g. SD3:
            ``prompt_embeds [B, L, D]`` and ``pooled_prompt_embeds [B, P]``).
        negative: the same tensors for the negative (unconditional) prompts, each ``[B, ...]``; None when
            encoded without classifier-free guidance.
        prompts: the ``B`` prompt strings.
    """

    embeds: dict[str, Tensor]
    negative: dict[str, Tensor] | None
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def _map(self, fn) -> Cond:
        negative = None if self.negative is None else {k: fn(v) for k, v in self.negative.items()}
        return Cond({k: fn(v) for k, v in self.embeds.items()}, negative, self.prompts)

    def select(self, index: Tensor | Sequence[int] | slice) -> Cond:
        """The conditioning of a subset of samples."""
        out = self._map(lambda t: t[index])
        order = (
            range(len(self.prompts))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        )
        out.prompts = [self.prompts[i] for i in order]
        return out

    def repeat(self, n: int) -> Cond:
        """Each sample repeated ``n`` times in place (``[a, b] -> [a, a, b, b]``): a group per prompt."""
        out = self._map(lambda t: t.repeat_interleave(n, dim=0))
        out.prompts = [p for p in self.prompts for _ in range(n)]
        return out

    def to(self, device: torch.device | str) -> Cond:
        return self._map(lambda t: t.to(device))


class ModelAdapter:
    """Base class of the family adapters; see the module docstring for the contract.

    Class attributes a family sets:
        family: registry name (``"sd3"``, ``"flux"``, ``"sd"``, ``"sdxl"``...).
        pipeline_classes: diffusers pipeline class names this adapter accepts (``model_index.json``).
        denoiser_name: ``"transformer"`` or ``"unet"``: the pipeline attribute that is trained.
        kind: ``"flow"`` or ``"diffusion"``.
        default_lora_targets: module names LoRA adapts by default.
        pipeline_module: the module that defines the pipeline classes (``diffusers``, or the family's own
            module for a pipeline defined in flowalign).
    """

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    denoiser_name: ClassVar[str]
    kind: ClassVar[str]
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_module: ClassVar[str] = "diffusers"
    prediction_type: str = "flow"
    default_steps: ClassVar[int] = 28
    default_guidance: ClassVar[float] = 7.0

    def __init__(
        self,
        pipeline: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 256,
    ):
        name = type(pipeline).__name__
        if name not in self.pipeline_classes:
            raise ModelLoadError(
                f"{type(self).__name__} wraps {' or '.join(self.pipeline_classes)}, got a {name}; "
                "load it with flowalign.models.load_model, which picks the adapter from model_index.json."
            )
        self.pipeline = pipeline
        self._device = torch.device(device)
        self._dtype = dtype
        pipeline.to(self._device)
        self._cast(dtype)
        pipeline.set_progress_bar_config(disable=True)
        for module in self._modules().values():
            module.requires_grad_(False)
            module.eval()
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.cache_size = cache_size

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> ModelAdapter:
        """Load a diffusers pipeline from a local directory (or a hub id where a hub is reachable).

        ``kwargs`` naming an option of the adapter (its constructor's keyword arguments, e.g. SD3's and
        FLUX's ``max_sequence_length``, ``cache_size``) go to the adapter; the rest go to diffusers'
        ``from_pretrained`` (``variant``, ``revision``, ...)."""
        import inspect

        own = {
            name
            for klass in cls.__mro__
            if "__init__" in vars(klass)
            for name, param in inspect.signature(klass.__init__).parameters.items()
            if param.kind is inspect.Parameter.KEYWORD_ONLY
        }
        adapter_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        pipeline = _load_pipeline(path, cls.pipeline_classes, dtype, cls.pipeline_module, **kwargs)
        return cls(pipeline, device=device, dtype=dtype, **adapter_kwargs)

    def _cast(self, dtype: torch.dtype) -> None:
        """Bring the pipeline's modules to ``dtype`` (a no-op when they already are)."""
        if any(p.dtype != dtype for m in self._modules().values() for p in m.parameters()):
            self.pipeline.to(dtype=dtype)

    def _modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.pipeline.components.items() if isinstance(v, nn.Module)}

    @property
    def denoiser(self) -> nn.Module:
        """The trained network (transformer or UNet)."""
        return getattr(self.pipeline, self.denoiser_name)

    def _adapted(self) -> list[nn.Module]:
        """The diffusers models that carry the LoRA adapter: the denoiser (both experts of a two-expert
        model that trains both)."""
        return [self.denoiser]

    @property
    def net(self) -> nn.Module:
        """The module to call for a forward pass: the denoiser, or its distributed wrapper (DDP/FSDP) once
        the training loop has prepared it with accelerate."""
        return getattr(self, "_training_module", None) or self.denoiser

    def set_training_module(self, module: nn.Module | None) -> None:
        """Route forward passes through ``module`` (the accelerate-prepared denoiser); None undoes it."""
        self._training_module = module

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[ModelAdapter]:
        """Within this context forward passes run the bare denoiser, not its distributed wrapper: for an
        activation checkpoint's recomputation in backward, where DDP's forward would prepare a second
        gradient reduction while one is under way (an error with ``find_unused_parameters``). The gradients
        still reach DDP's hooks, which sit on the parameters."""
        previous = getattr(self, "_training_module", None)
        self._training_module = None
        try:
            yield self
        finally:
            self._training_module = previous

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def default_resolution(self) -> int:
        """The stock pipeline's default image side in pixels."""
        return int(self.denoiser.config.get("sample_size") or 128) * self.vae_scale_factor

    @property
    def path(self):
        """The forward path of this model's kind (:mod:`flowalign.samplers.paths`): noising, training
        target and conversions, with the scheduler's training horizon / ``alphas_cumprod``."""
        from flowalign.samplers.paths import DiffusionPath, FlowPath

        scheduler = self.pipeline.scheduler
        if self.kind == "flow":
            return FlowPath(scheduler.config.num_train_timesteps)
        return DiffusionPath(scheduler.alphas_cumprod, self.prediction_type)

    def trains(self, timesteps: Tensor) -> Tensor:
        """Which model times the trained denoiser serves (all; one expert of a two-expert model serves its
        side of the boundary): a bool tensor shaped like ``timesteps``."""
        return torch.ones_like(torch.as_tensor(timesteps), dtype=torch.bool)

    def trained_sigmas(self) -> tuple[float, float]:
        """The flow noise levels ``(low, high)`` the trained denoiser serves, the continuous form of
        :meth:`trains` (``(0, 1)``: all)."""
        return 0.0, 1.0

    def resolution_of(self, cond: Cond) -> tuple[int, int] | None:
        """The ``(height, width)`` that ``cond`` fixes (an image-to-video model's conditioning frames), or None."""
        return None

    @property
    def is_video(self) -> bool:
        """Whether samples are videos (latents ``[B, C, T, h, w]``, decoded ``[B, F, 3, H, W]``)."""
        return False

    @property
    def takes_images(self) -> bool:
        """Whether :meth:`encode` needs a conditioning first frame per prompt (image-to-video)."""
        return self.is_video

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self.pipeline, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # ------------------------------------------------------------------ family hooks

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """Encode ``n`` prompts in one call to per-prompt tensors, each ``[n, ...]``."""
        raise NotImplementedError

    @property
    def zero_negative(self) -> bool:
        """Without a negative prompt the unconditional embeddings are zeros instead of the empty prompt's
        encoding (SDXL's ``force_zeros_for_empty_prompt``)."""
        return False

    def _forward(self, x: Tensor, timestep: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        """One denoiser call on a batch already in the model's dtype."""
        raise NotImplementedError

    @property
    def uses_cfg(self) -> bool:
        """Whether ``guidance`` is a classifier-free guidance scale (False for guidance-distilled FLUX)."""
        return True

    def schedule(
        self, num_steps: int, latent_shape: Sequence[int] | None = None, levels: Sequence[float] | None = None
    ) -> Schedule:
        """The stock pipeline's noise levels for ``num_steps`` steps (``latent_shape`` for resolution shifts).

        ``levels``: explicit ones, as the stock pipeline's ``sigmas=`` (flow models, shifted by the scheduler
        as the pipeline shifts them) or ``timesteps=`` (diffusion models) argument; see
        :func:`~flowalign.samplers.schedules.check_levels`."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension) for an image of ``height x width`` pixels."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """``[B, *latent_shape]`` latents to ``[B, 3, H, W]`` images in ``[0, 1]``, differentiable.

        The stock pipelines' VAE decode: ``latents / scaling_factor + shift_factor`` (shift 0 where the
        VAE has none), then ``[-1, 1] -> [0, 1]``.
        """
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor") or 0.0
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, H, W]`` images in ``[0, 1]`` to latents: the VAE posterior mode, or a sample when a
        generator is given; ``(z - shift_factor) * scaling_factor``."""
        check_images(images, "encode_images")
        vae = self.pipeline.vae
        posterior = vae.encode((images * 2 - 1).to(device=self.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    # ------------------------------------------------------------------ prompts

    def encode(
        self,
        prompts: Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        cfg: bool = True,
        images: Tensor | None = None,
    ) -> Cond:
        """Encode ``B`` prompts (and, with ``cfg``, their negative prompts) in one batched text-encoder call.

        ``negative_prompts``: one string for all, one per prompt, or None for the pipeline's default
        unconditional input (the empty prompt; zeros for SDXL). Encodings are cached per prompt string
        (``cache_size`` most recent), which is exact because the text encoders are frozen and pad to a
        fixed length.

        ``images``: image-to-video families only, and required there: one conditioning first frame per prompt,
        ``[B, 3, H, W]`` in ``[0, 1]`` at the video's size; the family's :meth:`_condition` tensors join both
        CFG halves (the stock pipelines condition the unconditional half on the image too).
        """
        if self.takes_images and images is None:
            raise ValueError(
                "this image-to-video model needs a conditioning first frame per prompt: pass images= "
                "([B, 3, H, W] in [0, 1]; --image on the command line)."
            )
        if images is not None and not self.takes_images:
            what = "text-to-video" if self.is_video else "text-to-image"
            raise ValueError(
                f"images: this {self.family} model is {what} and takes no conditioning image; pass it to an "
                "image-to-video model (families wan, moving_shapes) or drop it (--image)."
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
        if negative_prompts is not None and not self.uses_cfg:
            raise ValueError(
                f"{type(self).__name__}: this model takes no negative prompts (guidance is an input of the "
                "guidance-distilled transformer, not classifier-free guidance); drop negative_prompts."
            )
        negatives: list[str] = []
        zeros = False
        if cfg and self.uses_cfg:
            if negative_prompts is None:
                zeros = self.zero_negative
                negatives = [] if zeros else [""] * len(prompts)
            else:
                negatives = (
                    [negative_prompts] * len(prompts)
                    if isinstance(negative_prompts, str)
                    else list(negative_prompts)
                )
                if len(negatives) != len(prompts):
                    raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts.")
        rows = self._cached_rows(prompts + negatives)
        embeds = _stack(rows[: len(prompts)])
        negative = _stack(rows[len(prompts) :]) if negatives else None
        if zeros:
            negative = {k: torch.zeros_like(v) for k, v in embeds.items()}
        if images is not None:
            check_images(images, "images")
            if images.shape[0] != len(prompts):
                raise ValueError(
                    f"images: got {images.shape[0]} conditioning images for {len(prompts)} prompts; pass one first "
                    "frame per prompt (repeat an image for several prompts)."
                )
            self.latent_shape(*images.shape[-2:])  # checks the size
            conditioning = self._condition(images)
            embeds.update(conditioning)
            if negative is not None:
                negative.update(conditioning)
        return Cond(embeds, negative, prompts)

    def _condition(self, images: Tensor) -> dict[str, Tensor]:
        """Image-to-video families: the conditioning tensors of checked first frames ``[B, 3, H, W]``."""
        raise NotImplementedError(
            f"{type(self).__name__} sets takes_images but does not define _condition (its conditioning tensors)."
        )

    def _cached_rows(self, texts: list[str]) -> list[dict[str, Tensor]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh: dict[str, dict[str, Tensor]] = {}
        if missing:
            with torch.no_grad():
                batch = self._encode_batch(missing)
            fresh = {t: {k: v[i] for k, v in batch.items()} for i, t in enumerate(missing)}
        rows = []
        for text in texts:
            row = fresh.get(text)
            if row is None:
                row = self._cache[text]
                self._cache.move_to_end(text)
            rows.append(row)
        if self.cache_size > 0:
            for text, row in fresh.items():
                self._cache[text] = row
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return rows

    # ------------------------------------------------------------------ prediction

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        """The denoiser's output at ``x_t`` (``[B, *latent_shape]``) and model time ``timestep`` (``[B]``).

        For CFG families and ``guidance > 1``: ``uncond + guidance * (cond - uncond)`` from one batched call
        over ``[negative; positive]`` (the stock pipelines' order). Returns float32.
        """
        self._check_input(x_t, cond)
        timestep = torch.as_tensor(timestep, device=x_t.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        x = x_t.to(self.dtype)
        if self.uses_cfg and guidance > 1:
            if cond.negative is None:
                raise ValueError(
                    f"guidance={guidance} needs negative embeddings; encode the prompts with cfg=True."
                )
            embeds = {k: torch.cat([cond.negative[k], v]) for k, v in cond.embeds.items()}
            out = self._forward(torch.cat([x, x]), torch.cat([timestep, timestep]), embeds, guidance)
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
        else:
            out = self._forward(x, timestep, cond.embeds, guidance)
        return out.float()

    def _check_input(self, x_t: Tensor, cond: Cond) -> None:
        if not isinstance(x_t, Tensor) or not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got {getattr(x_t, 'dtype', type(x_t))}.")
        if x_t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"x_t has dtype {x_t.dtype}; use float32 (the samplers' dtype) or the model's {self.dtype}."
            )
        if x_t.device.type != self.device.type:
            raise ValueError(
                f"x_t is on {x_t.device} but the model is on {self.device}; move it with x_t.to(model.device)."
            )
        if not isinstance(cond, Cond):
            raise TypeError(f"cond must be a Cond from model.encode(...), got {type(cond).__name__}.")
        if len(cond) != x_t.shape[0]:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x_t has {x_t.shape[0]} samples; use cond.repeat(n) for n "
                "samples per prompt."
            )

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> Tensor:
        """``[batch, *latent_shape]`` standard normal float32 noise, drawn on the model's device; ``generator``
        is one generator or a list of ``batch`` (one per sample)."""
        from flowalign.samplers.steps import randn

        return randn((batch, *self.latent_shape(height, width)), generator, self.device)

    # ------------------------------------------------------------------ training state

    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        init: str | bool = True,
    ) -> None:
        """Attach a peft LoRA adapter to the denoiser; only its parameters are trainable afterwards.

        ``init=True`` starts ``B = 0`` so the model is unchanged (Hu et al. 2021); ``"gaussian"`` too.
        """
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            target_modules=list(target_modules or self.default_lora_targets),
            lora_dropout=dropout,
            init_lora_weights=init,
        )
        for module in self._adapted():
            module.requires_grad_(False)
            module.add_adapter(config)
            for name, param in module.named_parameters():
                param.requires_grad_("lora_" in name)

    @property
    def has_lora(self) -> bool:
        return all(getattr(module, "_hf_peft_config_loaded", False) for module in self._adapted())

    def set_full_finetuning(self) -> None:
        """Make every denoiser parameter trainable (no LoRA)."""
        if self.has_lora:
            raise ValueError("this model has a LoRA adapter; full fine-tuning and LoRA are exclusive.")
        self.denoiser.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @property
    def _trained_name(self) -> str:
        """The trained network's name in messages."""
        return self.denoiser_name

    @property
    def _lora_file_name(self) -> str:
        """The component a saved LoRA names (``<name>_lora_layers`` of the pipeline's ``save_lora_weights``)."""
        return self.denoiser_name

    @property
    def _lora_load_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the stock ``load_lora_weights`` that put a LoRA on the trained denoiser."""
        return {}

    def save_lora(self, directory: str | Path, write: bool = True) -> Path:
        """Save the LoRA in diffusers format (``pytorch_lora_weights.safetensors`` with its config), loadable
        with the stock ``Pipeline.load_lora_weights(directory)``. A sharded (FSDP) denoiser's LoRA is
        gathered first: every process calls this, the one with ``write`` writes."""
        if not self.has_lora:
            raise ValueError("this model has no LoRA adapter to save; call add_lora() first.")
        return self._save_lora_of(self.denoiser, Path(directory), write)

    def _save_lora_of(self, module: nn.Module, directory: Path, write: bool) -> Path:
        """Write ``module``'s LoRA to ``directory`` in diffusers format (see :meth:`save_lora`)."""
        from peft.utils import get_peft_model_state_dict

        state = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in get_peft_model_state_dict(module).items()
        }
        if not write:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        config = module.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        type(self.pipeline).save_lora_weights(
            directory,
            **{
                f"{self._lora_file_name}_lora_layers": state,
                f"{self._lora_file_name}_lora_adapter_metadata": config,
            },
            safe_serialization=True,
        )
        return directory

    def load_lora(self, directory: str | Path, trainable: bool = False) -> None:
        """Load a diffusers-format LoRA through the stock pipeline loader. A file that does not read, or whose
        tensors do not all land on this model's denoiser (a LoRA of another model), is a
        :class:`ModelLoadError` naming the file and what it expected, not a warning and the base model."""
        self._load_lora_into(self.denoiser, Path(directory), self._lora_load_kwargs, self.denoiser_name)
        for name, param in self.denoiser.named_parameters():
            param.requires_grad_(trainable and "lora_" in name)

    def _load_lora_into(self, module: nn.Module, directory: Path, kwargs: dict[str, Any], what: str) -> None:
        """Load the LoRA at ``directory`` with the stock loader (``kwargs``) and check that all of its
        tensors landed on ``module`` (the component named ``what``)."""
        if not directory.exists():
            raise ModelLoadError(f"LoRA directory {str(directory)!r} does not exist.")
        files = [directory] if directory.is_file() else sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"LoRA directory {str(directory)!r} holds no .safetensors file.")
        try:
            from safetensors import safe_open

            with safe_open(str(files[0]), "pt") as f:
                in_file = sum(1 for key in f.keys() if "lora" in key)
        except Exception as err:  # noqa: BLE001  (safetensors raises several types for a damaged file)
            raise ModelLoadError(
                f"LoRA file {str(files[0])!r} cannot be read: {' '.join(str(err).split())}"
            ) from None
        before = sum(1 for name, _ in module.named_parameters() if "lora_" in name)
        try:
            self.pipeline.load_lora_weights(str(directory), adapter_name="default", **kwargs)
        except (ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"LoRA {str(directory)!r} does not fit this {self.family} model: {' '.join(str(err).split())}"
            ) from None
        applied = sum(1 for name, _ in module.named_parameters() if "lora_" in name) - before
        if applied == 0 or applied < in_file:
            raise ModelLoadError(
                f"LoRA {str(directory)!r}: {applied} of its {in_file} LoRA tensors apply to this {self.family} "
                f"model's {what}; it was trained for another model (check --model / model.path)."
            )

    def load_weights(self, path: str | Path) -> None:
        """Load full fine-tuned denoiser weights: a checkpoint of a ``model.lora_rank: 0`` run
        (``<run>/checkpoints/step-N``, its ``trainable.safetensors``) or that file. Its tensors are the
        trained ones, named as in the stock denoiser (``pipe.unet.load_state_dict(load_file(f),
        strict=False)`` in diffusers); one whose name or shape does not fit is a :class:`ModelLoadError`."""
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "trainable.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(
                f"weights {str(path)!r}: no such file (pass a checkpoint directory of a full fine-tuning run, "
                "which holds trainable.safetensors, or that file)."
            )
        try:
            state = load_file(str(file))
        except Exception as err:  # noqa: BLE001  (safetensors raises several types for a damaged file)
            raise ModelLoadError(
                f"weights {str(file)!r} cannot be read: {' '.join(str(err).split())}"
            ) from None
        own = self.denoiser.state_dict()
        if any("lora_" in k for k in state) and not any("lora_" in k for k in own):
            raise ModelLoadError(
                f"weights {str(file)!r} hold a LoRA (a run with model.lora_rank > 0): load its diffusers-format "
                "LoRA with --lora <checkpoint>/lora instead."
            )
        alien = [k for k in state if k not in own]
        misshapen = [k for k in state if k in own and own[k].shape != state[k].shape]
        if alien or misshapen or not state:
            what = f"{len(alien)} unknown tensors (e.g. {alien[0]!r})" if alien else "no tensors"
            if misshapen:
                what = f"{len(misshapen)} tensors of other shapes (e.g. {misshapen[0]!r})"
            raise ModelLoadError(
                f"weights {str(file)!r} do not fit this {self.family} model's {self._trained_name}: {what}; they "
                "were trained for another model (check --model / model.path)."
            )
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)

    @contextlib.contextmanager
    def reference(self) -> Iterator[ModelAdapter]:
        """Within this context the model predicts with its LoRA disabled: the reference policy, no copy."""
        if not self.has_lora:
            raise ValueError(
                "a reference prediction needs a LoRA adapter (it disables the adapter); with full fine-tuning "
                "keep a frozen copy of the base model instead."
            )
        for module in self._adapted():
            module.disable_adapters()
        try:
            yield self
        finally:
            for module in self._adapted():
                module.enable_adapters()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Per-block activation checkpointing inside the denoiser (diffusers' own)."""
        for module in self._adapted():
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str) -> None:
        """``"sdpa"`` (PyTorch scaled-dot-product attention, the default) or ``"xformers"`` (GPU only)."""
        if backend == "sdpa":
            if getattr(self, "_xformers", False):
                for module in self._adapted():
                    module.disable_xformers_memory_efficient_attention()
                self._xformers = False
            return
        if backend != "xformers":
            raise ValueError(f"attention backend must be 'sdpa' or 'xformers', got {backend!r}.")
        if self.device.type != "cuda":
            raise ValueError(
                f"xformers attention runs on CUDA devices only; this model is on {self.device}. Use 'sdpa'."
            )
        if importlib.util.find_spec("xformers") is None:
            raise ImportError(
                "the xformers backend needs the xformers package: pip install 'flowalign[xformers]' (GPU only)."
            )
        for module in self._adapted():
            module.enable_xformers_memory_efficient_attention()
        self._xformers = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, kind={self.kind!r}, device={self.device}, dtype={self.dtype})"


FLOW_SCHEDULER_DEFAULTS = {
    "invert_sigmas": (False, None), "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None), "stochastic_sampling": (False, None),
}  # fmt: skip
"""``FlowMatchEulerDiscreteScheduler`` options flowalign does not implement, with their harmless values
(``shift_terminal`` and the shifts are implemented)."""


def check_images(images: Tensor, where: str) -> None:
    """``images`` must be float ``[B, 3, H, W]`` in ``[0, 1]``; ``ValueError`` names what is wrong and how to
    fix it."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        got = getattr(images, "dtype", type(images).__name__)
        raise ValueError(
            f"{where}: images must be a float tensor in [0, 1], got {got}; convert uint8 with images.float() / 255."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{where}: images must have shape [B, 3, H, W], got {tuple(images.shape)}.")
    if images.numel():
        lo, hi = images.detach().aminmax()
        if lo < 0 or hi > 1 or not torch.isfinite(lo + hi):
            raise ValueError(
                f"{where}: image values must lie in [0, 1], found range [{lo.item():.4g}, {hi.item():.4g}]; "
                "images in [-1, 1] map to [0, 1] with (x + 1) / 2."
            )


def refuse_options(config: Any, what: str, defaults: dict[str, Any]) -> None:
    """Raise :class:`ModelLoadError` when ``config`` (a diffusers config) sets an option flowalign does not
    implement to anything but its default: ``defaults`` maps each such option to its harmless value(s)."""
    for name, default in defaults.items():
        value = config.get(name, None)
        allowed = default if isinstance(default, tuple) else (default,)
        if value not in allowed:
            raise ModelLoadError(
                f"the {what} config sets {name}={value!r}, which flowalign does not implement (it would sample "
                f"differently from the stock pipeline); remove it from the config (allowed: {allowed})."
            )


def _stack(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def pipeline_class_name(path: str | Path) -> str | None:
    """The ``_class_name`` of a local diffusers directory's ``model_index.json`` (None if not local)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(
            f"{index} is not valid JSON ({err}); re-save the pipeline with save_pretrained."
        ) from None
    except (KeyError, TypeError):
        raise ModelLoadError(f"{index} has no '_class_name'; it is not a diffusers pipeline index.") from None
    if not isinstance(name, str):
        raise ModelLoadError(f"{index}: '_class_name' must be a pipeline class name, got {name!r}.")
    return name


def _load_pipeline(
    path: str | Path, accepted: tuple[str, ...], dtype: torch.dtype, module: str = "diffusers", **kwargs: Any
):
    path = Path(path).expanduser()
    local = path.exists()
    looks_local = str(path).startswith((".", "/", "~")) or len(path.parts) != 2
    if not local and looks_local:
        raise ModelLoadError(
            f"model directory {str(path)!r} does not exist; pass a local diffusers directory (with model_index.json) "
            "or a hub id such as 'stabilityai/stable-diffusion-3.5-medium'."
        )
    name = pipeline_class_name(path) if local else None
    if local and name is None:
        raise ModelLoadError(
            f"{str(path)!r} has no model_index.json; it is not a diffusers pipeline directory."
        )
    if name is None and len(accepted) > 1 and module == "diffusers":  # a hub id: its model_index.json says
        try:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(str(path)).get("_class_name")
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"could not read the pipeline class of {str(path)!r}: {err}. Offline? Download it first and pass "
                "the local directory."
            ) from None
    cls_name = name or accepted[0]
    if cls_name not in accepted:
        raise ModelLoadError(f"{str(path)!r} holds a {cls_name}; this adapter loads {', '.join(accepted)}.")
    try:
        return getattr(importlib.import_module(module), cls_name).from_pretrained(
            str(path), dtype=dtype, **kwargs
        )
    except OSError as err:
        raise ModelLoadError(
            f"could not load {str(path)!r}: {err}. Offline? Download it first and pass the local directory."
        ) from err
