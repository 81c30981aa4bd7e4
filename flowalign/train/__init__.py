"""Training recipes on one shared accelerate loop."""

from __future__ import annotations

from flowalign.config import Config
from flowalign.train.loop import TrainContext, TrainResult, run_training

__all__ = ["TrainContext", "TrainResult", "run_training", "train"]


def train(config: Config) -> TrainResult:
    """Run the recipe ``config.train.algorithm`` names."""
    from flowalign.train.backprop import backprop_iteration
    from flowalign.train.dpo import dpo_iteration
    from flowalign.train.evaluate import evaluate
    from flowalign.train.online import grpo_iteration, nft_iteration

    recipes = {
        "grpo": grpo_iteration,
        "nft": nft_iteration,
        "backprop": backprop_iteration,
        "dpo": dpo_iteration,
    }
    return run_training(config, recipes[config.train.algorithm], evaluate=evaluate)
