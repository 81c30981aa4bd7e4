"""The shapes world's vocabulary: four binary sprite shapes at two sizes, seven pure colours.

This module is the single definition both the renderer (:mod:`flowalign.worlds.shapes.scene`) and the
exact detector (:mod:`rewards.shapes.detector`) use, so a rendered scene and its detection agree by
construction.

Sprites are binary, non-anti-aliased ``size x size`` masks with odd ``size`` in :data:`SIZES`. Pixel
``(i, j)`` is row ``i`` (y, downwards) and column ``j`` (x, rightwards); ``c = (size - 1) / 2`` is the index
of the centre row and column. A pixel is on when:

- ``circle``:   ``(i - c)^2 + (j - c)^2 <= (size / 2)^2`` (the pixel's centre lies in the disc of radius
  ``size / 2`` centred in the box);
- ``square``:   always (the full box);
- ``triangle``: ``|j - c| <= i / 2`` (apex pixel at the top centre, widening by one pixel per side every
  second row, flat base filling the bottom row, pointing up);
- ``diamond``:  ``|i - c| + |j - c| <= c`` (the square rotated by 45 degrees, touching the middle of each
  box edge).

Every sprite touches all four edges of its box, so the bounding box of a rendered sprite is exactly the
box it was placed in. Areas (pixels): circle 69/97, square 81/121, triangle 41/61, diamond 41/61 for sizes
9/11.

Colours are the non-black corners of the RGB cube; black ``(0, 0, 0)`` is the background. The 3-bit
colour code of a corner is ``R + 2 G + 4 B`` (red = 1, green = 2, yellow = 3, blue = 4, magenta = 5,
cyan = 6, white = 7; 0 = background).
"""

from __future__ import annotations

from functools import cache

import numpy as np

__all__ = [
    "CODE_TO_COLOR",
    "COLORS",
    "COLOR_TO_CODE",
    "SHAPES",
    "SIZES",
    "color_rgb",
    "shape_mask",
    "sprite_mask",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Shape names, in the order the detector breaks IoU ties."""

SIZES: tuple[int, ...] = (9, 11)
"""Sprite box sizes in pixels (odd, so every sprite has a centre pixel)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "cyan": (0, 1, 1),
    "magenta": (1, 0, 1),
    "white": (1, 1, 1),
}
"""Colour name -> RGB corner in {0, 1}^3."""

COLOR_TO_CODE: dict[str, int] = {name: r + 2 * g + 4 * b for name, (r, g, b) in COLORS.items()}
CODE_TO_COLOR: dict[int, str] = {code: name for name, code in COLOR_TO_CODE.items()}


def color_rgb(color: str) -> tuple[int, int, int]:
    """RGB corner of a colour name, e.g. ``color_rgb("yellow") == (1, 1, 0)``."""
    try:
        return COLORS[color]
    except KeyError:
        raise ValueError(f"unknown colour {color!r}; the shapes world has colours {list(COLORS)}.") from None


@cache
def sprite_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a sprite (read-only; see the module docstring for the rules)."""
    if size not in SIZES:
        raise ValueError(f"unsupported sprite size {size!r}; sprites come in sizes {list(SIZES)} px.")
    return shape_mask(shape, size)


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of ``shape`` drawn in a box of any side ``size >= 3`` (read-only).

    The shapes are continuous figures in the box ``[0, size]^2`` -- the disc inscribed in it, the box
    itself, the triangle with apex at the top centre and the bottom edge as base, the square rotated by
    45 degrees touching the middle of each edge -- and a pixel is on when its centre lies inside. For
    the sprite sizes this is exactly :func:`sprite_mask` (the module docstring's rules); for other sides
    it is the same figure scaled, which is what the detector compares scaled objects with. With
    ``u = 2 j + 1 - size`` and ``v = 2 i + 1 - size`` (twice the centre's offset from the box centre, so
    everything stays in integers): circle ``u^2 + v^2 <= size^2``; triangle ``2 |u| <= v + size``;
    diamond ``|u| + |v| <= size``. (At even sides the triangle's apex row is empty: no pixel centre lies
    on the apex column.)
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; the shapes world has shapes {list(SHAPES)}.")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 3:
        raise ValueError(f"shape size must be an integer >= 3 pixels, got {size!r}.")
    i, j = np.mgrid[0:size, 0:size]
    u, v = 2 * j + 1 - size, 2 * i + 1 - size
    if shape == "circle":
        mask = u**2 + v**2 <= size**2
    elif shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "triangle":
        mask = 2 * np.abs(u) <= v + size
    else:  # diamond
        mask = np.abs(u) + np.abs(v) <= size
    mask = np.ascontiguousarray(mask, dtype=bool)
    mask.flags.writeable = False
    return mask
