"""Tiny random CLIP models saved to a directory, for tests that must not download anything.

``save_tiny_transformers_clip(dir)`` writes a transformers CLIPModel (2 layers, width 32) with a byte-level
CLIP tokenizer and a CLIPImageProcessor; ``save_tiny_open_clip(dir)`` writes an open_clip model in its
``local-dir`` layout (open_clip_config.json + open_clip_model.safetensors) using open_clip's bundled BPE
tokenizer. Both are seeded, so a test gets the same weights every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 28
PROJECTION_DIM = 16


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final, plus the two special tokens."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def save_tiny_transformers_clip(directory: Path, seed: int = 0, projection_dim: int = PROJECTION_DIM) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # no merges: one token per character
    tokenizer.save_pretrained(directory)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": 7,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(directory)
    return directory


def tiny_open_clip_config(embed_dim: int = PROJECTION_DIM) -> dict:
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "layers": 2,
                "width": 32,
                "head_width": 8,
                "patch_size": 7,
            },
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {"size": IMAGE_SIZE, "resize_mode": "shortest", "interpolation": "bicubic"},
    }


def save_tiny_open_clip(directory: Path, seed: int = 0, embed_dim: int = PROJECTION_DIM) -> Path:
    """open_clip ``local-dir`` layout; also returns the weights as ``directory / 'weights.safetensors'``
    (the same tensors) for the ``arch + checkpoint`` loading path."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config(embed_dim)
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"]).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory
