"""Real-image detectors for GenEval built on transformers (Mask2Former instance segmentation, OWLv2
open-vocabulary detection) with GenEval's zero-shot CLIP colour classifier.

A detector is a callable ``detector(images) -> list[list[Detection]]`` over ``[B, 3, H, W]`` images in
[0, 1] with attributes ``classes`` and ``colors`` (its vocabularies, or None when open) that
:func:`rewards.geneval.evaluate` uses to reject prompts naming things it can never detect. The shapes
world's exact detector (:class:`rewards.shapes.ShapesDetector`) follows the same protocol; this module
does not import it, so the GenEval package stays detector-agnostic.

GenEval (Ghosh et al. 2023; djghosh13/geneval ``evaluation/evaluate_images.py``) runs mmdetection's
Mask2Former (Swin-S, COCO instance segmentation) and, for clauses with a colour, classifies each object's
colour zero-shot with OpenAI CLIP ViT-L/14 over :data:`GENEVAL_COLORS`: the image is composited over a
grey ``#999`` background through the object's mask, cropped to its box, and compared with the text
embeddings of three templates (``"a photo of a {c} {class}"``, ``"a photo of a {c}-colored {class}"``,
``"a photo of a {c} object"``) averaged per colour (clip_benchmark's zero-shot classifier). Here the
colour of every kept detection is classified up front (GenEval classifies the top-``count`` objects of a
clause, which are among them, so verdicts agree). Weights come from user paths; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.geneval.scorer import THRESHOLD, Detection

__all__ = [
    "COCO_CLASSES",
    "GENEVAL_COLORS",
    "ClipColorClassifier",
    "Detector",
    "Mask2FormerDetector",
    "Owlv2Detector",
    "box_from_mask",
]

GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)  # fmt: skip
"""GenEval's colour vocabulary (``COLORS`` in evaluate_images.py)."""

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""GenEval's ``object_names.txt``: the 80 COCO classes in COCO order, with GenEval's names."""

# COCO names as Hugging Face COCO checkpoints spell them -> GenEval's names.
_COCO_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "hair dryer": "hair drier",
}
_COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GENEVAL_BACKGROUND = 0x99 / 255
"""The grey GenEval composites a masked object over (its ``bgcolor`` option, ``#999``)."""


class Detector(Protocol):
    """What the ``geneval`` reward and flowalign's GenEval benchmark call: ``[B, 3, H, W]`` images in [0, 1]
    -> ``B`` detection lists (``color`` filled in when prompts ask for colours)."""

    classes: Collection[str] | None
    colors: Collection[str] | None

    def __call__(self, images: Tensor) -> list[list[Detection]]: ...


def box_from_mask(mask: Tensor) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` of a ``[H, W]`` boolean mask, ``x1``/``y1`` exclusive (mmdetection's mask2bbox)."""
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    if len(xs) == 0:
        return None
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


class ClipColorClassifier:
    """GenEval's zero-shot colour classifier over a CLIP model (see the module docstring).

    Args:
        clip_path, backend, checkpoint: a CLIP model as in :func:`rewards.clip_models.load_clip` (GenEval:
            open_clip ``ViT-L-14`` with OpenAI weights).
        colors: the colour vocabulary (GenEval's ten by default).
    """

    def __init__(
        self,
        clip_path: str | Path,
        backend: str = "open_clip",
        checkpoint: str | Path | None = None,
        colors: Sequence[str] = GENEVAL_COLORS,
        device: str | torch.device = "cpu",
    ):
        from rewards.clip_models import load_clip

        self.towers = load_clip(
            clip_path, backend, checkpoint=checkpoint, device=device, argument="clip_path"
        )
        self.colors = tuple(colors)
        self._classifiers: dict[str, Tensor] = {}

    def classifier(self, class_name: str) -> Tensor:
        """``[D, n_colors]``: per colour, the renormalized mean of the normalized template embeddings."""
        if class_name not in self._classifiers:
            weights = []
            for color in self.colors:
                texts = [t.format(c=color, cls=class_name) for t in _COLOR_TEMPLATES]
                embedding = F.normalize(self.towers.encode_texts(texts), dim=-1).mean(dim=0)
                weights.append(F.normalize(embedding, dim=-1))
            self._classifiers[class_name] = torch.stack(weights, dim=1)
        return self._classifiers[class_name]

    @torch.no_grad()
    def __call__(
        self, image: Tensor, boxes: Sequence[Sequence[float]], masks: Sequence[Tensor | None], class_name: str
    ) -> list[str]:
        """Colour names of the objects ``boxes[i]`` (with optional ``[H, W]`` masks) of one ``[3, H, W]`` image."""
        if not boxes:
            return []
        crops = []
        for box, mask in zip(boxes, masks):
            composite = (
                image
                if mask is None
                else torch.where(mask.bool().to(image.device), image, GENEVAL_BACKGROUND)
            )
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
            crop = composite[:, y0:y1, x0:x1]
            crops.append(self.towers.preprocess(crop.unsqueeze(0).float()))
        features = self.towers.encode_pixels(torch.cat(crops))
        logits = F.normalize(features, dim=-1) @ self.classifier(class_name).to(features.device)
        return [self.colors[int(i)] for i in logits.argmax(dim=1)]


def _to_pil(images: Tensor) -> list[Any]:
    from PIL import Image

    arrays = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


class _ColorMixin:
    color_classifier: ClipColorClassifier | None

    def _with_colors(
        self, image: Tensor, found: list[tuple[str, tuple[float, float, float, float], float, Tensor | None]]
    ) -> list[Detection]:
        colors: list[str | None] = [None] * len(found)
        if self.color_classifier is not None:
            by_class: dict[str, list[int]] = {}
            for index, (name, *_rest) in enumerate(found):
                by_class.setdefault(name, []).append(index)
            for name, indices in by_class.items():
                names = self.color_classifier(
                    image, [found[i][1] for i in indices], [found[i][3] for i in indices], name
                )
                for i, color in zip(indices, names):
                    colors[i] = color
        return [
            Detection(
                class_name=name,
                color=color,
                bbox=box,
                confidence=score,
                pixel_count=None if mask is None else int(mask.sum()),
            )
            for (name, box, score, mask), color in zip(found, colors)
        ]


class Mask2FormerDetector(_ColorMixin):
    """Mask2Former instance segmentation via transformers (GenEval's detector family), colours by CLIP.

    Args:
        model_path: a local ``Mask2FormerForUniversalSegmentation`` directory with its image processor
            (e.g. a snapshot of ``facebook/mask2former-swin-small-coco-instance``; GenEval used the
            mmdetection Swin-S COCO checkpoint, whose numbers this reproduces up to post-processing details).
        clip_path, clip_backend, clip_checkpoint: the colour classifier's CLIP (None: no colours; prompts with
            a colour clause then fail loudly in the scorer).
        min_confidence: detections at or below it are dropped before scoring (GenEval's scorer applies its
            own thresholds, 0.3 and 0.9 for counting, on top).
        label_aliases: checkpoint label -> GenEval class name (COCO's "mouse" -> "computer mouse", ...).
    """

    def __init__(
        self,
        model_path: str | Path,
        clip_path: str | Path | None = None,
        clip_backend: str = "open_clip",
        clip_checkpoint: str | Path | None = None,
        min_confidence: float = THRESHOLD,
        label_aliases: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from rewards.weights import RewardWeightsError, require_path

        path = require_path(model_path, "model_path", "a transformers Mask2Former directory", kind="dir")
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(path), local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise RewardWeightsError(
                f"model_path={str(model_path)!r} is not a loadable Mask2Former directory ({err})."
            ) from err
        self.device = torch.device(device)
        self.model.eval().requires_grad_(False).to(self.device)
        aliases = {**_COCO_ALIASES, **dict(label_aliases or {})}
        self.labels = {int(i): aliases.get(name, name) for i, name in self.model.config.id2label.items()}
        self.classes = tuple(dict.fromkeys(self.labels.values()))
        self.color_classifier = (
            None
            if clip_path is None
            else ClipColorClassifier(clip_path, clip_backend, clip_checkpoint, device=device)
        )
        self.colors = None if self.color_classifier is None else self.color_classifier.colors
        self.min_confidence = float(min_confidence)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[list[Detection]]:
        inputs = self.processor(images=_to_pil(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [tuple(images.shape[-2:])] * len(images)
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.min_confidence, target_sizes=sizes, return_binary_maps=True
        )
        detections = []
        for image, result in zip(images, results):
            found = []
            masks = result["segmentation"]
            for k, info in enumerate(result["segments_info"]):
                mask = masks[k].bool() if masks.ndim == 3 else masks == info["id"]
                box = box_from_mask(mask)
                if box is None or info["score"] <= self.min_confidence:
                    continue
                found.append((self.labels[int(info["label_id"])], box, float(info["score"]), mask))
            detections.append(self._with_colors(image, found))
        return detections


class Owlv2Detector(_ColorMixin):
    """OWLv2 open-vocabulary detection via transformers, queried with GenEval's class names.

    Queries are ``query_template.format(class_name)`` for every class in ``classes`` (default: GenEval's 80
    COCO names). OWLv2 returns many overlapping boxes per object, so per-class NMS (``nms_iou``) runs
    before scoring; GenEval's own counting has no NMS because Mask2Former's queries do not overlap.
    No masks: the colour classifier sees the box crop.
    """

    def __init__(
        self,
        model_path: str | Path,
        clip_path: str | Path | None = None,
        clip_backend: str = "open_clip",
        clip_checkpoint: str | Path | None = None,
        classes: Sequence[str] = COCO_CLASSES,
        query_template: str = "a photo of a {}",
        min_confidence: float = 0.1,
        nms_iou: float = 0.5,
        device: str | torch.device = "cpu",
    ):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        from rewards.weights import RewardWeightsError, require_path

        path = require_path(model_path, "model_path", "a transformers OWLv2 directory", kind="dir")
        try:
            self.model = Owlv2ForObjectDetection.from_pretrained(str(path), local_files_only=True)
            self.processor = Owlv2Processor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise RewardWeightsError(
                f"model_path={str(model_path)!r} is not a loadable OWLv2 directory ({err})."
            ) from err
        self.device = torch.device(device)
        self.model.eval().requires_grad_(False).to(self.device)
        self.classes = tuple(classes)
        self.queries = [query_template.format(c) for c in self.classes]
        self.color_classifier = (
            None
            if clip_path is None
            else ClipColorClassifier(clip_path, clip_backend, clip_checkpoint, device=device)
        )
        self.colors = None if self.color_classifier is None else self.color_classifier.colors
        self.min_confidence = float(min_confidence)
        self.nms_iou = float(nms_iou)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[list[Detection]]:
        from torchvision.ops import batched_nms

        inputs = self.processor(
            text=[self.queries] * len(images),
            images=_to_pil(images),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.device)
        outputs = self.model(**inputs)
        height, width = images.shape[-2:]
        side = max(height, width)  # OWLv2 pads to a square at the bottom/right before resizing
        results = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.min_confidence, target_sizes=[(side, side)] * len(images)
        )
        detections = []
        for image, result in zip(images, results):
            boxes = result["boxes"].float()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            keep = batched_nms(boxes, result["scores"].float(), result["labels"], self.nms_iou)
            found = [
                (
                    self.classes[int(result["labels"][k])],
                    tuple(float(v) for v in boxes[k]),
                    float(result["scores"][k]),
                    None,
                )
                for k in keep.tolist()
                if boxes[k, 2] > boxes[k, 0] and boxes[k, 3] > boxes[k, 1]
            ]
            detections.append(self._with_colors(image, found))
        return detections
