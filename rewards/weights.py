"""Loading reward weights from user paths: safetensors or ``torch.load(weights_only=True)``, never pickle.

Every learned reward takes its weights from a path the user gives (nothing is downloaded at run time).
:func:`require_path` turns a missing or wrong path into an error that names the argument, what was
expected and where the weights come from; :func:`load_state_dict` reads a tensor dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["RewardWeightsError", "load_state_dict", "read_config_metadata", "require_path"]


class RewardWeightsError(FileNotFoundError):
    """A reward's weights path is missing, does not exist or holds something that is not a weight file."""


def require_path(
    path: str | Path | None, argument: str, what: str, hint: str = "", *, kind: str = "any"
) -> Path:
    """Check that ``path`` was given and exists; return it as a :class:`~pathlib.Path`.

    Args:
        path: the user's value.
        argument: the constructor argument it came from, e.g. ``"head_path"`` (named in the error).
        what: what the file holds, e.g. ``"the LAION aesthetic MLP head (sac+logos+ava1-l14-linearMSE.pth)"``.
        hint: where to get it, appended to the error.
        kind: ``"file"``, ``"dir"`` or ``"any"``.
    """
    suffix = f" {hint}" if hint else ""
    if path is None or str(path) == "":
        raise RewardWeightsError(f"no {argument} given: pass the path of {what}.{suffix}")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise RewardWeightsError(f"{argument}={str(path)!r} does not exist; expected {what}.{suffix}")
    if kind == "file" and not resolved.is_file():
        raise RewardWeightsError(f"{argument}={str(path)!r} is not a file; expected {what}.{suffix}")
    if kind == "dir" and not resolved.is_dir():
        raise RewardWeightsError(f"{argument}={str(path)!r} is not a directory; expected {what}.{suffix}")
    return resolved


def load_state_dict(
    path: str | Path, argument: str = "weights", what: str = "a state dict"
) -> dict[str, Tensor]:
    """Read a ``{name: tensor}`` dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``.

    A torch checkpoint whose tensors sit under a ``"state_dict"`` key (Lightning, HPSv2) is unwrapped.
    """
    path = require_path(path, argument, what, kind="file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a non-weights file
        raise RewardWeightsError(
            f"{argument}={str(path)!r} could not be read with torch.load(weights_only=True) ({err}); "
            f"expected {what} saved with torch.save(state_dict) or as .safetensors."
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RewardWeightsError(
            f"{argument}={str(path)!r} does not hold a dict of tensors (got {type(obj).__name__}); expected {what}."
        )
    return dict(obj)


def read_config_metadata(path: str | Path, file: Path, expected_format: str, kind: str, hint: str) -> dict:
    """The JSON ``config`` stored in the metadata of a safetensors weights file written with
    ``metadata={"format": expected_format, "config": json.dumps(...)}``; a file that is not safetensors or
    holds another format is a :class:`RewardWeightsError` naming ``kind`` (e.g. "a shapes_match model")."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:
        raise RewardWeightsError(
            f"weights_path={str(path)!r} is not a safetensors file ({err}). {hint}"
        ) from err
    if metadata.get("format") != expected_format:
        raise RewardWeightsError(
            f"weights_path={str(path)!r} is not {kind} (metadata format {metadata.get('format')!r}, "
            f"expected {expected_format!r}). {hint}"
        )
    return json.loads(metadata["config"])
