"""Drop-in reward functions for verl's ``custom_reward_function``.

    reward:                              # verl 0.9 reads it under reward:
      custom_reward_function:
        path: pkg://judges.verl_rewards   # a module path also works in Ray workers
        name: embedding_compute_score      # or llm_judge_compute_score, or compute_score (routes by data_source)

Each function takes verl's single form ``(data_source, solution_str, ground_truth, extra_info)``
and its batched keyword form (``data_sources=..., solution_strs=..., ...``, as the batch reward
manager calls it); each has an ``async`` twin (``..._async``) for verl's reward loop to await, and
``reward_kwargs.return_dict=true`` makes the single form return ``{score, <failure counts>}``.
The servers come from the reference rewards' environment variables, read at first use:
``EMBEDDING_SERVER_URL`` / ``_API_KEY`` / ``_TIMEOUT`` (default 30 s) and ``LLM_JUDGE_SERVER_URL``
/ ``_API_KEY`` / ``_TIMEOUT`` (default 60 s); ``extra_info`` overrides per sample as the reference rewards do.
"""

from __future__ import annotations

import os
from functools import cache

from core.models.embedding_client import EmbeddingClient
from core.models.generation_client import GenerationClient
from core.rewards.base import verl_async, verl_compute_score, verl_entry
from judges.embedding_reward import EmbeddingSimilarityReward
from judges.llm_judge import LLMJudgeReward


def _env(prefix: str, default_url: str, default_timeout: str) -> dict:
    return {
        "url": os.environ.get(f"{prefix}_URL", default_url),
        "api_key": os.environ.get(f"{prefix}_API_KEY"),
        "timeout": float(os.environ.get(f"{prefix}_TIMEOUT", default_timeout)),
    }


@cache
def _embedding():
    return verl_compute_score(
        EmbeddingSimilarityReward(EmbeddingClient(**_env("EMBEDDING_SERVER", "http://127.0.0.1:8080", "30")))
    )


@cache
def _judge():
    return verl_compute_score(
        LLMJudgeReward(GenerationClient(**_env("LLM_JUDGE_SERVER", "http://127.0.0.1:8000", "60")))
    )


def embedding_compute_score(*args, **kwargs):
    """Embedding-similarity reward against the TEI-compatible server in ``EMBEDDING_SERVER_URL``."""
    return _embedding()(*args, **kwargs)


def llm_judge_compute_score(*args, **kwargs):
    """LLM-judge reward against the OpenAI-compatible server in ``LLM_JUDGE_SERVER_URL``."""
    return _judge()(*args, **kwargs)


# data_source prefix -> scorer, as the reference rewards route (`llm_judge_remote_<dataset>`,
# `embedding_remote_<dataset>`); the first matching prefix wins.
ROUTES = {"llm_judge": llm_judge_compute_score, "embedding": embedding_compute_score}


def _route(data_source: str | None):
    for prefix, scorer in ROUTES.items():
        if (data_source or "").startswith(prefix):
            return scorer
    return _verl_default


def _verl_default(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    try:
        from verl.utils.reward_score import default_compute_score
    except ImportError:
        raise NotImplementedError(
            f"data_source {data_source!r} matches none of {', '.join(p + '*' for p in ROUTES)} "
            "and verl (whose default scorers would take it) is not installed"
        ) from None
    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)


def _route_batch(data_sources, solution_strs, ground_truths, extra_infos=None, **reward_kwargs) -> list[float]:
    n = len(solution_strs)
    sources = list(data_sources) if data_sources is not None else [""] * n
    truths = list(ground_truths) if ground_truths is not None else [None] * n
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    by_scorer: dict = {}
    for i, source in enumerate(sources):
        by_scorer.setdefault(_route(source), []).append(i)
    scores = [0.0] * n
    for scorer, idx in by_scorer.items():
        if scorer is _verl_default:  # verl's scorers take one sample at a time
            part = [scorer(sources[i], solution_strs[i], truths[i], infos[i], **reward_kwargs) for i in idx]
        else:
            part = scorer(
                data_sources=[sources[i] for i in idx],
                solution_strs=[solution_strs[i] for i in idx],
                ground_truths=[truths[i] for i in idx],
                extra_infos=[infos[i] for i in idx],
                **reward_kwargs,
            )
        for i, score in zip(idx, part, strict=True):
            scores[i] = score
    return scores


# With return_dict, every sample reports the same keys whichever reward scored it (verl lines
# up reward_extra_info by key across the batch).
ROUTED_FAILURE_KEYS = tuple(dict.fromkeys(LLMJudgeReward.failure_keys + EmbeddingSimilarityReward.failure_keys))


def _route_one(data_source, solution_str, ground_truth, extra_info=None, return_dict=False, **reward_kwargs):
    scorer = _route(data_source)
    if not return_dict:
        return scorer(data_source, solution_str, ground_truth, extra_info, **reward_kwargs)
    if scorer is _verl_default:
        result = {"score": float(scorer(data_source, solution_str, ground_truth, extra_info, **reward_kwargs))}
    else:
        result = scorer(data_source, solution_str, ground_truth, extra_info, return_dict=True, **reward_kwargs)
    return {"score": result["score"], **{key: result.get(key, 0) for key in ROUTED_FAILURE_KEYS}}


# One entry point for a mixed dataset: each sample goes to the reward its ``data_source`` prefix
# names (``llm_judge*`` → the LLM judge, ``embedding*`` → embedding similarity), anything else to
# verl's own default scorer; single and batched forms, as the other entry points.
compute_score = verl_entry(_route_one, _route_batch, "compute_score")


# The same three for verl's reward loop to await (it runs coroutine functions on its event loop).
embedding_compute_score_async = verl_async(embedding_compute_score)
llm_judge_compute_score_async = verl_async(llm_judge_compute_score)
compute_score_async = verl_async(compute_score)
