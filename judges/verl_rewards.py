"""Drop-in reward functions for verl's ``custom_reward_function``.

    reward:                              # verl 0.9 reads it under reward:
      custom_reward_function:
        path: pkg://judges.verl_rewards   # a module path also works in Ray workers
        name: embedding_compute_score      # or llm_judge_compute_score

Each function takes verl's single form ``(data_source, solution_str, ground_truth, extra_info)``
and its batched keyword form (``data_sources=..., solution_strs=..., ...``, as the batch reward
manager calls it). The servers come from the reference rewards' environment variables, read at first use:
``EMBEDDING_SERVER_URL`` / ``_API_KEY`` / ``_TIMEOUT`` (default 30 s) and ``LLM_JUDGE_SERVER_URL``
/ ``_API_KEY`` / ``_TIMEOUT`` (default 60 s); ``extra_info`` overrides per sample as the reference rewards do.
"""

from __future__ import annotations

import os
from functools import cache

from core.generation_client import GenerationClient
from core.rewards import verl_compute_score
from judges.embedding_client import EmbeddingClient
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
