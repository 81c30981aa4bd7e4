"""Video rewards: ``motion`` (how much a video moves) and ``temporal_consistency`` (whether its subject stays the
same across frames). Both score videos ``[B, T, 3, H, W]`` only; images are an error, since a single frame
has neither motion nor consistency.

**motion** is the mean absolute difference of consecutive frames, ``mean_t mean_pixels |f_{t+1} - f_t|``
(pixel values in ``[0, 1]``; 0 for a still video). It is how the "still video" hack of identity and
consistency rewards is measured and penalised: a model that stops moving keeps its first frame's identity
perfectly. Give it a positive weight to reward motion, or ``target=m`` to score ``-|motion - m|`` (closest
to a wanted amount). Differentiable.

**temporal_consistency** is VBench's *subject consistency* (Huang et al. 2024, "VBench: Comprehensive
Benchmark Suite for Video Generative Models", Sec. 3.1; ``vbench/subject_consistency.py``): with ``d_t``
the L2-normalised features of frame ``t``, the score is
``mean_{t >= 1} (max(0, cos(d_{t-1}, d_t)) + max(0, cos(d_0, d_t))) / 2``. VBench's features are DINO
ViT-B/16's; here ``features="clip"`` uses a local CLIP image tower (``clip_path``, as the ``clip`` reward
loads it; nothing is downloaded) and the default ``features="random_conv"`` the frozen random
convolutional statistics of the ``artifact`` reward (no weights at all, a tiny default that notices colour
and texture changes but not identity). Differentiable with either.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import Reward, RewardInputError, RewardOutput

__all__ = ["MotionReward", "TemporalConsistencyReward", "subject_consistency"]


def _videos(images: Tensor, name: str) -> Tensor:
    if images.ndim != 5 or images.shape[1] < 2:
        raise RewardInputError(
            f"{name}: scores videos [B, T, 3, H, W] with T >= 2 frames, got shape {tuple(images.shape)}; an image "
            "has no motion or temporal consistency (use an image reward, or add the frames axis)."
        )
    return images


class MotionReward(Reward):
    """Mean absolute difference of consecutive frames (see the module docstring).

    Args:
        target: None scores the motion itself; a number scores ``-|motion - target|``.
    """

    name = "motion"
    differentiable = True

    def __init__(self, target: float | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if target is not None and not 0 <= float(target) <= 1:
            raise ValueError(f"{self.name}: target is a mean frame difference in [0, 1], got {target!r}.")
        self.target = None if target is None else float(target)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        videos = _videos(images, self.name).float()
        motion = (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(1)
        scores = motion if self.target is None else -(motion - self.target).abs()
        return RewardOutput(scores, details={"motion": motion.detach()})


def subject_consistency(features: Tensor) -> Tensor:
    """VBench's subject consistency of ``[B, T, D]`` per-frame features: ``[B]`` in ``[0, 1]``."""
    d = F.normalize(features.float(), dim=-1)
    previous = (d[:, :-1] * d[:, 1:]).sum(-1).clamp(min=0)
    first = (d[:, :1] * d[:, 1:]).sum(-1).clamp(min=0)
    return ((previous + first) / 2).mean(1)


class TemporalConsistencyReward(Reward):
    """VBench subject consistency over per-frame features (see the module docstring).

    Args:
        features: ``"random_conv"`` (default, no weights) or ``"clip"`` (a local CLIP model).
        clip_path, backend, checkpoint: the CLIP model for ``features="clip"`` (as the ``clip`` reward).
        image_size: frames are resized to this side for the random-conv features (bilinear, antialiased).
    """

    name = "temporal_consistency"
    differentiable = True

    def __init__(
        self,
        features: str = "random_conv",
        clip_path: str | None = None,
        backend: str = "transformers",
        checkpoint: str | None = None,
        image_size: int = 64,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if features not in ("random_conv", "clip"):
            raise ValueError(f"{self.name}: features must be 'random_conv' or 'clip', got {features!r}.")
        if features == "random_conv" and clip_path is not None:
            raise ValueError(
                f"{self.name}: clip_path is for features='clip'; add features: clip or drop clip_path."
            )
        self.features = features
        self.image_size = int(image_size)
        self._conv: nn.Module | None = None
        self._clip = None
        if features == "clip":
            from rewards.clip_models import load_clip

            self._clip = load_clip(
                clip_path,
                backend,
                checkpoint=checkpoint,
                device=self.device,
                dtype=self.dtype,
                argument="clip_path",
            )
        else:
            from rewards.artifact import RandomConvFeatures

            self._conv = RandomConvFeatures(seed=seed).to(self.device).eval()

    def modules(self) -> list[nn.Module]:
        return [self._conv] if self._conv is not None else [self._clip.model]

    def frame_features(self, frames: Tensor) -> Tensor:
        """``[N, 3, H, W]`` frames in ``[0, 1]`` -> ``[N, D]`` features (differentiable)."""
        if self._clip is not None:
            return self._clip.encode_images(frames)
        resized = F.interpolate(
            frames.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True
        )
        return self._conv(resized)

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        videos = _videos(images, self.name)
        batch, frames = videos.shape[:2]
        features = self.frame_features(videos.flatten(0, 1)).view(batch, frames, -1)
        return RewardOutput(subject_consistency(features))
