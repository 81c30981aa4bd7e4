"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation"; weights ``yuvalkirstain/PickScore_v1``, processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``),
the ``pickscore`` reward.

A CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences, used as in the authors' inference snippet and in
Flow-GRPO's ``pickscore_scorer.py``: CLIPProcessor preprocessing (shorter side to 224, bicubic, centre
crop, OpenAI mean/std), projected image and text features L2-normalized, ``score = exp(logit_scale) *
cos`` (``logit_scale`` is the checkpoint's, ~100; typical scores are ~18-24). Flow-GRPO divides by 26 to
train on ~[0, 1]: pass ``divisor=26`` for that. Differentiable (tensor preprocessing).

Weights: a local snapshot of ``yuvalkirstain/PickScore_v1`` (``model_path``) and of the LAION processor
(``processor_path``, where the tokenizer and ``preprocessor_config.json`` live; the PickScore repo has no
tokenizer). Nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewards.clip import ClipReward

__all__ = ["PickScoreReward"]


class PickScoreReward(ClipReward):
    """``exp(logit_scale) * cos(image, prompt) / divisor`` with a transformers PickScore CLIPModel."""

    name = "pickscore"

    def __init__(
        self,
        model_path: str | Path | None = None,
        processor_path: str | Path | None = None,
        divisor: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(
            clip_path=model_path,
            backend="transformers",
            processor_path=processor_path,
            scale="logit_scale",
            divisor=divisor,
            **kwargs,
        )
