"""DMD2 distillation at real size: iteration time and peak GPU memory of the shipped SDXL and SD3.5-Medium
configs (``configs/dmd/sdxl_4step.yaml``, ``configs/dmd/sd35m_4step.yaml``, and with ``--family sdxl_1step``
DMD2's one-step SDXL student, ``configs/dmd/sdxl_1step.yaml``: the whole UNet with its GAN term) with random
weights. A config's ``dmd.gan_real`` gets random images of its resolution (the real side's cost, not its
content).

The denoiser is the real architecture (:data:`flowalign.memory.ARCHITECTURES`, random weights, the config's
dtype); the text encoders are one-layer random CLIP / T5 models with the real output widths (so the
denoiser sees real-shaped conditioning) and a character-level tokenizer (CLIP pads to 64 tokens instead
of 77), and the VAE is a small random one with the real latent channels and downsampling factor (DMD
training never decodes). The pipeline is saved to a folder and trained through ``flowalign.train`` with
the config's own settings, as ``flowalign train CONFIG model.path=FOLDER`` would, for ``--steps``
iterations; the first is warm-up. Needs a CUDA GPU.

    python benchmarks/perf/dmd_real_size.py --family sdxl --family sd3 --steps 3 --out benchmarks/results/dmd_real_size
    python benchmarks/perf/dmd_real_size.py --family sdxl_1step --steps 3 train.micro_batch_size=1 --out ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "sdxl": "configs/dmd/sdxl_4step.yaml",
    "sd3": "configs/dmd/sd35m_4step.yaml",
    "sdxl_1step": "configs/dmd/sdxl_1step.yaml",
}


def write_random_images(path: Path, count: int, side: int, seed: int = 0) -> Path:
    """``count`` random ``side x side`` RGB PNGs and their jsonl of ``{"prompt", "image"}`` lines at ``path``
    (a stand-in for ``dmd.gan_real``'s dataset: its cost at real size, not its content)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        name = f"real_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path.parent / name)
        lines.append(json.dumps({"prompt": f"a photo of {i % 4 + 1} red circles", "image": name}))
    path.write_text("\n".join(lines) + "\n")
    return path


def stand_in_overrides(config_path: Path, work: Path, images: int = 32) -> list[str]:
    """Overrides that make a shipped real-size config run here: its ``dmd.gan_real`` (a placeholder path)
    replaced by random images of its resolution."""
    import yaml

    raw = yaml.safe_load(config_path.read_text())
    if not (raw.get("dmd") or {}).get("gan_real"):
        return []
    side = raw["model"]["resolution"]
    return [f"dmd.gan_real={write_random_images(work / 'real' / 'real.jsonl', images, side)}"]


def _clip(hidden: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=64,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=100, max_position_embeddings=64,
        projection_dim=projection,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(latent_channels: int, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, norm_num_groups=4, **kwargs,
    )  # fmt: skip


def build_pipeline(family: str, directory: Path, dtype: torch.dtype, denoiser=None) -> None:
    """Write a pipeline with the real-size random denoiser of ``family`` (or ``denoiser``) to ``directory``."""
    from flowalign.memory import ARCHITECTURES
    from flowalign.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    if denoiser is None:
        with torch.device("cuda"):
            denoiser = ARCHITECTURES[family].build().to(dtype)
    if family == "sdxl":
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        scheduler = DDIMScheduler(  # SDXL base's beta table, spacing and offset
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
        )  # fmt: skip
        pipeline = StableDiffusionXLPipeline(
            unet=denoiser, scheduler=scheduler, vae=_vae(4, scaling_factor=0.13025),
            text_encoder=_clip(768, 768, False), tokenizer=tiny_tokenizer(),
            text_encoder_2=_clip(1280, 1280, True), tokenizer_2=tiny_tokenizer(), force_zeros_for_empty_prompt=True,
        )  # fmt: skip
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
        from transformers import T5Config, T5EncoderModel

        t5 = T5EncoderModel(
            T5Config(vocab_size=100, d_model=4096, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)
        )  # fmt: skip
        pipeline = StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=_clip(768, 768, True), tokenizer=tiny_tokenizer(),
            text_encoder_2=_clip(1280, 1280, True), tokenizer_2=tiny_tokenizer(),
            text_encoder_3=t5, tokenizer_3=tiny_tokenizer(256),
        )  # fmt: skip
    pipeline.to(dtype=dtype)
    pipeline.save_pretrained(directory)
    del pipeline, denoiser
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(family: str, steps: int, work: Path, overrides: list[str]) -> dict:
    from flowalign.config import load_config
    from flowalign.train import train

    config_path = ROOT / CONFIGS[family]
    overrides = [*stand_in_overrides(config_path, work), *overrides]
    shipped = load_config(config_path, overrides)
    dtype = getattr(torch, shipped.model.dtype)
    model_dir = work / f"{family}-random"
    began = time.perf_counter()
    build_pipeline(shipped.model.family, model_dir, dtype)
    built = time.perf_counter() - began
    run = work / f"{family}-run"
    config = load_config(
        config_path,
        [f"model.path={model_dir}", "data.train_prompts=assets/shapes/prompts/train.jsonl", f"train.steps={steps}",
         f"train.output_dir={run}", "train.log_with=[]", "train.checkpoint_every=0", "train.progress=false",
         *overrides],
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    train(config)
    total = time.perf_counter() - began
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows[1:]] or [rows[0]["step_time"]]
    t, d = config.train, config.dmd
    return {
        "family": family,
        "config": CONFIGS[family],
        "overrides": overrides,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "resolution": config.model.resolution,
        "student_steps": config.sampling.steps,
        "samples_per_generator_step": config.data.groups_per_step * config.data.group_size,
        "micro_batch_size": t.micro_batch_size,
        "fake_updates": d.fake_updates,
        "lora_rank": config.model.lora_rank,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "iteration_seconds": times,
        "iteration_seconds_median": statistics.median(times),
        "first_iteration_seconds": rows[0]["step_time"],
        "build_and_save_seconds": built,
        "train_call_seconds": total,
        "losses": [r.get("loss") for r in rows],
        "fake_losses": [r.get("loss_fake") for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=sorted(CONFIGS), help="repeatable; default both")
    parser.add_argument("--steps", type=int, default=3, help="training iterations (the first is warm-up)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json / results.md")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch_size=8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dmd_real_size.py needs a CUDA GPU (it trains real-size denoisers).")
    results = []
    with tempfile.TemporaryDirectory(prefix="flowalign-dmd-") as work:
        for family in args.family or sorted(CONFIGS):
            try:
                result = measure(family, args.steps, Path(work), args.overrides)
            except Exception as err:  # noqa: BLE001  (report it and measure the other family)
                import traceback

                traceback.print_exc()
                print(f"{family}: failed: {err}", flush=True)
                continue
            print(json.dumps(result), flush=True)
            results.append(result)
            import shutil

            shutil.rmtree(Path(work) / f"{family}-random", ignore_errors=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        lines = [
            "# DMD2 at real size, random weights",
            "",
            "Command: `python " + " ".join(sys.argv) + "`",
            "",
            "| config | GPU | resolution | student steps | samples / generator step | micro-batch | fake updates "
            "| iteration s (median after warm-up) | peak allocated GiB | peak reserved GiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['config']} | {r['gpu']} | {r['resolution']} | {r['student_steps']} | "
                f"{r['samples_per_generator_step']} | {r['micro_batch_size']} | {r['fake_updates']} | "
                f"{r['iteration_seconds_median']:.2f} | {r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} |"
            )
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
