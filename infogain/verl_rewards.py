"""The InfoGain reference service's EM + IG reward for verl's ``custom_reward_function``:

    reward:                              # verl 0.9 reads it under reward:
      custom_reward_function:
        path: pkg://infogain.verl_rewards   # a module path also works in Ray workers
        name: qa_em_ig_compute_score

The InfoGain service comes from ``IG_SERVICE_URL`` / ``IG_BATCH_SIZE`` / ``IG_TIMEOUT`` (read at
first use); when it cannot answer, the IG term is 0.0 and the EM part still counts.
``extra_info.question`` (or ``problem``) is the question; ``ground_truth`` the gold answers.
"""

from __future__ import annotations

import os
from functools import cache

from core.rewards.base import verl_async, verl_compute_score
from infogain.client import InfoGainClient
from infogain.reward import QAExactMatchIG


@cache
def _reward():
    client = InfoGainClient(
        url=os.environ.get("IG_SERVICE_URL", "http://127.0.0.1:8000"),
        batch_size=int(os.environ.get("IG_BATCH_SIZE", 512)),
        timeout=float(os.environ.get("IG_TIMEOUT", 120)),
        api_key=os.environ.get("IG_API_KEY"),
        fallback="zero",
    )
    return verl_compute_score(QAExactMatchIG(client))


def qa_em_ig_compute_score(*args, **kwargs):
    """EM of the last ``<answer>`` + 0.6 × ΔIG of the ``<information>`` blocks (single or batched form)."""
    return _reward()(*args, **kwargs)


# The same for verl's reward loop to await.
qa_em_ig_compute_score_async = verl_async(qa_em_ig_compute_score)
