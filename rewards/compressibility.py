"""JPEG (in)compressibility, the classic DDPO reward (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning", Sec. 6.1): the size in kilobytes of the image saved as JPEG at quality 95.
``compressibility`` is the negative size (smaller files score higher), ``incompressibility`` the size.
Not differentiable. A video is scored as the mean over its frames.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import Reward, RewardOutput

__all__ = ["CompressibilityReward", "IncompressibilityReward", "jpeg_size_kb"]


def jpeg_size_kb(image: Tensor, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of one ``[3, H, W]`` image in [0, 1] encoded as JPEG, as DDPO measures it."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class IncompressibilityReward(Reward):
    """JPEG size in kB; larger is better."""

    name = "incompressibility"
    sign = 1.0

    def __init__(self, quality: int = 95, **kwargs: Any):
        super().__init__(**kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"{self.name}: JPEG quality must be in [1, 100], got {quality}.")
        self.quality = quality

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        frames = images if images.ndim == 5 else images.unsqueeze(1)
        sizes = torch.tensor(
            [[jpeg_size_kb(f, self.quality) for f in video] for video in frames], dtype=torch.float32
        ).mean(dim=1)
        return RewardOutput(self.sign * sizes, details={"jpeg_kb": sizes})


class CompressibilityReward(IncompressibilityReward):
    """Negative JPEG size in kB; smaller files are better."""

    name = "compressibility"
    sign = -1.0
