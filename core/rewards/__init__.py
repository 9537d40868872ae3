"""Rewards: the ``RewardFunction`` protocol, the weighted ``RewardMix`` (the engine of the reward
capability, ``RewardScorer``), its client and app (``service=reward``), model-free rewards, and the
adapters that hand any reward to verl (``compute_score``) and TRL (``reward_funcs``)."""

from core.rewards.base import (
    RewardFunction,
    RewardSample,
    references,
    trl_reward_func,
    verl_batched,
    verl_compute_score,
)
from core.rewards.builtin import ExactMatch, LengthReward, RegexReward
from core.rewards.cache import LRUCache
from core.rewards.mix_engine import RewardMix
from core.rewards.protocols import MixScores, RewardScorer

__all__ = [
    "ExactMatch",
    "LRUCache",
    "LengthReward",
    "MixScores",
    "RegexReward",
    "RewardFunction",
    "RewardMix",
    "RewardScorer",
    "RewardSample",
    "references",
    "trl_reward_func",
    "verl_batched",
    "verl_compute_score",
]
