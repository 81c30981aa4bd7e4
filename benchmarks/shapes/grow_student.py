"""A larger denoiser that computes exactly the shipped shapes model's function: a student with more room.

The one-step students of issue 16 stay 0.16-0.25 below the teacher on test whatever the recipe; one call of the
shipped UNet (2.75M parameters) has to place every object of a scene. To ask whether the network's size is what
holds them back, the student must start as the teacher (DMD's students do) yet have more parameters. This script
grows the shipped UNet *function-preservingly* (Net2Net's idea, Chen et al. 2016, "Net2Net: Accelerating
Learning via Knowledge Transfer", with residual identities instead of Net2Net's weight splitting):

- every attention has ``depth`` transformer blocks instead of one; each new ``BasicTransformerBlock`` has zero
  output projections in its self-attention, cross-attention and feed-forward (``attn1.to_out.0``,
  ``attn2.to_out.0``, ``ff.net.2``), so each of its three residual branches adds zero;
- with ``--top-attention``, the top level gets attention too: its ``DownBlock2D`` / ``UpBlock2D`` become
  ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` whose new ``Transformer2DModel``s have a zero ``proj_out``
  (the block adds its output to its input, so it is the identity). Attention over the 16x16 latent costs more
  time per parameter than depth at 8x8 and 4x4 (``--depth 4`` alone: 2.06x the parameters at about 2.2-2.6x
  the time per call; ``--depth 3 --top-attention``: 1.78x, and a one-step DMD step took 7.8 s against the shipped
  network's 1.7-1.8 s).

Every other weight is the shipped model's, and the new layers' other weights keep diffusers' default
initialisation (random), so they learn as soon as the zero projections move. The grown model's predictions equal
the shipped model's to float rounding (checked here on random inputs, and in ``tests/test_grow_student.py``), so
the grown teacher, fake score and student all start as the shipped teacher.

    python benchmarks/shapes/grow_student.py --depth 4 --out runs/shapes_grown4
    flowalign train configs/dmd/shapes_1step_gan_real.yaml model.path=runs/shapes_grown4 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ATTENTION = {"DownBlock2D": "CrossAttnDownBlock2D", "UpBlock2D": "CrossAttnUpBlock2D"}
ZEROED = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")


def grown(
    unet: UNet2DConditionModel, depth: int, *, top_attention: bool = False, seed: int = 0
) -> UNet2DConditionModel:
    """``unet`` with ``depth`` transformer blocks per attention (and with ``top_attention``, attention at the
    top level too), computing the same function (see the module docstring). New layers are drawn with ``seed``."""
    if depth < 1:
        raise ValueError(f"--depth {depth}: an attention needs at least one transformer block")
    config = dict(unet.config)
    if top_attention:
        config["down_block_types"] = [ATTENTION.get(b, b) for b in config["down_block_types"]]
        config["up_block_types"] = [ATTENTION.get(b, b) for b in config["up_block_types"]]
    config["transformer_layers_per_block"] = depth
    torch.manual_seed(seed)
    bigger = UNet2DConditionModel.from_config(config)
    old = unet.state_dict()
    new = bigger.state_dict()
    missing = [k for k in old if k not in new or new[k].shape != old[k].shape]
    if missing:
        raise ValueError(f"the grown UNet lacks {len(missing)} of the shipped tensors, e.g. {missing[:3]}")
    for key in [k for k in new if k not in old]:
        # An added proj_out belongs to a new top-level attention (the old ones' are in ``old``): zero, so the
        # block adds nothing; so do the new transformer blocks' output projections.
        if ".proj_out." in key or any(f".{z}." in key for z in ZEROED):
            new[key] = torch.zeros_like(new[key])
    new.update(old)
    bigger.load_state_dict(new)
    return bigger


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def largest_difference(a: UNet2DConditionModel, b: UNet2DConditionModel, seed: int = 0) -> float:
    """Max |a(x) - b(x)| over a batch of random latents, levels and text states."""
    g = torch.Generator().manual_seed(seed)
    c = a.config
    x = torch.randn(4, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.rand(4, generator=g) * 1000
    text = torch.randn(4, 16, c.cross_attention_dim, generator=g)
    return (a(x, t, text).sample - b(x, t, text).sample).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    from flowalign.models.shapes import SHIPPED_MODEL, ShapesPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="a shapes pipeline directory")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks per attention")
    parser.add_argument("--top-attention", action="store_true", help="attention at the top (16x16) level too")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new layers' random weights")
    parser.add_argument("--out", required=True, help="where to save the grown pipeline")
    args = parser.parse_args(argv)
    pipeline = ShapesPipeline.from_pretrained(args.model)
    bigger = grown(pipeline.unet, args.depth, top_attention=args.top_attention, seed=args.seed)
    gap = largest_difference(pipeline.unet, bigger)
    print(f"UNet parameters: {parameters(pipeline.unet):,} -> {parameters(bigger):,}")
    print(f"largest prediction difference on random inputs: {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit(f"the grown UNet does not compute the shipped function (difference {gap:.2e})")
    pipeline.unet = bigger
    pipeline.save_pretrained(args.out)
    print(f"saved {Path(args.out)}")


if __name__ == "__main__":
    main()
