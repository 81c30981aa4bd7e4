"""Reward models for flowalign: a protocol, a registry and built-in rewards.

This package never imports :mod:`flowalign`; it can be used on its own to score images::

    from rewards import load_reward
    reward = load_reward("compressibility")
    out = reward(images, prompts)          # images: [B, 3, H, W] float in [0, 1]
    out.scores                             # [B] float32
"""

from rewards.base import Reward, RewardInputError, RewardOutput, validate_images
from rewards.compose import WeightedReward
from rewards.registry import available_rewards, load_reward, register_reward, resolve_reward_class

__all__ = [
    "Reward",
    "RewardInputError",
    "RewardOutput",
    "WeightedReward",
    "available_rewards",
    "load_reward",
    "register_reward",
    "resolve_reward_class",
    "validate_images",
]
