"""Image files as reward inputs: an explicit conversion to ``[3, H, W]`` float RGB in ``[0, 1]``.

Every conversion is stated, none silent:

- **8-bit** RGB, greyscale, palette, bilevel and CMYK images convert to RGB (``value / 255``).
- **16-bit** greyscale (PIL modes ``I;16*``, and ``I`` from a PNG) scales by ``1 / 65535``: never clipped at
  255; a 16-bit image with a transparent colour is refused. (PIL reads 16-bit RGB PNGs as 8-bit RGB itself,
  by scaling.) Other 32-bit integer and floating-point images are refused.
- **Transparency** (an alpha channel, or a palette or greyscale image with a transparent colour): an image
  whose pixels are all opaque converts as it is; one with any transparent pixel is composited on
  ``background`` (``"white"``, ``"black"`` or ``(r, g, b)`` in 0-255) when one is given, and refused
  otherwise, because what a transparent pixel should look like is the user's choice.
- **Size**: images of more than ``max_pixels`` pixels (:data:`MAX_PIXELS` by default; None: no limit, also
  lifting Pillow's own) are refused before they are decoded (a 12000 x 12000 PNG would take ~1.7 GB as
  float RGB).
- A file that is not an image or is truncated is one :class:`ImageLoadError` naming it and the cause.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["MAX_PIXELS", "ImageLoadError", "load_image", "parse_background"]

MAX_PIXELS = 4096 * 4096
"""Default size limit (pixels): 16.8 megapixels, 201 MB as float RGB."""

_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


class ImageLoadError(ValueError):
    """An image file that cannot be used as it is (names the file, the cause and the fix)."""


def parse_background(value: str | tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """``"white"``, ``"black"``, ``"R,G,B"`` (0-255) or a tuple -> an RGB tuple; None stays None."""
    if value is None or isinstance(value, tuple):
        return value
    if value in _BACKGROUNDS:
        return _BACKGROUNDS[value]
    try:
        rgb = tuple(int(v) for v in value.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ImageLoadError(
            f"background {value!r} is not a colour; use white, black or R,G,B with values 0-255 (e.g. 128,128,128)."
        )
    return rgb  # type: ignore[return-value]


def load_image(
    path: str | Path,
    *,
    background: str | tuple[int, int, int] | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> Tensor:
    """Read ``path`` as ``[3, H, W]`` float32 RGB in ``[0, 1]`` (see the module docstring for every rule)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    fill = parse_background(background)
    try:
        with _pillow_limit():
            image = Image.open(path)
        with image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    f"image {str(path)!r} is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels}; resize it, or raise the limit (--max-pixels)."
                )
            image.load()
            return _to_tensor(image, path, fill)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        if isinstance(err, FileNotFoundError):
            raise ImageLoadError(f"image {str(path)!r} does not exist.") from None
        raise ImageLoadError(f"image {str(path)!r} cannot be read: {err}.") from None


@contextmanager
def _pillow_limit():
    """Pillow refuses images over its own limit (~179 MP) when it opens them, before this module can check;
    opening reads only the header, so within this block Pillow's limit is off and this module's check (with
    ``max_pixels``, or none when None) decides before anything is decoded."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_tensor(image, path: Path, fill: tuple[int, int, int] | None) -> Tensor:
    mode = image.mode
    if mode == "I" and image.format != "PNG":
        raise ImageLoadError(
            f"image {str(path)!r} holds 32-bit integer pixels ({image.format}); save it as an 8- or 16-bit image."
        )
    if (mode.startswith("I;16") or mode == "I") and "transparency" in image.info:
        raise ImageLoadError(
            f"image {str(path)!r} is 16-bit with a transparent colour; save it without transparency (or as 8-bit "
            "RGBA and pass --background)."
        )
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageLoadError(
                f"image {str(path)!r} holds 32-bit integers outside 0-65535; save it as 8- or 16-bit."
            )
        grey = torch.from_numpy(values / 65535).float()
        return grey.expand(3, *grey.shape).clone()
    if mode == "F":
        raise ImageLoadError(
            f"image {str(path)!r} holds floating-point pixels; save it as an 8- or 16-bit image."
        )
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return _from_uint8(np.asarray(image.convert("RGB")))
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[..., 3:].astype(np.float64) / 255
    if (alpha == 1).all():
        return _from_uint8(rgba[..., :3])
    if fill is None:
        share = float((alpha < 1).mean())
        raise ImageLoadError(
            f"image {str(path)!r} has transparent pixels ({share:.1%} of them); composite it on a background "
            "(--background white, black or R,G,B) or save it without transparency."
        )
    composite = rgba[..., :3] * alpha + np.array(fill, dtype=np.float64) * (1 - alpha)
    return torch.from_numpy(composite / 255).permute(2, 0, 1).float().contiguous()


def _from_uint8(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float() / 255  # a writable copy
