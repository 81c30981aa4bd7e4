"""``flowalign score``: score a folder of images against their prompts with one or more rewards.

Images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``) are matched with prompts in one of two ways:

- **by file order**: ``prompts.txt`` (one prompt per non-empty line) or a ``prompts.jsonl`` without a
  ``file`` key; the images, sorted by file name, pair with the prompts in order, so the counts must match;
- **by file name**: every line of ``prompts.jsonl`` has ``"file"`` (a path relative to IMAGES_DIR, or a
  list of them, e.g. GenEval's several samples per prompt); only the named images are scored.

A jsonl line is ``{"prompt": ..., ...}``; every other key is that prompt's metadata (GenEval's ``tag``,
``include``, ``exclude``; OCR's ``text``; identity's ``reference``). ``--reward NAME=WEIGHT`` may repeat;
``--reward-arg NAME.KEY=VALUE`` passes a constructor argument (VALUE is parsed as YAML: numbers, booleans,
lists). Prints a table and writes ``--out`` JSON with every image's per-reward and weighted scores.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from flowalign.commands.common import UsageError, check_device, check_int, check_output_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-code", action="store_true",
        help="let --reward name code by dotted path (package.module:ClassName): it is imported and must be a "
        "rewards.Reward subclass; off by default",
    )  # fmt: skip
    parser.add_argument("images", metavar="IMAGES_DIR", help="folder of images to score")
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help="a reward and its weight; repeat",
    )
    parser.add_argument("--prompts", required=True, help="prompts.txt (one per line) or prompts.jsonl")
    parser.add_argument("--out", default=None, help="write scores to this JSON file")
    parser.add_argument(
        "--reward-arg",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="constructor argument of one reward, e.g. ocr.min_confidence=0.5; repeat",
    )
    parser.add_argument(
        "--normalize", action="store_true", help="z-score each reward over the images before weighting"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per reward call (default 16)")
    parser.add_argument(
        "--background", default=None, metavar="white|black|R,G,B",
        help="composite images with transparent pixels on this colour (default: refuse them)",
    )  # fmt: skip
    parser.add_argument(
        "--max-pixels", type=int, default=None,
        help="refuse images with more pixels than this (default 4096 x 4096 = 16777216)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")


def parse_reward_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["ocr.min_confidence=0.5"]`` -> ``{"ocr": {"min_confidence": 0.5}}`` (values parsed as YAML)."""
    import yaml

    parsed: dict[str, dict[str, Any]] = defaultdict(dict)
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, arg = key.partition(".")
        if not sep or not dot or not name or not arg:
            raise UsageError(
                f"--reward-arg {item!r} must look like NAME.KEY=VALUE, e.g. ocr.min_confidence=0.5"
            )
        parsed[name][arg] = yaml.safe_load(value) if value else ""
    return dict(parsed)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """One dict per prompt with ``prompt``, optional ``file``/``files`` and metadata keys."""
    from flowalign.data.prompts import load_prompt_set

    try:
        return [{"prompt": r.prompt, **r.metadata} for r in load_prompt_set(path)]
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--prompts: {err}") from None


def match_images(images_dir: Path, entries: list[dict[str, Any]]) -> list[tuple[Path, dict[str, Any]]]:
    """Pair image files with prompt entries (see the module docstring)."""
    if not images_dir.is_dir():
        raise UsageError(f"IMAGES_DIR {str(images_dir)!r} is not a directory.")
    named = [("file" in e or "files" in e) for e in entries]
    if any(named):
        if not all(named):
            raise UsageError('either every prompts.jsonl line names its image(s) with "file" or none does.')
        pairs = []
        for entry in entries:
            files = entry.get("files", entry.get("file"))
            for name in [files] if isinstance(files, str) else list(files):
                path = images_dir / name
                if not path.is_file():
                    raise UsageError(f"image {str(path)!r} named in the prompts file does not exist.")
                pairs.append((path, entry))
        return pairs
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) != len(entries):
        raise UsageError(
            f"{len(files)} images in {str(images_dir)!r} but {len(entries)} prompts; matching by file order needs "
            'one prompt per image (or name each image with "file" in prompts.jsonl).'
        )
    return list(zip(files, entries))


def run(args: argparse.Namespace) -> int:
    import torch

    from rewards import WeightedReward, parse_reward_spec
    from rewards.images import MAX_PIXELS, load_image, parse_background

    check_int("--batch-size", args.batch_size)
    check_device("--device", args.device)
    check_output_file("--out", args.out)
    check_int("--max-pixels", args.max_pixels)
    max_pixels = MAX_PIXELS if args.max_pixels is None else args.max_pixels
    background = parse_background(args.background)
    reward_args = parse_reward_args(args.reward_arg)
    for spec in args.reward:
        reward_args.setdefault(parse_reward_spec(spec)[0], {}).setdefault("device", args.device)
    reward = WeightedReward.from_specs(
        args.reward, reward_args, allow_code=args.allow_code, normalize=args.normalize
    )
    pairs = match_images(Path(args.images), read_prompts(Path(args.prompts)))
    images = [load_image(path, background=background, max_pixels=max_pixels) for path, _ in pairs]
    prompts = [entry["prompt"] for _, entry in pairs]
    metadata = [
        {k: v for k, v in entry.items() if k not in ("prompt", "file", "files")} for _, entry in pairs
    ]

    # One call per image size (a batch needs one shape); groups of one prompt stay within a call.
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_size[tuple(image.shape[-2:])].append(index)
    totals = torch.empty(len(images))
    components = {name: torch.empty(len(images)) for name in reward.parts}
    batch = max(args.batch_size, 1) if not reward.groupwise else len(images)
    with torch.no_grad():
        for indices in by_size.values():
            for start in range(0, len(indices), batch):
                idx = indices[start : start + batch]
                out = reward(
                    torch.stack([images[i] for i in idx]),
                    [prompts[i] for i in idx],
                    [metadata[i] for i in idx],
                )
                totals[idx] = out.scores.float().cpu()
                for name, scores in out.components.items():
                    components[name][idx] = scores.float().cpu()

    rows = [
        {
            "file": str(path.relative_to(args.images)),
            "prompt": prompt,
            "scores": {name: float(components[name][i]) for name in components},
            "total": float(totals[i]),
        }
        for i, ((path, _), prompt) in enumerate(zip(pairs, prompts))
    ]
    _print_table(rows, list(components))
    summary = {
        "rewards": reward.weights,
        "normalize": bool(args.normalize),
        "mean": {name: float(components[name].mean()) for name in components}
        | {"total": float(totals.mean())},
        "images": rows,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(f"wrote {len(rows)} scores to {out}")
    return 0


def _print_table(rows: list[dict[str, Any]], names: list[str]) -> None:
    headers = ["file", "prompt", *names, "total"]
    table = [
        [
            r["file"],
            r["prompt"] if len(r["prompt"]) <= 40 else r["prompt"][:37] + "...",
            *(f"{r['scores'][n]:.4f}" for n in names),
            f"{r['total']:.4f}",
        ]
        for r in rows
    ]
    if rows:
        table.append(
            [
                "mean",
                "",
                *(f"{sum(r['scores'][n] for r in rows) / len(rows):.4f}" for n in names),
                f"{sum(r['total'] for r in rows) / len(rows):.4f}",
            ]
        )
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for line in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
