"""CPU time per image of the offline rewards (ocr, identity, compressibility, geneval on the shapes world).

    python benchmarks/reward_cpu_time.py [--repeats 3] [--out benchmarks/results/reward_cpu_time.md]

For each reward: one warm-up call (model loading and first-call initialization are excluded), then
``repeats`` timed calls on a fixed batch; reports process CPU time (all threads) and wall time per image.
Inputs: OCR -- 512x512 white images with a 48 px PIL-rendered phrase; identity -- scikit-image's 512x512
astronaut photo (one face; dlib backend, reference = the same photo); compressibility -- the astronaut photo
(512x512) and 32x32 shapes-world renders; geneval -- 32x32 shapes-world renders with 2 objects.
Needs flowalign[ocr,face] and scikit-image.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards import load_reward


def _text_images(n: int) -> tuple[torch.Tensor, list[str]]:
    words = ["Hello World", "Flow GRPO", "Open 24 Hours", "Quiet Zebra", "Coffee Shop", "No Parking"]
    images, prompts = [], []
    for i in range(n):
        text = words[i % len(words)]
        image = Image.new("RGB", (512, 512), "white")
        ImageDraw.Draw(image).text((40, 220), text, fill="black", font=ImageFont.load_default(size=48))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        prompts.append(f'a sign that says "{text}"')
    return torch.stack(images), prompts


def _shapes(n: int) -> tuple[torch.Tensor, list[dict]]:
    from rewards.shapes import color_rgb, sprite_mask

    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 3, 32, 32)
    for i in range(n):
        for (x, y), color in (((2, 2), "red"), ((18, 18), "blue")):
            dx, dy = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
            mask = torch.from_numpy(sprite_mask("circle", 9).copy())
            for c, v in enumerate(color_rgb(color)):
                images[i, c, y + dy : y + dy + 9, x + dx : x + dx + 9][mask] = float(v)
    meta = {"tag": "counting", "prompt": "two circles", "include": [{"class": "circle", "count": 2}],
            "exclude": [{"class": "circle", "count": 3}]}  # fmt: skip
    return images, [meta] * n


def _time(reward, images, prompts, metadata, repeats: int) -> tuple[float, float]:
    reward(images[:1], prompts[:1], metadata[:1] if metadata else None)  # warm-up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        reward(images, prompts, metadata)
    n = repeats * len(images)
    return (time.process_time() - cpu0) / n, (time.perf_counter() - wall0) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/reward_cpu_time.md")
    args = parser.parse_args()
    import skimage.data

    astronaut = torch.from_numpy(skimage.data.astronaut().copy()).permute(2, 0, 1).float() / 255
    rows = []
    text_images, text_prompts = _text_images(6)
    rows.append(
        (
            "ocr",
            "512x512 text render",
            *_time(load_reward("ocr"), text_images, text_prompts, None, args.repeats),
        )
    )
    faces = astronaut.unsqueeze(0).repeat(4, 1, 1, 1)
    identity = load_reward("identity", reference=astronaut.unsqueeze(0))
    rows.append(
        (
            "identity (dlib, upsample=1)",
            "512x512 photo, 1 face",
            *_time(identity, faces, [""] * 4, None, args.repeats),
        )
    )
    identity0 = load_reward("identity", reference=astronaut.unsqueeze(0), upsample=0)
    rows.append(
        (
            "identity (dlib, upsample=0)",
            "512x512 photo, 1 face",
            *_time(identity0, faces, [""] * 4, None, args.repeats),
        )
    )
    compress = load_reward("compressibility")
    rows.append(("compressibility", "512x512 photo", *_time(compress, faces, [""] * 4, None, args.repeats)))
    shapes, shapes_meta = _shapes(64)
    rows.append(
        ("compressibility", "32x32 shapes render", *_time(compress, shapes, [""] * 64, None, args.repeats))
    )
    geneval = load_reward("geneval")
    rows.append(
        (
            "geneval (shapes detector)",
            "32x32 shapes render",
            *_time(geneval, shapes, [""] * 64, shapes_meta, args.repeats),
        )
    )

    lines = [
        "# CPU time per image of the offline rewards",
        "",
        f"Command: `python benchmarks/reward_cpu_time.py --repeats {args.repeats}`; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads. Warm-up call excluded; CPU time is the process's, all threads.",
        "",
        "| reward | input | CPU s / image | wall s / image |",
        "|---|---|---|---|",
        *(f"| {name} | {what} | {cpu:.4f} | {wall:.4f} |" for name, what, cpu, wall in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
