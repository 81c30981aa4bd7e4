"""Reward models for flowalign: a protocol, a registry and built-in rewards.

This package never imports :mod:`flowalign`; it can be used on its own to score images::

    from rewards import load_reward
    reward = load_reward("compressibility")
    out = reward(images, prompts)          # images: [B, 3, H, W] float in [0, 1]
    out.scores                             # [B] float32

Built-in rewards (``available_rewards()``): aesthetic, artifact, clip, compressibility, geneval, hpsv2,
identity, incompressibility, ocr, pickscore, winrate. docs/rewards.md describes each one's scale,
preprocessing, differentiability and weights.
"""

from rewards._deps import MissingExtraError
from rewards.base import Reward, RewardInputError, RewardOutput, flatten_frames, validate_images
from rewards.compose import WeightedReward, parse_reward_spec
from rewards.registry import (
    available_rewards,
    load_reward,
    register_reward,
    resolve_reward_class,
    reward_factory,
)
from rewards.weights import RewardWeightsError

__all__ = [
    "MissingExtraError",
    "Reward",
    "RewardInputError",
    "RewardOutput",
    "RewardWeightsError",
    "WeightedReward",
    "available_rewards",
    "flatten_frames",
    "load_reward",
    "parse_reward_spec",
    "register_reward",
    "resolve_reward_class",
    "reward_factory",
    "validate_images",
]
