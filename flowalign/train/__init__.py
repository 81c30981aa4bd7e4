"""Training recipes on one shared accelerate loop."""

from __future__ import annotations

from flowalign.config import Config
from flowalign.train.loop import Iteration, TrainContext, TrainResult, run_training

__all__ = ["TrainContext", "TrainResult", "recipe", "run_training", "train"]


def recipe(algorithm: str) -> Iteration:
    """The iteration function of ``train.algorithm`` (``grpo``, ``nft``, ``backprop``, ``dpo`` or ``sft``, the
    supervised control)."""
    from flowalign.train.backprop import backprop_iteration
    from flowalign.train.dpo import dpo_iteration
    from flowalign.train.online import grpo_iteration, nft_iteration
    from flowalign.train.sft import sft_iteration

    recipes = {
        "grpo": grpo_iteration,
        "nft": nft_iteration,
        "backprop": backprop_iteration,
        "dpo": dpo_iteration,
        "sft": sft_iteration,
    }
    return recipes[algorithm]


def train(config: Config) -> TrainResult:
    """Run the recipe ``config.train.algorithm`` names."""
    from flowalign.train.evaluate import evaluate

    return run_training(config, recipe(config.train.algorithm), evaluate=evaluate)
