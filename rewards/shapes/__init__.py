"""The shapes world's judge: its sprites and colours, and an exact detector over rendered images.

Example::

    from rewards.shapes import detect_batch
    detections = detect_batch(images)     # images [B, 3, 32, 32] float in [0, 1]
    detections[0][0]                      # Detection(class_name='circle', color='red', bbox=(3, 4, 12, 13), ...)

The renderer that draws these sprites lives in :mod:`flowalign.worlds.shapes`; this package never imports
:mod:`flowalign`.
"""

from rewards.shapes.detector import MIN_CONFIDENCE, ShapesDetector, detect, detect_batch
from rewards.shapes.sprites import CODE_TO_COLOR, COLOR_TO_CODE, COLORS, SHAPES, SIZES, color_rgb, sprite_mask

__all__ = [
    "CODE_TO_COLOR",
    "COLORS",
    "COLOR_TO_CODE",
    "MIN_CONFIDENCE",
    "SHAPES",
    "SIZES",
    "ShapesDetector",
    "color_rgb",
    "detect",
    "detect_batch",
    "sprite_mask",
]
