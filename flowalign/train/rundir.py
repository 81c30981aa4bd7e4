"""One run owns its output directory.

- A run that starts (not ``train.resume``) in a directory that already holds a run (its ``config.yaml``,
  ``metrics.jsonl`` or ``checkpoints/``) is refused, unless ``train.overwrite`` asks to delete that run first:
  a second run can no longer prune the first one's checkpoints, overwrite its config or interleave its
  metrics.
- While a run is alive it holds ``<output_dir>/run.lock`` (JSON: pid, host, start time), created atomically
  (``O_CREAT | O_EXCL``). Another run into the directory is refused with the holder's pid and host. A lock
  whose holder is dead (same host, no such process) is stale and is broken; a lock held on another host is
  never broken automatically (remove the file when that run is known to be gone).
- A resumed run drops the lines of ``metrics.jsonl`` after the step it resumes from, so a step replayed
  after a kill is logged once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = ["RunDirError", "claim", "release", "trim_metrics"]

LOCK = "run.lock"
_RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "eval")


class RunDirError(ValueError):
    """The output directory belongs to another run; the message says which and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _take_lock(path: Path) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                path.unlink(missing_ok=True)  # stale: its holder died without releasing it
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise RunDirError(
                f"train.output_dir={str(path.parent)!r} is in use by the run with pid {pid} on {host} (since "
                f"{since}); wait for it to finish or choose another train.output_dir. If that run is gone, "
                f"delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return
    raise RunDirError(f"could not take the lock {path}; another run keeps taking it.")


def claim(output_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Lock ``output_dir`` for this run (see the module docstring) and return the lock file. Call on the
    main process only, before anything is written there."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"train.output_dir={str(out)!r} cannot be created ({err.strerror or err}); choose a writable directory."
        ) from None
    lock = out / LOCK
    _take_lock(lock)
    try:
        present = [name for name in _RUN_FILES if (out / name).exists()]
        if present and not resume:
            if not overwrite:
                raise RunDirError(
                    f"train.output_dir={str(out)!r} already holds a run ({', '.join(present)}); resume it with "
                    "train.resume=latest, choose another train.output_dir, or delete that run with "
                    "train.overwrite=true."
                )
            for name in present:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    except BaseException:
        release(lock)
        raise
    return lock


def release(lock: Path | None) -> None:
    """Remove the lock file if this process holds it."""
    if lock is None:
        return
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def trim_metrics(output_dir: str | Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` lines logged after ``step`` (a resumed run logs them again)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
