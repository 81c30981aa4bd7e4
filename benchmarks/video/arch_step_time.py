"""Training step time of the two candidate architectures of the moving-shapes video model, batch 32, 2 threads:
the shipped UNet over stacked frames (its real training step: loss, backward, AdamW) and a Wan-style 3-D
transformer (diffusers ``WanTransformer3DModel``, patch (1, 2, 2) over the 5 x 32 x 32 pixels: 1280 tokens,
6 layers, 4 heads of 32; a forward, backward and AdamW step on random inputs of the same shape).

    python benchmarks/video/arch_step_time.py
"""

from __future__ import annotations

import time

import torch
from diffusers import WanTransformer3DModel

from flowalign.models.moving_shapes import build_moving_shapes_pipeline
from flowalign.worlds.moving_shapes_pretrain import (
    VideoPretrainConfig,
    VideoStream,
    sample_sigmas,
    video_flow_matching_loss,
)


def seconds_per_step(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(2)
    pipe = build_moving_shapes_pipeline()
    prompts, videos = VideoStream(0).next_batch(32)
    config = VideoPretrainConfig()
    generator = torch.Generator().manual_seed(0)
    unet_optimizer = torch.optim.AdamW([*pipe.unet.parameters(), *pipe.text_encoder.parameters()], lr=1e-4)

    def unet_step():
        noise = torch.randn(32, 12, 5, 16, 16, generator=generator)
        loss = video_flow_matching_loss(pipe, videos, prompts, sample_sigmas(config, 32, generator), noise)
        unet_optimizer.zero_grad()
        loss.backward()
        unet_optimizer.step()

    unet_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(
        f"UNet over stacked frames ({unet_params:.2f}M): {seconds_per_step(unet_step, 2, 5):.2f} s/step",
        flush=True,
    )

    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=7, out_channels=3,
        text_dim=64, freq_dim=256, ffn_dim=512, num_layers=6, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )  # fmt: skip
    wan_optimizer = torch.optim.AdamW(wan.parameters(), lr=1e-4)
    text = torch.randn(32, 16, 64)

    def wan_step():
        x = torch.randn(32, 7, 5, 32, 32)  # noisy frames (3) + first frame (3) + mask (1), pixel space
        out = wan(
            hidden_states=x, timestep=torch.rand(32) * 1000, encoder_hidden_states=text, return_dict=False
        )[0]
        loss = out.pow(2).mean()
        wan_optimizer.zero_grad()
        loss.backward()
        wan_optimizer.step()

    wan_params = sum(p.numel() for p in wan.parameters()) / 1e6
    print(f"Wan-style 3-D transformer ({wan_params:.2f}M): {seconds_per_step(wan_step, 1, 2):.2f} s/step")


if __name__ == "__main__":
    main()
