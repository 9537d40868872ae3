"""``python run.py check=judge|embedding``: is a reward server up, what does it serve, does it score?

Prints the server's health and model info, one test score with its latency, and exits non-zero
with a plain reason when the server is unreachable or refuses the API key.
"""

from __future__ import annotations

import sys
import time

from hydra.utils import instantiate
from rich.console import Console

from core.rewards.base import RewardSample
from core.serving.errors import ServiceError
from core.serving.http import HTTPClient

_PROBE = RewardSample(
    "The capital of France is Paris.",
    "Paris is the capital of France.",
    "What is the capital of France?",
    {"problem": "What is the capital of France?"},
)

_HINTS = {
    "judge": ("judge.url", "LLM_JUDGE_SERVER_URL", "judge.api_key", "LLM_JUDGE_SERVER_API_KEY", "/v1/models"),
    "embedding": ("embedder.url", "EMBEDDING_SERVER_URL", "embedder.api_key", "EMBEDDING_SERVER_API_KEY", "/info"),
}


def explain(exc: ServiceError, url: str, target: str) -> str:
    """A one-line reason and what to change, for a failed check."""
    url_key, url_env, key_key, key_env, _ = _HINTS[target]
    if exc.status == 401:
        return f"{url} refused the API key (HTTP 401): set {key_env} or {key_key}=..."
    if exc.status is None:
        return f"cannot reach {url}: is the server running? Set {url_env} or {url_key}=... ({exc})"
    return f"{url} answered an error: {exc}"


def run(cfg) -> dict:
    """Check the server that ``cfg.check.target`` names; exit 1 with the reason when it fails."""
    target = cfg.check.target
    node = cfg.judge if target == "judge" else cfg.embedder
    console = Console()
    http = HTTPClient(node.url, api_key=node.api_key, timeout=node.timeout, max_retries=0)
    report: dict = {"url": http.base_url}
    try:
        started = time.perf_counter()
        report["health"] = http.get("/health")
        report["health_ms"] = round((time.perf_counter() - started) * 1000, 1)
        report["model_info"] = http.get(_HINTS[target][4])
        component = cfg.reward.components.get("llm_judge" if target == "judge" else "embedding")
        reward = instantiate(component.fn, **({"fallback": "zero"} if target == "embedding" else {}))
        started = time.perf_counter()
        report["test_score"] = reward([_PROBE])[0]
        report["score_ms"] = round((time.perf_counter() - started) * 1000, 1)
        if reward.stats.get("requests_failed", 0):
            console.print(
                f"[red]FAILED[/red] {http.base_url} is up but the test score request failed "
                "(the warning above says why)"
            )
            sys.exit(1)
    except ServiceError as exc:
        console.print(f"[red]FAILED[/red] {explain(exc, http.base_url, target)}")
        sys.exit(1)
    finally:
        http.close()
    console.print(f"[green]OK[/green] {target} server at {report['url']}")
    for key in ("health", "health_ms", "model_info", "test_score", "score_ms"):
        console.print(f"  {key}: {report[key]}")
    return report
