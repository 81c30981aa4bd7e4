"""One Flow-GRPO sampling step on 1 or N processes must give the same rewards and advantages.

Samples are seeded per (group, index in group), so the global batch is the same whatever the process
count; rewards are gathered before the group statistics. Run it both ways and compare:

    python benchmarks/dist/advantage_equivalence.py CONFIG OUT_1.pt [overrides...]
    accelerate launch --num_processes 2 --cpu benchmarks/dist/advantage_equivalence.py CONFIG OUT_2.pt [overrides...]
"""

from __future__ import annotations

import sys

import torch

from flowalign.config import RewardSpec, load_config
from flowalign.train import Recipe, run_training
from flowalign.train.online import sample_and_score
from rewards import Reward, RewardOutput, register_reward


@register_reward("mean_intensity")
class MeanIntensity(Reward):
    """A smooth reward, so that float rounding between batch layouts cannot flip it (JPEG sizes can)."""

    def score_batch(self, images, prompts, metadata):
        return RewardOutput(images.flatten(1).mean(1))


def main() -> None:
    config_path, out, *overrides = sys.argv[1:]
    config = load_config(config_path, [*overrides, "train.steps=1", "train.checkpoint_every=0", "train.log_with=[]"])
    config.reward = {"mean_intensity": RewardSpec()}

    class Probe(Recipe):
        def iteration(self, step: int) -> dict[str, float]:
            return probe(self.ctx, step)

    def probe(ctx, step):
        sampled = sample_and_score(ctx, step, advantage=ctx.config.grpo)
        images = ctx.accelerator.gather(sampled.trajectory.images.contiguous()).cpu()
        if ctx.accelerator.is_main_process:
            torch.save(
                {
                    "rewards": {k: v.cpu() for k, v in sampled.all_rewards.items()},
                    "advantages": sampled.all_advantages.cpu(),
                    "images": images,
                    "num_processes": ctx.accelerator.num_processes,
                },
                out,
            )
        return sampled.metrics

    run_training(config, Probe())


if __name__ == "__main__":
    main()
