"""A reward service (``service=reward``) as verl and TRL call rewards.

verl (0.9 reads it under ``reward:``)::

    reward:
      custom_reward_function:
        path: pkg://core.rewards.service_entrypoints
        name: compute_score          # or compute_score_async for verl's reward loop to await
        reward_kwargs: {return_dict: true}   # each component into reward_extra_info

``compute_score`` takes verl's single form ``(data_source, solution_str, ground_truth,
extra_info)`` and its batched keyword form (``data_sources=..., solution_strs=..., ...``). With
``return_dict`` the single form returns ``{score, <component>: value, failed: n}``: ``score`` is
the total under ``on_failure`` (0.0 where nothing scored, under ``skip``), each component what
it added before its weight (0.0 where it was skipped), ``failed`` how many components could not
score the sample. The service comes from ``REWARD_SERVICE_URL`` (one URL or comma-separated
replicas), ``REWARD_SERVICE_API_KEY``, ``REWARD_SERVICE_TIMEOUT`` (120 s) and
``REWARD_SERVICE_ON_FAILURE`` (``fallback``), read at first use.

TRL: ``trl_reward_func(client)`` (and ``trl_reward_func_async``) is one reward function
returning the total per completion (``None`` where nothing scored, which TRL leaves out) and
reporting each component's mean through TRL's ``log_metric`` as ``reward_service/<component>``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from functools import cache

from core.rewards.base import trl_samples, verl_async, verl_entry, verl_samples
from core.rewards.protocols import MixScores, RewardScorer
from core.rewards.reward_client import RewardClient


@cache
def service_from_env() -> RewardClient:
    """The reward service the ``REWARD_SERVICE_*`` variables name."""
    return RewardClient(
        os.environ.get("REWARD_SERVICE_URL", "http://127.0.0.1:8100"),
        api_key=os.environ.get("REWARD_SERVICE_API_KEY"),
        timeout=float(os.environ.get("REWARD_SERVICE_TIMEOUT", "120")),
        on_failure=os.environ.get("REWARD_SERVICE_ON_FAILURE", "fallback"),
    )


def verl_result(scores: MixScores, i: int) -> dict:
    """Sample ``i`` as verl's ``return_dict`` form: the score, each component, the failed count."""
    total = scores.total[i]
    parts = {name: scores.value(name, i) for name in scores.components}
    return {
        "score": total if total is not None else 0.0,
        **{name: value if value is not None else 0.0 for name, value in parts.items()},
        "failed": sum(1 for name in scores.components if i in scores.failures.get(name, {})),
    }


def _single(data_source, solution_str, ground_truth, extra_info=None, return_dict=False, **reward_kwargs):
    samples = verl_samples([data_source or ""], [solution_str or ""], [ground_truth], [extra_info], **reward_kwargs)
    result = verl_result(service_from_env().score(samples), 0)
    return result if return_dict else result["score"]


def _batched(data_sources, solution_strs, ground_truths, extra_infos=None, **reward_kwargs) -> list[float]:
    scores = service_from_env().score(
        verl_samples(data_sources, solution_strs, ground_truths, extra_infos, **reward_kwargs)
    )
    return [verl_result(scores, i)["score"] for i in range(len(solution_strs))]


compute_score = verl_entry(_single, _batched, "compute_score")
compute_score_async = verl_async(compute_score)


def trl_reward_func(scorer: RewardScorer | None = None, name: str = "reward_service") -> Callable[..., list]:
    """TRL's ``reward_func(prompts, completions, **kwargs)`` returning the mix's total per
    completion (a service's, or any ``RewardScorer``; default: ``service_from_env()``)."""

    def reward_func(prompts=None, completions=None, log_metric=None, **kwargs) -> list[float | None]:
        mix = scorer or service_from_env()
        scores = mix.score(trl_samples(prompts, completions, **kwargs))
        if log_metric is not None:
            for component in scores.components:
                values = [v for i in range(len(scores.total)) if (v := scores.value(component, i)) is not None]
                if values:
                    log_metric(f"{name}/{component}", sum(values) / len(values))
        return scores.total

    reward_func.__name__ = name  # TRL logs a reward under its function's name
    return reward_func


def trl_reward_func_async(scorer: RewardScorer | None = None, name: str = "reward_service") -> Callable[..., object]:
    """``trl_reward_func``'s ``async`` twin (TRL gathers async reward functions concurrently)."""
    sync = trl_reward_func(scorer, name)

    async def reward_func(prompts=None, completions=None, **kwargs) -> list[float | None]:
        return await asyncio.to_thread(sync, prompts, completions, **kwargs)

    reward_func.__name__ = name
    return reward_func
