"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating Human
Preferences of Text-to-Image Synthesis"; repository tgxs002/HPSv2, weights ``xswu/HPSv2`` files
``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``), the ``hpsv2`` reward.

An open_clip ViT-H-14 fine-tuned on HPD v2, scored as in HPSv2's ``img_score.py`` and Flow-GRPO's
``hpsv2_scorer.py``: the validation transform of ``create_model_and_transforms(..., light_augmentation=True)``
(``ResizeMaxSize(224)``: resize the longer side to 224, bicubic, pad with black, then OpenAI mean/std),
normalized image and text features, ``score = cos`` (typically ~0.2-0.35). Differentiable (tensor
preprocessing). Needs ``pip install 'flowalign[clip]'``.

Weights: the HPS checkpoint file (a ``{"state_dict": ...}`` torch file; read with ``weights_only=True``)
given as ``checkpoint``; the architecture defaults to ``ViT-H-14``. Nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewards.clip import ClipReward

__all__ = ["HPSv2Reward"]


class HPSv2Reward(ClipReward):
    """Cosine similarity under the HPSv2 open_clip model, with HPSv2's resize-longest-and-pad preprocessing."""

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        arch: str | Path = "ViT-H-14",
        resize_mode: str = "longest",
        **kwargs: Any,
    ):
        from rewards.weights import require_path

        if not Path(str(arch)).is_dir():
            require_path(
                checkpoint,
                "checkpoint",
                "the HPSv2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt from xswu/HPSv2)",
                kind="file",
            )
        super().__init__(
            clip_path=arch,
            backend="open_clip",
            checkpoint=checkpoint,
            resize_mode=resize_mode,
            scale=1.0,
            **kwargs,
        )
