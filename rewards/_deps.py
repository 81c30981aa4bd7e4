"""Optional dependencies: import them where they are needed, with an error that names the pip extra.

Heavy engines (the OCR engine, dlib's face models, open_clip, onnxruntime) are not core dependencies of
flowalign. Each is imported inside the component that needs it through :func:`require`, so ``import
rewards`` stays light and a missing engine is reported the moment a reward that needs it is built.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency of a reward is not installed; the message names the pip extra to install."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` saying ``pip install 'flowalign[extra]'``.

    Args:
        module: importable module name, e.g. ``"rapidocr_onnxruntime"``.
        extra: the flowalign extra that installs it, e.g. ``"ocr"``.
        needed_for: what needs it, e.g. ``"the ocr reward"`` (used in the message).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{needed_for} needs the Python module {module!r}, which is not installed ({err}). "
            f"Install it with: pip install 'flowalign[{extra}]'"
        ) from err
