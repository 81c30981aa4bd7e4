"""Every recipe on 1 or N processes: the same weights after an iteration and the same logged metrics.

Each case trains a tiny model for one iteration (GRPO: two, with LR warmup) from one global batch; on N
processes every process generates and trains its share. A case's per-process minibatch is its global
minibatch divided by N, so one optimizer step sees the same samples either way. The optimizer is made
sensitive to the gradient's scale (Adam with ``eps`` far above the gradients, no clipping), so a loss
weighted per process instead of per sample shows as a different update. Run it both ways and compare
(``tests/test_distributed.py`` does):

    python benchmarks/dist/recipe_equivalence.py OUT_1 [CASE ...]
    accelerate launch --multi_gpu --num_processes 2 benchmarks/dist/recipe_equivalence.py OUT_2 [CASE ...]

Each case writes ``OUT/<case>/checkpoints/step-*/trainable.safetensors`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rewards import Reward, RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[2]
SCALE_SENSITIVE = ["optim.lr=1.0", "optim.eps=1.0", "optim.weight_decay=0", "optim.max_grad_norm=1e9"]

CASES: dict[str, tuple[str, list[str]]] = {
    # GRPO with KL to the reference, two iterations under a 4-step LR warmup (the schedule must count
    # optimizer steps: 1 per iteration here, whatever the number of processes).
    "grpo_kl": (
        "configs/grpo/tiny_sd3.yaml",
        ["grpo.kl_beta=0.01", "train.steps=2", "optim.warmup_steps=4", "optim.lr=50"],
    ),
    "nft": ("configs/nft/tiny_sd3.yaml", []),
    "dpo_online": ("configs/dpo/tiny_sd3_online.yaml", ["data.group_size=3"]),
    "inpo_offline": (
        "configs/dpo/tiny_sd3_online.yaml",
        ["model.path=tiny-sd", "dpo.pairs_per_step=4", "dpo.inversion=true", "dpo.inversion_steps=4",
         "dpo.beta=2000", "dpo.timesteps=uniform"],
    ),  # fmt: skip
    # One pair for two processes: the second trains on a zero-weight stand-in (no hang, no effect).
    "dpo_offline_one_pair": ("configs/dpo/tiny_sd3_online.yaml", ["dpo.pairs_per_step=1", "dpo.beta=500"]),
    "alignprop": (
        "configs/grpo/tiny_sd3.yaml",
        ["train.algorithm=backprop", "backprop.mode=alignprop", "backprop.k=2", "backprop.kl_beta=0.1",
         "sampling.steps=3", "data.group_size=1", "data.groups_per_step=2"],
    ),  # fmt: skip
    "sft": ("configs/sft/tiny_shapes.yaml", ["sft.batch_size=4"]),
    # DMD with f-distill (weights normalised over the global batch), the GAN term and the regression: the
    # fake score and its discriminator train on every process's share, pool draws keyed by sample. The
    # discriminator reads the first of two blocks, so the generator's GAN term leaves the fake score's later
    # parameters without a gradient (as a UNet's mid_block does its up blocks); DDP must not wait for them.
    "dmd_fdistill": (
        "configs/dmd/tiny_sd3_fdistill.yaml",
        ["data.groups_per_step=4", "dmd.regression_weight=0.5", "dmd.fake_lr=1e-3",
         "dmd.gan_layer=transformer_blocks.0"],
    ),  # fmt: skip
    # FSDP2 (train.sharding=fsdp) on N processes against one unsharded process: LoRA with the evaluation
    # EMA and the KL reference, NFT's old policy, full fine-tuning; and a sharded resume.
    "grpo_kl_fsdp": (
        "configs/grpo/tiny_sd3.yaml",
        ["grpo.kl_beta=0.01", "train.steps=2", "train.ema_decay=0.5", "train.sharding=fsdp", "optim.lr=50"],
    ),
    "nft_fsdp": ("configs/nft/tiny_sd3.yaml", ["train.sharding=fsdp"]),
    "sft_full_fsdp": ("configs/sft/tiny_shapes.yaml", ["sft.batch_size=4", "model.lora_rank=0", "train.sharding=fsdp",
                                                       "optim.lr=1e-3"]),
    "grpo_fsdp_resume": ("configs/grpo/tiny_sd3.yaml", ["train.steps=2", "train.ema_decay=0.5", "train.sharding=fsdp"]),
    # DMD sharded: the LoRA student with its fake-score copy and discriminator head (f-distill, GAN, regression),
    # resumed; the full-weight UNet student with its teacher and fake-score copies.
    "dmd_fsdp_resume": ("configs/dmd/tiny_sd3_fdistill.yaml", ["data.groups_per_step=4", "dmd.regression_weight=0.5",
                                                               "dmd.fake_lr=1e-3", "train.sharding=fsdp"]),
    # RTDMD's cold start sharded: the student and fake score of dmd_fsdp_resume's first checkpoint (dmd.init).
    "dmd_init_fsdp": ("configs/dmd/tiny_sd3_fdistill.yaml", ["data.groups_per_step=4", "dmd.fake_lr=1e-3",
                                                             "train.steps=1", "train.sharding=fsdp"]),
    # A model loaded from its files (no seeding of its own, unlike the tiny ones): the LoRA student's and the
    # discriminator head's initial weights, which FSDP2 shards without broadcasting, must agree over processes.
    "dmd_shapes_lora_fsdp": ("configs/dmd/shapes_1step_gan.yaml", [
        "model.lora_rank=4", "data.groups_per_step=4", "data.balance_by=null", "dmd.fake_updates=1",
        "dmd.regression_pairs=8", "dmd.teacher_steps=2", "dmd.fake_lr=1e-3", "train.steps=1",
        "eval.prompts=null", "train.sharding=fsdp"]),  # fmt: skip
    "dmd_full_fsdp": ("configs/dmd/tiny_sd.yaml", ["data.groups_per_step=4", "optim.lr=100", "dmd.fake_lr=1e-3",
                                                   "train.steps=1", "train.sharding=fsdp"]),
    # Video (tiny Wan 2.2): both experts trained by NFT, and by GRPO on text-to-video in micro-batches of one
    # (a process may run only one expert in a step: DDP finds the other's unused parameters), the low-noise
    # expert sharded; online DPO on image-to-video; reward backprop through both experts with per-step
    # checkpointing (the recomputation in backward runs the bare network, not the DDP wrapper).
    "nft_wan22_both": ("configs/nft/tiny_wan22_i2v.yaml", ["model.expert=both"]),
    "grpo_wan22_t2v_both_micro": ("configs/grpo/tiny_wan22_t2v.yaml", ["train.micro_batch_size=1"]),
    "backprop_wan22_both": ("configs/backprop/tiny_wan22_i2v.yaml", ["model.expert=both", "backprop.k=3", "optim.lr=1000"]),
    "nft_wan22_low_fsdp": ("configs/nft/tiny_wan22_i2v.yaml", ["train.sharding=fsdp"]),
    "dpo_wan22_online": ("configs/dpo/tiny_wan22_i2v_online.yaml", []),
    # GenEval evaluation split over the processes (5 prompts: one process pads its share), unsharded and sharded.
    "grpo_eval": ("configs/grpo/tiny_sd3.yaml", ["eval.prompts=assets/shapes/prompts/test.jsonl", "eval.every=1",
                                                 "eval.max_prompts=5", "eval.images_per_prompt=1"]),
    "grpo_eval_fsdp": ("configs/grpo/tiny_sd3.yaml", ["eval.prompts=assets/shapes/prompts/test.jsonl", "eval.every=1",
                                                      "eval.max_prompts=5", "eval.images_per_prompt=1",
                                                      "train.sharding=fsdp", "train.steps=1"]),
}  # fmt: skip
GLOBAL_MINIBATCH = {"grpo": 4, "nft": 4}


@register_reward("smooth_red_for_equivalence")
class SmoothRed(Reward):
    """Smooth in the pixels, so that float rounding between batch layouts cannot reorder samples."""

    differentiable = True

    def score_batch(self, images, prompts, metadata):
        return RewardOutput(images[:, 0].flatten(1).mean(1) - 0.5 * images[:, 1:].flatten(1).mean(1))


def write_pairs(directory: Path) -> Path:
    """Four random image pairs (32x32 PNG) and their pair file."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(4):
        for name in (f"w{i}.png", f"l{i}.png"):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(directory / name)
        lines.append(
            json.dumps(
                {"prompt": f"a photo of {i % 3 + 2} circles", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}
            )
        )
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "pairs.jsonl"


def run_cases(out: Path, names: list[str], num_processes: int) -> None:
    from flowalign.config import RewardSpec, load_config
    from flowalign.train import train

    pairs = ROOT / "runs" / "equivalence_pairs" / "pairs.jsonl"
    for name in names:
        path, overrides = CASES[name]
        overrides = list(overrides)
        algorithm = load_config(ROOT / path, overrides).train.algorithm
        if algorithm in GLOBAL_MINIBATCH:
            overrides.append(f"{algorithm}.minibatch_size={GLOBAL_MINIBATCH[algorithm] // num_processes}")
        offline = "offline" in name
        if name.endswith("_init"):  # start from an earlier case's checkpoint (run it first)
            overrides.append(f"dmd.init={out / 'dmd_fsdp_resume' / 'checkpoints' / 'step-000001'}")
        if offline:
            overrides.append(f"dpo.pairs={pairs}")
        if num_processes == 1:  # the reference: one unsharded process
            overrides = [o for o in overrides if o != "train.sharding=fsdp"]
        common = [*SCALE_SENSITIVE, *overrides, "train.checkpoint_every=1", "train.keep_checkpoints=5",
                  "train.progress=false", "train.log_with=[]"]  # fmt: skip

        def run(output: Path, *extra: str) -> None:
            config = load_config(ROOT / path, [*common, f"train.output_dir={output}", *extra])
            if config.reward or algorithm in ("grpo", "nft", "dpo", "backprop"):
                config.reward = {} if offline else {"smooth_red_for_equivalence": RewardSpec()}
            train(config)

        run(out / name)
        if name.endswith("_resume"):  # continue from the first checkpoint in another directory
            run(out / f"{name}_resumed", f"train.resume={out / name / 'checkpoints' / 'step-000001'}")


def main() -> None:
    out, *names = sys.argv[1:]
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        write_pairs(ROOT / "runs" / "equivalence_pairs")
    state.wait_for_everyone()
    run_cases(Path(out), names or list(CASES), state.num_processes)


if __name__ == "__main__":
    main()
