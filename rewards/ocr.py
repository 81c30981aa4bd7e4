"""Text-rendering reward of Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via
Online RL"; repository yifan123/flow_grpo, ``flow_grpo/ocr.py``), the ``ocr`` reward.

For a prompt like ``A sign that says "Hello World"`` the target is the text between the first pair of
double quotes (``prompt.split('"')[1]``, as Flow-GRPO), or ``metadata["text"]`` when given. The image is
read by an OCR engine; all recognized lines are concatenated in reading order. Following Flow-GRPO, spaces
are removed and both strings lower-cased; if the target occurs inside the recognized text the distance is
0, otherwise the Levenshtein distance ``d``; then

    reward = 1 - min(d, len(target)) / len(target)        in [0, 1]

(``len`` after removing spaces). Not differentiable. A video scores the mean over its frames.

Engine: RapidOCR (``rapidocr_onnxruntime``, Apache-2.0) with the PP-OCRv4 detection and recognition ONNX
models bundled in its wheel, so it runs offline on CPU (``pip install 'flowalign[ocr]'``). Flow-GRPO uses
PaddleOCR (``lang="en"``, ``use_angle_cls=False``) with the same PP-OCR family of models; rapidocr's
default recognizer is the Chinese+English PP-OCRv4 model, so absolute numbers can differ slightly from
PaddleOCR's English model (see docs/rewards.md). Lines are kept when their recognition confidence is
``> min_confidence`` (Flow-GRPO keeps confidence ``> 0``). Images are read one at a time (the engine's API is
per image; its ONNX sessions use ``num_threads`` threads). :data:`PADDLE_DEFAULTS` sets the engine up like
Flow-GRPO's PaddleOCR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rewards._deps import require
from rewards.base import Reward, RewardInputError, RewardOutput, flatten_frames

__all__ = ["PADDLE_DEFAULTS", "OcrReward", "edit_distance", "ocr_reward_value", "target_text"]

PADDLE_DEFAULTS: dict[str, Any] = {
    "det_limit_type": "max",
    "det_limit_side_len": 960,
    "use_cls": False,
    "text_score": 0.5,
}
"""RapidOCR options that reproduce Flow-GRPO's PaddleOCR setup: PaddleOCR's detector resize (longer side
capped at 960, never upscaled; rapidocr's own default upscales the shorter side to 736, which is slower and
reads differently), no angle classifier (``use_angle_cls=False``), and PaddleOCR's ``drop_score`` of 0.5."""


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def target_text(prompt: str, metadata: Mapping[str, Any] | None = None) -> str:
    """The text an image should show: ``metadata["text"]`` or the first double-quoted part of the prompt."""
    if metadata and "text" in metadata:
        text = metadata["text"]
        if not isinstance(text, str):
            raise RewardInputError(f"ocr: metadata['text'] must be a string, got {text!r}.")
    else:
        parts = prompt.split('"')
        if len(parts) < 3:
            raise RewardInputError(
                f'ocr: prompt {prompt!r} has no text in double quotes; write the target as "TEXT" in the prompt '
                "or pass it as metadata['text']."
            )
        text = parts[1]
    if not text.replace(" ", ""):
        raise RewardInputError(
            f"ocr: the target text of prompt {prompt!r} is empty; nothing to score against."
        )
    return text


def ocr_reward_value(recognized: str, target: str) -> float:
    """Flow-GRPO's normalization: spaces removed, lower case, substring match = 0, distance clamped."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    distance = 0 if target in recognized else edit_distance(recognized, target)
    return 1 - min(distance, len(target)) / len(target)


class OcrReward(Reward):
    """OCR text-rendering reward (see the module docstring).

    Args:
        min_confidence: keep recognized lines with confidence above this (Flow-GRPO: 0).
        num_threads: ONNX Runtime intra-op threads per session (-1: the engine's default, all cores).
        engine_kwargs: passed to ``rapidocr_onnxruntime.RapidOCR`` over :data:`PADDLE_DEFAULTS`.
    """

    name = "ocr"
    differentiable = False

    def __init__(
        self,
        min_confidence: float = 0.0,
        num_threads: int = -1,
        engine_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        rapidocr = require("rapidocr_onnxruntime", "ocr", "the ocr reward")
        options = {**PADDLE_DEFAULTS, "intra_op_num_threads": num_threads, **dict(engine_kwargs or {})}
        self.engine = rapidocr.RapidOCR(**options)
        self.min_confidence = float(min_confidence)

    def recognize(self, image: Tensor) -> str:
        """All text lines the engine reads in one ``[3, H, W]`` image, concatenated in reading order."""
        array = (
            (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        )
        # The engine follows OpenCV's BGR convention for arrays.
        result, _ = self.engine(np.ascontiguousarray(array[..., ::-1]))
        if not result:
            return ""
        return "".join(text for _, text, confidence in result if float(confidence) > self.min_confidence)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]
        frames, n_frames = flatten_frames(images)
        texts = [self.recognize(frame) for frame in frames]
        values = [ocr_reward_value(text, targets[i // n_frames]) for i, text in enumerate(texts)]
        scores = torch.tensor(values, dtype=torch.float32).view(len(prompts), n_frames).mean(dim=1)
        recognized = [texts[i * n_frames : (i + 1) * n_frames] for i in range(len(prompts))]
        return RewardOutput(
            scores,
            details={
                "target": targets,
                "recognized": recognized if n_frames > 1 else [r[0] for r in recognized],
            },
        )
