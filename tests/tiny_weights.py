"""Tiny random reward/detector weights written to directories, for tests that run the shipped configs
without downloading anything.

- ``save_tiny_aesthetic_head(path, embed_dim)``: a seeded LAION aesthetic MLP head (``layers.0 ... layers.7``,
  the improved-aesthetic-predictor state dict) for a CLIP whose projected embedding is ``embed_dim`` wide.
- ``save_tiny_mask2former(dir, labels)``: a seeded ``Mask2FormerForUniversalSegmentation`` (Swin backbone,
  one layer per stage) with its image processor; ``labels`` default to GenEval's 80 COCO classes so that
  GenEval prompt files pass the detector's vocabulary check.
- CLIP models come from :mod:`tiny_clip` (transformers and open_clip layouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tiny_clip import PROJECTION_DIM, save_tiny_open_clip, save_tiny_transformers_clip

__all__ = [
    "save_tiny_aesthetic_head",
    "save_tiny_mask2former",
    "save_tiny_open_clip",
    "save_tiny_transformers_clip",
]


def save_tiny_aesthetic_head(path: Path, embed_dim: int = PROJECTION_DIM, seed: int = 0) -> Path:
    """The LAION head's layout (768 -> 1024 -> 128 -> 64 -> 16 -> 1 with ``embed_dim`` in) with random weights."""
    from safetensors.torch import save_file

    from rewards.aesthetic import AestheticMLP

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in AestheticMLP(embed_dim=embed_dim).state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def save_tiny_mask2former(directory: Path, labels: Sequence[str] | None = None, seed: int = 0) -> Path:
    """A tiny Mask2Former instance-segmentation directory (model + image processor at 64x64), as the fixture
    of tests/test_rewards_geneval_detectors.py builds it, with ``labels`` (default: GenEval's COCO names)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from rewards.geneval.detectors import COCO_CLASSES

    names = list(COCO_CLASSES if labels is None else labels)
    id2label = dict(enumerate(names))
    directory.mkdir(parents=True, exist_ok=True)
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=5,
        num_labels=len(names), id2label=id2label, label2id={v: k for k, v in id2label.items()}, common_stride=4,
    )  # fmt: skip
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(directory)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


def write_pair_file(directory, prompts, seed: int = 0):
    """A DPO pair file ``directory/pairs.jsonl``: one pair of random 32x32 PNGs (``w{i}.png`` chosen,
    ``l{i}.png`` rejected, next to it) per prompt. Returns its path."""
    import json
    from pathlib import Path

    import torch
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i, prompt in enumerate(prompts):
        for name in (f"w{i}.png", f"l{i}.png"):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(directory / name)
        lines.append(json.dumps({"prompt": prompt, "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "pairs.jsonl"


def save_tiny_face_embedder(path: Path, seed: int = 0) -> Path:
    """A TorchScript face embedder standing in for ArcFace: ``[B, 3, 112, 112]`` -> ``[B, 16]``, random weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16)
    )
    torch.jit.script(module).save(str(path))
    return path


def write_identity_videos(directory: Path) -> Path:
    """An image-to-video prompt file whose records name a 32x32 first frame and a reference pool of two face
    images (scikit-image's astronaut photo, on which dlib's detector finds the face), as IPRO's data."""
    import json

    import numpy as np
    from PIL import Image
    from skimage import data

    directory = Path(directory)
    pool = directory / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    face = Image.fromarray(data.astronaut()[20:300, 90:370])
    face.resize((256, 256)).save(pool / "a.png")
    face.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((256, 256)).save(pool / "b.png")
    Image.fromarray(np.asarray(face.resize((32, 32)))).save(directory / "first.png")
    record = {"prompt": "a woman smiles", "image": "first.png", "reference": "pool"}
    (directory / "videos.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    return directory / "videos.jsonl"
