"""OpenRLHF's own reward client: ``SingleTurnAgentExecutor._fetch_rewards_via_http`` from
``openrlhf/utils/agent.py`` (openrlhf 0.11.2, installed ``--no-deps`` by the README's test
command), loaded from its file with a stub for ``openrlhf.utils.logging_utils`` as OpenRLHF's own
``tests/test_agent.py`` does, so neither vLLM nor Ray is needed."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import types
from pathlib import Path


def agent_module():
    """``openrlhf.utils.agent``, loaded from its file."""
    spec = importlib.util.find_spec("openrlhf")
    folder = Path(spec.submodule_search_locations[0])
    if "openrlhf.utils.logging_utils" not in sys.modules:
        stub = types.ModuleType("openrlhf.utils.logging_utils")
        stub.init_logger = logging.getLogger
        sys.modules["openrlhf.utils.logging_utils"] = stub
    loaded = importlib.util.spec_from_file_location("openrlhf_agent", folder / "utils" / "agent.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def reward_executor(urls: list[str]):
    """OpenRLHF's executor for ``--remote_rm_url`` (one lives for a whole rollout worker, so its
    rotation over the URLs goes on from call to call)."""
    return agent_module().SingleTurnAgentExecutor(remote_rm_url=urls)


def fetch_rewards(executor, queries: list[str], prompts: list[str], labels: list) -> list[dict]:
    """What OpenRLHF's rollout does after one generation: POST to the next of its reward URLs."""
    return asyncio.run(executor._fetch_rewards_via_http(queries, prompts, labels))
