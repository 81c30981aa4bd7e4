"""CLIP image and text towers from a user path, with differentiable tensor preprocessing.

Shared by the ``clip``, ``aesthetic``, ``pickscore`` and ``hpsv2`` rewards and by GenEval's colour
classifier. Two backends load the same architecture family:

- ``"transformers"``: a :class:`transformers.CLIPModel` directory (``config.json`` + weights, tokenizer and
  ``preprocessor_config.json`` in the same directory or in ``processor_path``), loaded with
  ``local_files_only=True`` and never ``trust_remote_code``.
- ``"open_clip"``: an open_clip architecture name (``"ViT-H-14"``) plus a checkpoint file (``.safetensors``
  or a torch file read with ``weights_only=True``; a ``{"state_dict": ...}`` wrapper such as HPSv2's is
  unwrapped), or a directory holding ``open_clip_config.json`` and its weights (open_clip's
  ``local-dir:`` layout). Needs the ``clip`` extra.

Images go through :class:`ImagePreprocess` as tensors, so gradients reach the pixels. It reproduces the
reference pipelines' geometry (CLIPImageProcessor / open_clip: resize the shorter side, centre crop;
HPSv2: resize the longer side, pad) with ``torch.nn.functional.interpolate(mode="bicubic",
antialias=True)`` followed by a clamp to [0, 1]. The reference pipelines resize a uint8 PIL image with
PIL's bicubic filter, so pixel values differ by a few 1/255 after a resize; at the model's native size
(no resize) the input is identical up to the uint8 rounding of the image itself. See docs/rewards.md for
how to compare scores with the reference implementations on real weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards._deps import require
from rewards.weights import RewardWeightsError, require_path

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipTowers",
    "ImagePreprocess",
    "OpenClipTowers",
    "TransformersClipTowers",
    "load_clip",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESIZE_MODES = ("shortest", "longest", "squash")
_TEXT_CACHE_SIZE = 4096


@dataclass(frozen=True)
class ImagePreprocess:
    """Differentiable CLIP preprocessing of ``[N, 3, H, W]`` float images in ``[0, 1]``.

    Attributes:
        size: output ``(height, width)``.
        resize_mode: ``"shortest"`` resizes the shorter side to ``resize_to`` (default ``min(size)``; the
            longer side becomes ``int(resize_to * long / short)`` as CLIPImageProcessor and torchvision compute
            it) and centre-crops to ``size`` (top/left offset ``(h - crop) // 2``); ``"squash"`` resizes to
            ``resize_to`` (default ``size``) ignoring the aspect ratio, then centre-crops; ``"longest"`` resizes
            the longer side to ``max(size)`` (each side ``round(dim * scale)``) and pads with ``fill`` (left/top
            get ``pad // 2``), HPSv2's ``ResizeMaxSize``.
        resize_to: see ``resize_mode``.
        mean, std: per-channel normalization applied last.
        interpolation: ``"bicubic"`` (CLIP's) or ``"bilinear"``.
        fill: pad value in ``[0, 1]`` for ``"longest"`` (HPSv2 pads with 0 before normalizing).
    """

    size: tuple[int, int] = (224, 224)
    resize_mode: str = "shortest"
    resize_to: int | tuple[int, int] | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}.")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}.")

    def __call__(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> normalized ``[N, 3, *size]`` (same dtype as the input)."""
        out_h, out_w = self.size
        height, width = images.shape[-2:]
        if self.resize_mode == "longest":
            scale = max(out_h, out_w) / max(height, width)
            if scale != 1.0:
                new = (round(height * scale), round(width * scale))
                images = self._resize(images, new)
                pad_h, pad_w = out_h - new[0], out_w - new[1]
                images = F.pad(
                    images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=self.fill
                )
        else:
            if self.resize_mode == "shortest":
                short = int(self.resize_to) if self.resize_to is not None else min(out_h, out_w)  # type: ignore[arg-type]
                new = (
                    (short, int(short * width / height))
                    if height <= width
                    else (int(short * height / width), short)
                )
            else:
                target = self.resize_to if self.resize_to is not None else self.size
                new = (target, target) if isinstance(target, int) else tuple(target)  # type: ignore[assignment]
            images = self._resize(images, new)
            top, left = (images.shape[-2] - out_h) // 2, (images.shape[-1] - out_w) // 2
            if top < 0 or left < 0:
                raise ValueError(
                    f"cannot centre-crop {tuple(images.shape[-2:])} to {self.size}; resize_to is too small."
                )
            images = images[..., top : top + out_h, left : left + out_w]
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def _resize(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(images.shape[-2:]) == tuple(size):
            return images
        resized = F.interpolate(
            images, size=size, mode=self.interpolation, align_corners=False, antialias=True
        )
        # PIL's bicubic output is clamped to the uint8 range; keep values in [0, 1] the same way.
        return resized.clamp(0, 1)


class ClipTowers:
    """A frozen CLIP model: ``encode_images`` (differentiable) and ``encode_texts`` (cached, no grad).

    Features are the projected embeddings, *not* normalized; :meth:`logit_scale` is ``exp`` of the
    learned temperature (100 for OpenAI CLIP).
    """

    backend: str = ""
    preprocess: ImagePreprocess

    def __init__(self) -> None:
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipTowers:
        self.model.to(device=device, dtype=dtype)
        self._text_cache.clear()
        return self

    def encode_images(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> ``[N, D]`` float32 image features; gradients flow to ``images``."""
        return self.encode_pixels(self.preprocess(images.float()))

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Already preprocessed (normalized, model-sized) ``[N, 3, h, w]`` -> ``[N, D]`` float32 features."""
        return self._image_features(pixels.to(device=self.device, dtype=self.dtype)).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``N`` strings -> ``[N, D]`` float32 text features (each distinct text computed once, LRU-cached)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            features = self._text_features(missing).float()
            for text, feature in zip(missing, features):
                self._text_cache[text] = feature
        for text in texts:
            self._text_cache.move_to_end(text)
        out = torch.stack([self._text_cache[t] for t in texts])
        while len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return out

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.detach().float().exp()

    def _image_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> Tensor:
        raise NotImplementedError


class TransformersClipTowers(ClipTowers):
    """A :class:`transformers.CLIPModel` directory; tokenizer and image processor from ``processor_path``."""

    backend = "transformers"

    def __init__(self, model_path: str | Path, processor_path: str | Path | None = None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        model_dir = _local_dir(
            model_path, "model_path", "a transformers CLIPModel directory (config.json + weights)"
        )
        processor_dir = (
            model_dir
            if processor_path is None
            else _local_dir(processor_path, "processor_path", "a CLIP tokenizer/processor directory")
        )
        try:
            self._model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as err:
            raise RewardWeightsError(
                f"model_path={str(model_path)!r} is not a loadable transformers CLIPModel directory ({err})."
            ) from err
        self._model.eval().requires_grad_(False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
        except (OSError, ValueError) as err:
            raise RewardWeightsError(
                f"no CLIP tokenizer in {str(processor_dir)!r} ({err}); pass processor_path= a directory with "
                "the tokenizer files (e.g. the laion/CLIP-ViT-H-14-laion2B-s32B-b79K snapshot for PickScore)."
            ) from err
        self.max_length = int(self._model.config.text_config.max_position_embeddings)
        self.preprocess = _preprocess_from_processor(
            processor_dir, self._model.config.vision_config.image_size
        )

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _image_features(self, pixels: Tensor) -> Tensor:
        return _pooled(self._model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return _pooled(
            self._model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )


class OpenClipTowers(ClipTowers):
    """An open_clip model: ``arch`` name + ``checkpoint`` file, or an open_clip ``local-dir`` directory."""

    backend = "open_clip"

    def __init__(
        self, arch: str | Path, checkpoint: str | Path | None = None, resize_mode: str | None = None
    ):
        super().__init__()
        open_clip = require("open_clip", "clip", "the open_clip CLIP backend")
        arch_path = Path(str(arch)).expanduser()
        if arch_path.is_dir():
            if not (arch_path / "open_clip_config.json").is_file():
                raise RewardWeightsError(
                    f"{str(arch)!r} is a directory without open_clip_config.json; pass an open_clip architecture "
                    "name (e.g. 'ViT-H-14') with checkpoint=FILE, or a directory in open_clip's local-dir layout."
                )
            name = f"local-dir:{arch_path}"
            model = open_clip.create_model(name, load_weights=checkpoint is None)
        else:
            name = str(arch)
            if open_clip.get_model_config(name) is None:
                raise ValueError(
                    f"unknown open_clip architecture {name!r}; known ones include 'ViT-L-14', 'ViT-H-14' "
                    "(see open_clip.list_models()), or pass a directory holding open_clip_config.json."
                )
            require_path(
                checkpoint,
                "checkpoint",
                f"open_clip weights for {name} (.safetensors or .pt/.bin)",
                kind="file",
            )
            model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
        if checkpoint is not None:
            path = require_path(checkpoint, "checkpoint", f"open_clip weights for {name}", kind="file")
            try:
                open_clip.load_checkpoint(model, str(path), weights_only=True)
            except Exception as err:
                raise RewardWeightsError(
                    f"checkpoint={str(path)!r} does not load into open_clip {name} ({err}); expected a state dict "
                    "(optionally under 'state_dict') saved with torch.save or as .safetensors."
                ) from err
        self._model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        mode = resize_mode or cfg.get("resize_mode", "shortest")
        if mode not in _RESIZE_MODES:
            raise ValueError(f"open_clip model {name} has resize_mode {mode!r}; supported: {_RESIZE_MODES}.")
        self.preprocess = ImagePreprocess(
            size=size,
            mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
            resize_mode=mode,
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            fill=float(cfg.get("fill_color", 0)) / 255,
        )

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self._model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> Tensor:
        return self._model.encode_text(self.tokenizer(texts).to(self.device))


def load_clip(
    path: str | Path | None,
    backend: str = "transformers",
    *,
    checkpoint: str | Path | None = None,
    processor_path: str | Path | None = None,
    resize_mode: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    argument: str = "clip_path",
) -> ClipTowers:
    """Load CLIP towers from a user path (see the module docstring for the two backends).

    Args:
        path: transformers: the CLIPModel directory; open_clip: an architecture name or a local-dir.
        backend: ``"transformers"`` or ``"open_clip"``.
        checkpoint: open_clip weights file (required with an architecture name).
        processor_path: transformers: where the tokenizer / preprocessor_config.json live, if not in ``path``.
        resize_mode: override the preprocessing's resize mode (``"shortest"``, ``"longest"``, ``"squash"``).
        argument: the caller's argument name, used in errors.
    """
    if path is None or str(path) == "":
        raise RewardWeightsError(
            f"no {argument} given: pass a local CLIP model (a transformers CLIPModel directory, or an open_clip "
            "architecture name with checkpoint=FILE). Nothing is downloaded at run time."
        )
    if backend == "transformers":
        if checkpoint is not None:
            raise ValueError(
                "checkpoint= is for the open_clip backend; a transformers CLIP loads from its directory."
            )
        towers: ClipTowers = TransformersClipTowers(path, processor_path)
        if resize_mode is not None:
            towers.preprocess = _replace(towers.preprocess, resize_mode=resize_mode)
    elif backend == "open_clip":
        if processor_path is not None:
            raise ValueError(
                "processor_path= is for the transformers backend; open_clip has its own tokenizer."
            )
        towers = OpenClipTowers(path, checkpoint, resize_mode)
    else:
        raise ValueError(f"unknown CLIP backend {backend!r}; use 'transformers' or 'open_clip'.")
    return towers.to(device=torch.device(device), dtype=dtype)


def _replace(preprocess: ImagePreprocess, **changes: Any) -> ImagePreprocess:
    return dataclasses.replace(preprocess, **changes)


def _pooled(output: Any) -> Tensor:
    """transformers < 5 returns the projected features; >= 5 a ModelOutput whose pooler_output holds them."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _local_dir(path: str | Path, argument: str, what: str) -> Path:
    resolved = Path(str(path)).expanduser()
    if resolved.is_dir():
        return resolved
    hint = (
        f" If {str(path)!r} is a hub id, download it once with `hf download {path} --local-dir DIR` and pass DIR."
        if "/" in str(path) and not resolved.exists()
        else ""
    )
    raise RewardWeightsError(f"{argument}={str(path)!r} is not a directory; expected {what}.{hint}")


def _preprocess_from_processor(processor_dir: Path, image_size: int) -> ImagePreprocess:
    """Read CLIPImageProcessor's settings from ``preprocessor_config.json`` (defaults: OpenAI CLIP's)."""
    config_file = processor_dir / "preprocessor_config.json"
    if not config_file.is_file():
        return ImagePreprocess(size=(image_size, image_size))
    config = json.loads(config_file.read_text())
    size = config.get("size", image_size)
    crop = config.get("crop_size", size if config.get("do_center_crop", True) is False else image_size)
    if isinstance(size, dict) and "shortest_edge" in size:
        mode, resize_to = "shortest", int(size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size:
        mode, resize_to = "squash", (int(size["height"]), int(size["width"]))
    else:
        mode, resize_to = "shortest", int(size)
    if not config.get("do_center_crop", True):
        if mode == "shortest":
            raise ValueError(
                f"{config_file}: a shortest_edge resize without centre crop gives non-square inputs; "
                "flowalign supports CLIP processors that crop (or resize to a fixed height and width)."
            )
        crop = {"height": resize_to[0], "width": resize_to[1]}  # type: ignore[index]
    crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
    resample = config.get("resample", 3)
    return ImagePreprocess(
        size=crop_hw,
        resize_mode=mode,
        resize_to=resize_to,
        mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
        interpolation="bilinear" if resample == 2 else "bicubic",
    )
