"""Memory of differentiating through the Wan VAE's decode at real size, stock against flowalign's
per-frame checkpointed decode (:func:`flowalign.models.wan.checkpointed_decode`), counted on the ``meta``
device (the real Wan 2.1 / 2.2 A14B VAE architecture, 126.9M parameters, no weights, no memory).

- stock: the bytes autograd keeps for backward through ``AutoencoderKLWan.decode`` (every op's saved
  tensors, each storage once, weights excluded; attention counted as the fused kernels keep it);
- checkpointed: what stays alive until backward (each latent frame's feature cache, the checkpoint inputs,
  plus what the ops outside the checkpoints keep) and, on top of it during backward, the largest single
  frame's saved activations while that frame is recomputed.

Example (IPRO's 81 frames at 624x352, bf16; reward backprop on one video per GPU):

    python benchmarks/video/wan_decode_memory.py --frames 81 --height 352 --width 624
"""

from __future__ import annotations

import argparse
import sys

import torch


def measure(frames: int, height: int, width: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    from flowalign.memory import GB, wan_decode_bytes

    stock = wan_decode_bytes(frames, height, width, dtype, grad=True, checkpointed=False)["stock"]
    counts = wan_decode_bytes(frames, height, width, dtype, grad=True)
    return {"stock_gib": stock / GB, "held_gib": counts["held"] / GB, "peak_frame_gib": counts["frame"] / GB,
            "checkpointed_gib": (counts["held"] + counts["frame"]) / GB}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=624)
    args = parser.parse_args()
    r = measure(args.frames, args.height, args.width)
    print(f"command: python benchmarks/video/wan_decode_memory.py {' '.join(sys.argv[1:])}")
    print(f"Wan VAE decode of one {args.frames}-frame {args.width}x{args.height} video with gradient (bf16):")
    print(f"  stock decode, saved for backward:            {r['stock_gib']:7.1f} GiB")
    print(f"  checkpointed, held until backward:           {r['held_gib']:7.1f} GiB")
    print(f"  checkpointed, + one frame recomputed:        {r['peak_frame_gib']:7.1f} GiB")
    print(f"  checkpointed, peak:                          {r['checkpointed_gib']:7.1f} GiB")


if __name__ == "__main__":
    main()
