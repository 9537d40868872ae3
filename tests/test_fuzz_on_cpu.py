"""Every service fuzzed from its own OpenAPI document (schemathesis): valid and invalid bodies
generated for every route, against the real app on loopback. For every answer: no 5xx, the status
and body declared in the document (errors in their API family's shape), the declared content type;
for invalid bodies, a 4xx. The server answers ``/health`` afterwards.

``FUZZ_EXAMPLES`` sets the examples per route and mode (``make fuzz`` runs a deeper pass)."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import ROOT, ThreadServer
from core.serving.runner import build_service

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
TINY_LM = ["model=tiny_lm"]
SERVICES = {
    "embedding": ["service=embedding"],
    # A small batch budget: fuzzed n × max_tokens past it must be refused, not decoded.
    "llm_judge": ["service=llm_judge", *TINY_LM, "engine.max_batch_tokens=1024", "app.default_max_tokens=16"],
    "infogain": [
        "service=infogain",
        *TINY_LM,
        "model@ig.generator.model=tiny_lm",
        "ig.num_generations=2",
        "ig.max_new_tokens=4",
    ],
    "listener": ["service=listener"],
    "speaker": ["service=speaker", "engine.max_new_tokens=4"],
    "policy": ["service=policy", *TINY_LM, "policy.queue.num_samples=1", "policy.queue.max_output_length=40"],
    "value": ["service=value", *TINY_LM],
    # exact match + embedding (MiniLM) + the judge on the tiny model: fuzzed samples reach every component
    "reward": ["service=reward", "reward=default", "model@judge_model=tiny_lm"],
}
# Deliberate 5xx in a service's contract: the policy server answers an unknown decoding strategy
# with 501 Not Implemented, as the reference policy server does.
DECLARED_5XX = {"policy": ["501"]}
# InfoGain answers a malformed *item* with 200 and that item's ``errors[i]`` (one bad item never
# fails a batch), so invalid items are not a rejected request there.
ACCEPTS_BAD_ITEMS = {"/compute_info_gain"}


def served_app(name: str, tmp_path):
    overrides = [*SERVICES[name], f"paths.output_dir={tmp_path}"]
    if name in ("policy", "value"):
        overrides.append(f"{name}.scratch={tmp_path / 'scratch'}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return build_service(cfg)


def fuzz(operation, mode: GenerationMode, url: str) -> None:
    """``EXAMPLES`` generated requests to one route, each answer checked."""
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode is GenerationMode.NEGATIVE and operation.path not in ACCEPTS_BAD_ITEMS:
        checks.append(negative_data_rejection)

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        case.call_and_validate(base_url=url, checks=checks, timeout=60)

    try:
        run()
    except Unsatisfiable:
        if mode is not GenerationMode.NEGATIVE:
            raise
        # No input of this route can be invalid (no body; any string is a valid path value).


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVICES))
def test_fuzzed_from_its_openapi(name, tmp_path):
    with ThreadServer(served_app(name, tmp_path)) as server:
        allowed = ["2xx", "3xx", "4xx", *DECLARED_5XX.get(name, [])]
        config = SchemathesisConfig.from_dict({"checks": {"not_a_server_error": {"expected-statuses": allowed}}})
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
        operations = [op.ok() for op in schema.get_all_operations()]
        assert len(operations) >= 3, operations  # its routes, /health and /metrics
        failures: list[str] = []
        for operation in operations:
            takes_input = any(len(part) for part in (operation.body, operation.path_parameters, operation.query))
            for mode in (
                (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,)
            ):
                try:
                    fuzz(operation, mode, server.url)
                except Exception as exc:  # noqa: BLE001 - gathered, so one run reports every route
                    failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
        assert not failures, "\n\n".join(failures)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
