"""Rewards: the ``RewardFunction`` protocol, the weighted ``RewardMix``, model-free rewards, and
the adapters that hand any reward to verl (``compute_score``) and TRL (``reward_funcs``)."""

from core.rewards.base import (
    RewardFunction,
    RewardMix,
    RewardSample,
    references,
    trl_reward_func,
    verl_batched,
    verl_compute_score,
)
from core.rewards.builtin import ExactMatch, LengthReward, RegexReward
from core.rewards.cache import LRUCache

__all__ = [
    "ExactMatch",
    "LRUCache",
    "LengthReward",
    "RegexReward",
    "RewardFunction",
    "RewardMix",
    "RewardSample",
    "references",
    "trl_reward_func",
    "verl_batched",
    "verl_compute_score",
]
