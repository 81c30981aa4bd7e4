"""Training recipes on one shared accelerate loop."""

from __future__ import annotations

from flowalign.config import Config
from flowalign.train.loop import TrainContext, TrainResult, run_training
from flowalign.train.recipe import RECIPES, Recipe, recipe_class, register_recipe

__all__ = [
    "RECIPES",
    "Recipe",
    "TrainContext",
    "TrainResult",
    "recipe",
    "recipe_class",
    "register_recipe",
    "run_training",
    "train",
]


def recipe(algorithm: str) -> Recipe:
    """A fresh recipe for ``train.algorithm`` (``grpo``, ``nft``, ``backprop``, ``dpo`` or ``sft``, the
    supervised control)."""
    return recipe_class(algorithm)()


def train(config: Config) -> TrainResult:
    """Run the recipe ``config.train.algorithm`` names."""
    from flowalign.train.evaluate import Evaluation

    return run_training(config, recipe(config.train.algorithm), evaluate=Evaluation())
