"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse

import torch

# The shipped shapes-world model (assets/shapes/model, see its README.md); load_model resolves the name.
DEFAULT_MODEL = "shapes"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="diffusers directory, hub id, tiny-<family>, or shapes: the shipped shapes-world model (default)",
    )
    parser.add_argument(
        "--family",
        default=None,
        help="adapter family (sd3, flux, sd, sdxl, shapes); read from the model directory if omitted",
    )
    parser.add_argument("--lora", default=None, help="directory of a diffusers-format LoRA to load")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def load_model_from_args(args: argparse.Namespace):
    from flowalign.models import load_model

    model = load_model(args.model, family=args.family, device=args.device, dtype=getattr(torch, args.dtype))
    if args.lora:
        model.load_lora(args.lora)
    return model
