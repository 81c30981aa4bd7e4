"""The ``geneval`` reward: GenEval's verdict (or Flow-GRPO's partial credit) on each image's detections.

``mode="strict"`` scores 1.0 when GenEval judges the image correct and 0.0 otherwise (the benchmark's
metric, :attr:`GenEvalResult.correct`); ``mode="partial"`` scores :attr:`GenEvalResult.score`, the
partial-credit reward in [0, 1] Flow-GRPO trains with (one term per clause requirement; see
:func:`rewards.geneval.evaluate`). Every sample's metadata must carry GenEval's clauses (``tag``,
``include``, optional ``exclude``); details report ``correct``, ``strict_correct`` (Flow-GRPO's exact-count
verdict), ``partial`` and GenEval's failure ``reason`` for all modes. Not differentiable.

Detectors (``detector=``): ``"shapes"`` (default; the shapes world's exact detector, no weights),
``"mask2former"`` or ``"owlv2"`` (transformers models from user paths, with a CLIP colour classifier,
see :mod:`rewards.geneval.detectors`; options in ``detector_kwargs``), or any object following the
:class:`~rewards.geneval.detectors.Detector` protocol (``images -> detection lists``).

This module composes the detector-agnostic scorer (:mod:`rewards.geneval`) with detectors, so it lives
outside that package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rewards.base import Reward, RewardInputError, RewardOutput
from rewards.geneval.detectors import Detector, Mask2FormerDetector, Owlv2Detector
from rewards.geneval.scorer import COUNTING_THRESHOLD, POSITION_THRESHOLD, THRESHOLD, MetadataError, evaluate
from rewards.shapes.detector import ShapesDetector

__all__ = ["DETECTORS", "GenEvalReward", "load_detector"]

_MODES = ("strict", "partial")
DETECTORS = {"shapes": ShapesDetector, "mask2former": Mask2FormerDetector, "owlv2": Owlv2Detector}
"""GenEval detectors by name: the shapes world's (no weights), Mask2Former and OWLv2 (+ CLIP colour) from
user paths."""


def load_detector(name: str, device: str | torch.device = "cpu", **options: Any) -> Detector:
    """The detector ``name`` (:data:`DETECTORS`) built with ``options`` (e.g. ``model_path``, ``clip_path``
    for Mask2Former and OWLv2; the shapes detector takes ``min_confidence`` only)."""
    if name not in DETECTORS:
        raise ValueError(
            f"unknown GenEval detector {name!r}; use one of {sorted(DETECTORS)} (Mask2Former and OWLv2 take "
            "model_path and clip_path options)."
        )
    if name != "shapes":
        options.setdefault("device", device)
    try:
        return DETECTORS[name](**options)
    except TypeError as err:
        raise ValueError(f"GenEval detector {name!r}: {err}") from None


class GenEvalReward(Reward):
    """GenEval scorer over a pluggable detector (see the module docstring).

    Args:
        detector: ``"shapes"``, ``"mask2former"``, ``"owlv2"`` or a :class:`Detector` instance.
        mode: ``"strict"`` (1/0 GenEval verdict) or ``"partial"`` (Flow-GRPO partial credit).
        detector_kwargs: constructor arguments of a named detector (e.g. ``model_path``, ``clip_path``).
        threshold, counting_threshold, position_threshold: GenEval's options.
    """

    name = "geneval"
    differentiable = False

    def __init__(
        self,
        detector: str | Detector = "shapes",
        mode: str = "strict",
        detector_kwargs: Mapping[str, Any] | None = None,
        threshold: float = THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        position_threshold: float = POSITION_THRESHOLD,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"{self.name}: mode must be one of {_MODES}, got {mode!r}.")
        if isinstance(detector, str):
            if detector not in DETECTORS:
                raise ValueError(
                    f"{self.name}: unknown detector {detector!r}; use one of {sorted(DETECTORS)} or pass a "
                    "detector object: images [B, 3, H, W] -> list of B detection lists."
                )
            self.detector: Detector = load_detector(detector, self.device, **dict(detector_kwargs or {}))
        else:
            if detector_kwargs:
                raise ValueError(
                    f"{self.name}: detector_kwargs are for a named detector, not a detector object."
                )
            if not callable(detector):
                raise TypeError(
                    f"{self.name}: detector must be a name or a callable, got {type(detector).__name__}."
                )
            self.detector = detector
        self.mode = mode
        self.options = {
            "threshold": threshold,
            "counting_threshold": counting_threshold,
            "position_threshold": position_threshold,
        }

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        if images.ndim != 4:
            raise RewardInputError(
                f"{self.name}: GenEval judges images [B, 3, H, W], got {tuple(images.shape)}; score video frames "
                "as separate images."
            )
        detections = self.detector(images)
        if len(detections) != len(prompts):
            raise RuntimeError(
                f"{self.name}: the detector returned {len(detections)} lists for {len(prompts)} images."
            )
        results = []
        for index, (dets, meta) in enumerate(zip(detections, metadata)):
            try:
                results.append(
                    evaluate(
                        dets,
                        meta,
                        classes=getattr(self.detector, "classes", None),
                        colors=getattr(self.detector, "colors", None),
                        **self.options,
                    )
                )
            except MetadataError as err:
                raise RewardInputError(
                    f"{self.name}: sample {index} (prompt {prompts[index]!r}): {err} Pass GenEval metadata "
                    "(tag, include, exclude) for every image."
                ) from err
        correct = torch.tensor([float(r.correct) for r in results])
        partial = torch.tensor([r.score for r in results], dtype=torch.float32)
        return RewardOutput(
            correct if self.mode == "strict" else partial,
            details={
                "correct": [r.correct for r in results],
                "strict_correct": [r.strict_correct for r in results],
                "partial": partial,
                "reason": [r.reason for r in results],
                "n_detections": [len(d) for d in detections],
            },
        )
