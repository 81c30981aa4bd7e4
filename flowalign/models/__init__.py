"""Model adapters over diffusers pipelines, one file per family, and :func:`load_model`."""

from __future__ import annotations

from pathlib import Path

import torch

from flowalign.models.base import Cond, ModelAdapter, ModelLoadError, pipeline_class_name
from flowalign.models.flux import FluxAdapter
from flowalign.models.moving_shapes import MovingShapesAdapter
from flowalign.models.sd import StableDiffusionAdapter, StableDiffusionXLAdapter
from flowalign.models.sd3 import SD3Adapter
from flowalign.models.shapes import ShapesAdapter
from flowalign.models.wan import WanAdapter

__all__ = ["ADAPTERS", "Cond", "ModelAdapter", "ModelLoadError", "load_model"]

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.family: cls
    for cls in (
        SD3Adapter,
        FluxAdapter,
        StableDiffusionAdapter,
        StableDiffusionXLAdapter,
        ShapesAdapter,
        WanAdapter,
        MovingShapesAdapter,
    )
}


def _adapter_for_pipeline(class_name: str) -> type[ModelAdapter]:
    for cls in ADAPTERS.values():
        if class_name in cls.pipeline_classes:
            return cls
    known = sorted(name for cls in ADAPTERS.values() for name in cls.pipeline_classes)
    raise ModelLoadError(f"no flowalign adapter for a {class_name}; supported pipelines: {', '.join(known)}.")


def load_model(
    model: str | Path,
    *,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> ModelAdapter:
    """Load a model adapter.

    Args:
        model: a local diffusers directory, a hub id (with ``family``, where a hub is reachable),
            ``"shapes"`` for the shipped shapes-world model (``assets/shapes/model``), ``"moving_shapes"`` for the
            moving-shapes world's image-to-video model (``assets/moving_shapes/model``), or
            ``"tiny-<family>"`` for a tiny random pipeline built in code (tests and demos; ``tiny-wan`` is Wan 2.1
            image-to-video, ``tiny-wan22`` Wan 2.2 with two experts, ``tiny-wan-t2v`` / ``tiny-wan22-t2v`` their
            text-to-video counterparts).
        family: the adapter to use (``sd3``, ``flux``, ``sd``, ``sdxl``, ``shapes``, ``wan``); read from ``model_index.json``
            when omitted.
    """
    if family is not None and family not in ADAPTERS:
        raise ModelLoadError(f"unknown model family {family!r}; known families: {', '.join(ADAPTERS)}.")
    name = str(model)
    if name == "shapes":
        from flowalign.models.shapes import SHIPPED_MODEL

        name = str(SHIPPED_MODEL)
    if name == "moving_shapes":
        from flowalign.models.moving_shapes import SHIPPED_VIDEO_MODEL

        name = str(SHIPPED_VIDEO_MODEL)
    if name.startswith("tiny-"):
        from flowalign.models.tiny import tiny_pipeline

        tiny_family = name.removeprefix("tiny-")
        known = (*ADAPTERS, "wan22", "wan-t2v", "wan22-t2v")
        if tiny_family not in known:
            raise ModelLoadError(
                f"unknown tiny model {name!r}; choose one of {', '.join('tiny-' + f for f in known)}."
            )
        if tiny_family == "shapes":  # the shapes families build their own (untrained) pipelines
            from flowalign.models.shapes import tiny_shapes_pipeline as build
        elif tiny_family == "moving_shapes":
            from flowalign.models.moving_shapes import tiny_moving_shapes_pipeline as build
        else:
            build = lambda: tiny_pipeline(tiny_family)  # noqa: E731
        if tiny_family.startswith("wan"):
            kwargs.setdefault("num_frames", 5)
        adapter = ADAPTERS["wan" if tiny_family.startswith("wan") else tiny_family]
        return adapter(build(), device=device, dtype=dtype, **kwargs)
    if family is None:
        class_name = pipeline_class_name(Path(name).expanduser())
        if class_name is None:
            if not Path(name).expanduser().exists():
                raise ModelLoadError(
                    f"model directory {name!r} does not exist; pass an existing diffusers directory, or a hub id "
                    f"together with family=... ({', '.join(ADAPTERS)})."
                )
            raise ModelLoadError(
                f"{name!r} has no model_index.json; it is not a diffusers pipeline directory."
            )
        adapter = _adapter_for_pipeline(class_name)
    else:
        adapter = ADAPTERS[family]
    return adapter.from_pretrained(name, device=device, dtype=dtype, **kwargs)
