"""Training state that outlives a process: EMA of parameters, atomic checkpoints, exact resume.

A checkpoint is a directory ``<output_dir>/checkpoints/step-<N>`` holding the trainable parameters
(safetensors), the optimizer and LR-scheduler state, the evaluation EMA's shadow (``ema_ema``), the
recipe's own state (``recipe.safetensors``: an old or reference policy...), ``manifest.json`` (every file's
size and SHA-256, written after the files are fsynced) and, last, ``state.json`` (step, config): the mark
that the save finished. It is written to ``step-<N>.tmp`` and renamed into place. Resume verifies the
manifest (:func:`verify_checkpoint`) and, for ``latest``, falls back past checkpoints that do not verify,
naming each; leftover ``.tmp`` folders of interrupted saves are removed at the next save. Every random draw of the training loops derives from ``(seed, iteration)``, so the
step counter is all the data position and RNG state a resume needs; the global RNG states are saved too
for user code that uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowalign.train.sharding import copy_full_, full_tensor

__all__ = ["EMA", "find_checkpoint", "load_checkpoint", "save_checkpoint", "verify_checkpoint"]


class EMA:
    """Exponential moving average of a list of parameters: ``shadow <- d shadow + (1 - d) param``."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the shadow weights into the parameters (e.g. to evaluate or sample)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(
                f"EMA state has {len(state)} tensors, this model has {len(self.shadow)} trainable parameters."
            )
        for i, shadow in enumerate(self.shadow):
            copy_full_(shadow, state[str(i)])


def _step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoints/step-<N>`` folders (not ``.tmp`` saves in progress), oldest first."""
    return sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in (output_dir / "checkpoints").glob("step-*")
        if p.is_dir() and p.name.removeprefix("step-").isdigit()
    )


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """The step folders whose save finished (``state.json`` written), oldest first."""
    return [(n, p) for n, p in _step_dirs(output_dir) if (p / "state.json").is_file()]


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    """Record every file's size and SHA-256 (fsynced) before ``state.json``, the completion mark, is written."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted (missing, incomplete, a file changed), or None when every
    file its manifest lists is there with its recorded size and SHA-256 and ``state.json`` reads."""
    if not (path / "state.json").is_file():
        return "incomplete (no state.json: its save did not finish)"
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"state.json does not read ({err})"
    if not (path / MANIFEST).is_file():
        return "no manifest.json (its files cannot be verified)"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        return f"manifest.json does not read ({err})"
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {record['bytes']} were written"
        if _sha256(file) != record["sha256"]:
            return f"{name} does not match its checksum (changed after it was written)"
    return None


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """``resume`` is ``"latest"`` (the newest checkpoint under ``output_dir`` that verifies; newer ones that
    do not are skipped with a warning naming them and why) or a checkpoint path (which must verify)."""
    import warnings

    if resume == "latest":
        root = Path(output_dir) / "checkpoints"
        candidates = _step_dirs(Path(output_dir))
        for _, path in reversed(candidates):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            warnings.warn(f"train.resume=latest: skipping checkpoint {path}: {problem}", stacklevel=2)
        raise FileNotFoundError(
            f"train.resume=latest but {root} holds no valid checkpoint"
            + (f" ({len(candidates)} found, none verifies)" if candidates else "")
            + "; start without train.resume (train.overwrite=true to delete the run) or pass a checkpoint path."
        )
    path = Path(resume)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise FileNotFoundError(f"train.resume={resume!r} cannot be used: {problem}.")
    return path


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU (shards gathered: every process must call this under FSDP)."""
    return {k: full_tensor(v.detach()).contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    named_params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: EMA | None,
    recipe: Any,
    extra: dict[str, Any],
    keep: int = 2,
    lora_saver=None,
    write: bool = True,
    sharded_module: nn.Module | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the ``keep`` newest.

    ``recipe``: a :class:`flowalign.train.recipe.Recipe` (its ``state_dict()`` is saved). With
    ``lora_saver``, ``lora/`` holds the trained LoRA and, when an ``ema`` is kept, ``lora_ema/`` the
    averaged one (both in diffusers' LoRA format; ``lora_saver(directory, write)``). Without it (full
    fine-tuning) an ``ema`` is also written as ``trainable_ema.safetensors``, named like
    ``trainable.safetensors``, so that ``--weights`` loads the averaged denoiser evaluation used.

    Under FSDP (``sharded_module``: the sharded denoiser) every process calls this: shards are gathered
    into whole tensors (the optimizer state through ``torch.distributed.checkpoint``'s full state dict) and
    only the process with ``write`` writes."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    params, ema_state = _cpu(named_params), _cpu(ema.state_dict()) if ema is not None else None
    ema_named = None
    if ema is not None and lora_saver is None:  # full fine-tuning: the EMA under the denoiser's names
        index = {id(p): i for i, p in enumerate(ema.params)}
        ema_named = {name: ema_state[str(index[id(p)])] for name, p in named_params.items()}
    recipe_state = _cpu(recipe.state_dict())
    if sharded_module is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        optimizer_state = get_optimizer_state_dict(
            sharded_module, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        optimizer_state = optimizer.state_dict()
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(params, str(tmp / "trainable.safetensors"))
        if ema_state is not None:
            save_file(ema_state, str(tmp / "ema_ema.safetensors"))
        if ema_named is not None:  # what --weights <checkpoint>/trainable_ema.safetensors loads
            save_file(ema_named, str(tmp / "trainable_ema.safetensors"))
        if recipe_state:
            save_file(recipe_state, str(tmp / "recipe.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        version, state, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng = {
            "python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        torch.save(rng, tmp / "rng.pt")
    if lora_saver is not None:
        lora_saver(tmp / "lora", write)
        if ema is not None:  # the weights evaluation uses, loadable by Pipeline.load_lora_weights
            with ema.applied():
                lora_saver(tmp / "lora_ema", write)
    if write:
        _write_manifest(tmp)
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))  # the completion mark
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for orphan in root.glob("step-*.tmp"):  # saves a kill interrupted
            shutil.rmtree(orphan, ignore_errors=True)
        for _, old in _checkpoint_dirs(Path(output_dir))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _recipe_state(path: Path) -> dict[str, torch.Tensor]:
    """``recipe.safetensors``; checkpoints written before recipes owned their state kept an old or
    reference policy as ``ema_old`` / ``ema_ref``, which read as the recipe's ``old.*`` / ``ref.*``."""
    if (path / "recipe.safetensors").is_file():
        return load_file(str(path / "recipe.safetensors"))
    state = {}
    for name in ("old", "ref"):
        if (path / f"ema_{name}.safetensors").is_file():
            state.update(
                {f"{name}.{k}": v for k, v in load_file(str(path / f"ema_{name}.safetensors")).items()}
            )
    return state


def load_checkpoint(
    path: Path,
    named_params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: EMA | None,
    recipe: Any,
    sharded_module: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns ``state.json`` (with ``step``). Under FSDP
    (``sharded_module``) every process loads the whole tensors and keeps its shards."""
    params = load_file(str(path / "trainable.safetensors"))
    if set(params) != set(named_params):
        missing, unexpected = set(named_params) - set(params), set(params) - set(named_params)
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); check model.lora_rank/targets."
        )
    for name, param in named_params.items():
        copy_full_(param, params[name])
    if ema is not None:
        ema.load_state_dict(load_file(str(path / "ema_ema.safetensors")))
    recipe.load_state_dict(_recipe_state(path))
    state = torch.load(path / "optimizer.pt", weights_only=True)
    if sharded_module is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            sharded_module, getattr(optimizer, "optimizer", optimizer), state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )  # fmt: skip
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    return json.loads((path / "state.json").read_text())
