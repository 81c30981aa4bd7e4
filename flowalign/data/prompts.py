"""Prompt sets and the group sampler of online RL.

A prompt set is read from ``.txt`` (one prompt per line), ``.jsonl`` with a ``prompt`` field (other fields
become the prompt's metadata, e.g. GenEval's ``include``/``exclude``/``tag``), or GenEval's own
``evaluation_metadata.jsonl``. For image-to-video models each record names its conditioning first frame
in an ``image`` field (a PNG path, relative to the prompt file); :func:`condition_images` reads them.

:class:`GroupSampler` draws the prompts of each training iteration from ``(seed, iteration)`` alone, so a
resumed run continues with exactly the prompts it would have seen, and every process agrees on the global
batch without communication. Each prompt's group of ``group_size`` samples stays on one process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GroupBatch",
    "GroupSampler",
    "PromptRecord",
    "condition_images",
    "load_captioned_images",
    "load_image",
    "load_prompt_set",
    "read_jsonl",
]


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-empty line of a jsonl file; an unreadable line is an error
    naming the file and line."""
    path = Path(path)
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}).") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(item).__name__}.")
        items.append((number, item))
    return items


def load_prompt_set(path: str | Path) -> list[PromptRecord]:
    """Read prompts from a ``.txt`` or ``.jsonl`` file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist.")
    records: list[PromptRecord] = []
    if path.suffix == ".txt":
        records = [PromptRecord(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        for number, item in read_jsonl(path):
            if not isinstance(item.get("prompt"), str):
                raise ValueError(
                    f"{path}:{number}: each line must be an object with a string 'prompt' field."
                )
            metadata = {k: v for k, v in item.items() if k != "prompt"}
            if "image" in metadata:
                image = metadata["image"]
                if not isinstance(image, str) or not (path.parent / image).is_file():
                    raise ValueError(
                        f"{path}:{number}: 'image' must name an existing image file (relative to the prompt file), "
                        f"got {image!r}."
                    )
                metadata["image"] = str(path.parent / image)
            if "reference" in metadata:
                metadata["reference"] = _reference_paths(metadata["reference"], path, number)
            records.append(PromptRecord(item["prompt"], metadata))
    else:
        raise ValueError(f"prompt file {str(path)!r} must end in .txt or .jsonl.")
    if not records:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts.")
    return records


def _reference_paths(reference: Any, path: Path, number: int) -> str | list[str]:
    """A record's ``reference`` (the identity reward's pool: an image, a directory of images, or a list of
    images) resolved relative to the prompt file, as ``image`` is; each must exist."""
    names = [reference] if isinstance(reference, str) else reference
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"{path}:{number}: 'reference' must be a path or a list of paths (relative to the prompt file), "
            f"got {reference!r}."
        )
    resolved = [path.parent / name for name in names]
    missing = [str(r) for r in resolved if not r.exists()]
    if missing:
        raise ValueError(f"{path}:{number}: 'reference' names paths that do not exist: {missing}.")
    return str(resolved[0]) if isinstance(reference, str) else [str(r) for r in resolved]


def load_image(path: str | Path, where: str = "image") -> Tensor:
    """An RGB image file as ``[3, H, W]`` float32 in ``[0, 1]``; another mode (RGBA, greyscale, palette) is an
    error naming the file, not a silent conversion."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise ValueError(
                    f"{where}: {str(path)!r} is a {image.mode} image; it must be RGB (convert it: "
                    "Image.open(f).convert('RGB').save(f))."
                )
            array = np.asarray(image, dtype=np.uint8).copy()
    except (FileNotFoundError, UnidentifiedImageError) as err:
        raise ValueError(f"{where}: cannot read {str(path)!r} as an image ({type(err).__name__}).") from None
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def load_captioned_images(
    path: str | Path, size: int, where: str = "dmd.gan_real", chunk: int | None = None
) -> Iterator[tuple[list[str], Tensor]]:
    """The captions and images ``[n, 3, size, size]`` in ``[0, 1]`` of a jsonl of ``{"prompt": ...,
    "image": "a.png"}`` lines (paths relative to the file), ``chunk`` lines at a time (None: all at once), so
    that a large dataset need not be held in memory as pixels. A missing field, an unreadable or non-RGB
    image and an image of another size are each an error naming the file and line; nothing is resized."""
    path = Path(path)
    prompts, images, any_image = [], [], False
    for number, item in read_jsonl(path):
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("image"), str):
            raise ValueError(f'{where}: {path}:{number}: each line needs string fields "prompt" and "image".')
        image = load_image(path.parent / item["image"], f"{where}: {path}:{number}")
        if tuple(image.shape[1:]) != (size, size):
            raise ValueError(
                f"{where}: {path}:{number}: {item['image']!r} is {image.shape[2]}x{image.shape[1]}; the model "
                f"samples {size}x{size} (model.resolution): write the images at that size."
            )
        prompts.append(item["prompt"])
        images.append(image)
        any_image = True
        if chunk is not None and len(images) == chunk:
            yield prompts, torch.stack(images)
            prompts, images = [], []
    if not any_image:
        raise ValueError(f"{where}: {path} holds no images.")
    if images:
        yield prompts, torch.stack(images)


def condition_images(metadata: Sequence[Mapping[str, Any]], where: str = "data.train_prompts") -> Tensor:
    """The conditioning first frames ``[n, 3, H, W]`` of ``n`` prompt records (their ``image`` fields); every
    record must have one and all must share a size."""
    images = []
    for meta in metadata:
        if "image" not in meta:
            raise ValueError(
                f"{where}: an image-to-video model needs a conditioning first frame per prompt: give every record of "
                'the prompt file an "image" field (a PNG path relative to the file).'
            )
        images.append(_cached_image(meta["image"], where, *_version(meta["image"])))
    sizes = {tuple(i.shape) for i in images}
    if len(sizes) > 1:
        raise ValueError(
            f"{where}: the conditioning images have different sizes {sorted(sizes)}; use one size."
        )
    return torch.stack(images)


def _version(path: str) -> tuple[int, int]:
    """What tells a rewritten file from the one cached: modification time and size (0, 0 when missing, which
    :func:`load_image` then reports)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return 0, 0
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=256)
def _cached_image(path: str, where: str, mtime_ns: int = 0, size: int = 0) -> Tensor:
    """:func:`load_image`, cached by path and file version (a rewritten file is read again)."""
    return load_image(path, where)


@dataclass
class GroupBatch:
    """The samples one process generates in one iteration.

    Attributes:
        prompts: ``[n]`` prompt strings, each repeated ``group_size`` times consecutively.
        metadata: ``[n]`` metadata dicts, aligned with ``prompts``.
        group_ids: ``[n]`` long, the global group index of each sample (unique across processes).
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    group_ids: torch.Tensor


class GroupSampler:
    """Draws ``groups_per_step`` prompts per iteration and gives each of ``num_processes`` processes a
    contiguous share of whole groups.

    By default prompts are drawn without replacement within an epoch over the set. With ``balance_by``
    (a metadata key, e.g. GenEval's ``"tag"``) every group first draws a value of that key uniformly, then a
    prompt uniformly among those having it: each task is trained equally often however unequal the set
    is, which matches a benchmark whose score is the mean over tasks (GenEval's overall). ``balance_weights``
    (a weight for every value of the key) draws the values in those proportions instead, e.g. to spend the
    samples on the tasks a model still fails (a weight of 0 never draws that value). Every draw is a
    function of ``(seed, iteration)``, so resumed runs and every process see the same prompts.
    """

    def __init__(
        self,
        records: list[PromptRecord],
        group_size: int,
        groups_per_step: int,
        *,
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        balance_by: str | None = None,
        balance_weights: Mapping[str, float] | None = None,
    ):
        if groups_per_step % num_processes:
            raise ValueError(
                f"data.groups_per_step={groups_per_step} must be divisible by the number of processes "
                f"({num_processes}) so that every group stays on one process."
            )
        self.records, self.group_size, self.groups_per_step = records, group_size, groups_per_step
        self.seed, self.num_processes, self.process_index = seed, num_processes, process_index
        self.strata: list[list[int]] | None = None
        self.weights: torch.Tensor | None = None
        if balance_by is not None:
            strata: dict[Any, list[int]] = {}
            for index, record in enumerate(records):
                if balance_by not in record.metadata:
                    raise ValueError(
                        f"data.balance_by={balance_by!r}: prompt {index} ({record.prompt!r}) has no "
                        f"metadata key {balance_by!r}; use a metadata jsonl whose every line has it, or unset "
                        "data.balance_by."
                    )
                strata.setdefault(str(record.metadata[balance_by]), []).append(index)
            self.strata = [strata[k] for k in sorted(strata)]
            if balance_weights is not None:
                self.weights = _stratum_weights(balance_by, balance_weights, sorted(strata))
        elif balance_weights is not None:
            raise ValueError(
                "data.balance_weights weighs the values of data.balance_by, which is not set; set "
                "data.balance_by (e.g. tag) or remove data.balance_weights."
            )

    def global_indices(self, iteration: int) -> list[int]:
        """Indices into the prompt set of this iteration's groups (all processes)."""
        if self.strata is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
            out = []
            for _ in range(self.groups_per_step):
                if self.weights is None:
                    choice = torch.randint(len(self.strata), (1,), generator=gen)
                else:
                    choice = torch.multinomial(self.weights, 1, generator=gen)
                stratum = self.strata[int(choice)]
                out.append(stratum[int(torch.randint(len(stratum), (1,), generator=gen))])
            return out
        n = len(self.records)
        start = iteration * self.groups_per_step
        out: list[int] = []
        while len(out) < self.groups_per_step:
            epoch, offset = divmod(start + len(out), n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            out.extend(order[offset : offset + self.groups_per_step - len(out)].tolist())
        return out

    def batch(self, iteration: int) -> GroupBatch:
        per_process = self.groups_per_step // self.num_processes
        indices = self.global_indices(iteration)
        first = self.process_index * per_process
        prompts, metadata, groups = [], [], []
        for group in range(first, first + per_process):
            record = self.records[indices[group]]
            prompts += [record.prompt] * self.group_size
            metadata += [dict(record.metadata) for _ in range(self.group_size)]
            groups += [group] * self.group_size
        return GroupBatch(prompts, metadata, torch.tensor(groups, dtype=torch.long))


def _stratum_weights(key: str, weights: Mapping[str, float], values: list[str]) -> torch.Tensor:
    """``weights`` as a tensor in the order of ``values``; every value must be named, with a weight >= 0."""
    missing = [v for v in values if v not in weights]
    unknown = [str(k) for k in weights if str(k) not in values]
    if missing or unknown:
        raise ValueError(
            f"data.balance_weights must name every value of data.balance_by={key!r} in the prompt set "
            f"({values}); missing {missing}, unknown {unknown}. Give a weight of 0 to leave a value out."
        )
    out = torch.tensor([float(weights[v]) for v in values], dtype=torch.float64)
    if not torch.isfinite(out).all() or (out < 0).any() or out.sum() <= 0:
        raise ValueError(
            f"data.balance_weights must be finite and >= 0 with a positive sum, got {dict(weights)}."
        )
    return out
