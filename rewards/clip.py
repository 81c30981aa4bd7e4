"""CLIP image-text similarity (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), the ``clip`` reward.

``score = scale * cos(E_img(x), E_txt(prompt)) / divisor`` with ``scale = 1`` by default (raw cosine in
``[-1, 1]``, what DDPO-style and ReNO-style CLIP rewards optimize up to a constant), or ``scale =
"logit_scale"`` for the model's ``exp(logit_scale)`` (100 for OpenAI CLIP: CLIPScore's ``100 * cos``
without its clamp at 0, and PickScore's convention). Differentiable: preprocessing runs on tensors
(:mod:`rewards.clip_models`), so gradients reach the images. A video ``[B, T, 3, H, W]`` scores the mean
over its frames.

Weights come from a user path: a transformers ``CLIPModel`` directory (``backend="transformers"``) or an
open_clip architecture + checkpoint / local-dir (``backend="open_clip"``, ``pip install 'flowalign[clip]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardOutput, flatten_frames
from rewards.clip_models import ClipTowers, load_clip

__all__ = ["ClipReward"]


class ClipReward(Reward):
    """Cosine similarity between CLIP image and prompt embeddings (see the module docstring).

    Args:
        clip_path: transformers CLIPModel directory, or an open_clip architecture name / local-dir.
        backend: ``"transformers"`` or ``"open_clip"``.
        checkpoint: open_clip weights file (with an architecture name).
        processor_path: transformers tokenizer + preprocessor directory when not inside ``clip_path``.
        resize_mode: override the preprocessing's resize (``"shortest"``, ``"longest"``, ``"squash"``).
        scale: a number, or ``"logit_scale"`` for the model's ``exp(logit_scale)``.
        divisor: the score is divided by it (Flow-GRPO divides PickScore by 26 to bring it near [0, 1]).
    """

    name = "clip"
    differentiable = True

    def __init__(
        self,
        clip_path: str | Path | None = None,
        backend: str = "transformers",
        checkpoint: str | Path | None = None,
        processor_path: str | Path | None = None,
        resize_mode: str | None = None,
        scale: float | str = 1.0,
        divisor: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not (scale == "logit_scale" or isinstance(scale, (int, float))):
            raise ValueError(f"{self.name}: scale must be a number or 'logit_scale', got {scale!r}.")
        if not divisor:
            raise ValueError(f"{self.name}: divisor must be non-zero, got {divisor!r}.")
        self.towers: ClipTowers = load_clip(
            clip_path,
            backend,
            checkpoint=checkpoint,
            processor_path=processor_path,
            resize_mode=resize_mode,
            device=self.device,
            dtype=self.dtype,
        )
        self.scale = scale
        self.divisor = float(divisor)

    def modules(self) -> list[torch.nn.Module]:
        return [self.towers.model]

    def to(self, device: str | torch.device) -> ClipReward:
        super().to(device)
        self.towers.to(device=self.device)
        return self

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        frames, n_frames = flatten_frames(images)
        image_features = self.towers.encode_images(frames)
        text_features = self.towers.encode_texts([p for p in prompts for _ in range(n_frames)])
        cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        cosine = cosine.view(len(prompts), n_frames).mean(dim=1)
        scale = self.towers.logit_scale() if self.scale == "logit_scale" else float(self.scale)
        return RewardOutput(scale * cosine / self.divisor, details={"cosine": cosine.detach()})
