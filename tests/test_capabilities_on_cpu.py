"""One convention for every capability: where its protocol, engine, client, app and configs live,
that the engine and the client both meet the protocol, and (for the capabilities the shared
session servers serve) one behaviour suite run against the engine and against the client alike."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, get_method, instantiate

from conftest import JUDGE_KEY, ROOT
from core.models.generation import SamplingParams
from core.models.protocols import Embedder, TextGenerator

# capability: (protocol, engine, client, app factory, config group, service option)
CAPABILITIES = {
    "generation": (
        "core.models.protocols.TextGenerator",
        "core.models.generation_engine.GenerationEngine",
        "core.models.generation_client.GenerationClient",
        "judges.judge_app.judge_app",
        "judge",
        "llm_judge",
    ),
    "embedding": (
        "core.models.protocols.Embedder",
        "core.models.embedding_engine.EmbeddingEngine",
        "core.models.embedding_client.EmbeddingClient",
        "core.models.embedding_app.embedding_app",
        "embedder",
        "embedding",
    ),
    "infogain": (
        "infogain.protocols.InfoGainScorer",
        "infogain.engine.InfoGainEngine",
        "infogain.client.InfoGainClient",
        "infogain.app.infogain_app",
        "ig",
        "infogain",
    ),
    "listener": (
        "lewis.protocols.Listener",
        "lewis.engines.ListenerEngine",
        "lewis.clients.ListenerClient",
        "lewis.apps.listener_app",
        "listener",
        "listener",
    ),
    "speaker": (
        "lewis.protocols.Speaker",
        "lewis.engines.SpeakerEngine",
        "lewis.clients.SpeakerClient",
        "lewis.apps.speaker_app",
        "speaker",
        "speaker",
    ),
    "policy": (
        "ppo_server.protocols.Policy",
        "ppo_server.policy_engine.PolicyEngine",
        "ppo_server.clients.PolicyClient",
        "ppo_server.apps.policy_app",
        "policy",
        "policy",
    ),
    "value": (
        "ppo_server.protocols.Value",
        "ppo_server.value_engine.ValueEngine",
        "ppo_server.clients.ValueClient",
        "ppo_server.apps.value_app",
        "value",
        "value",
    ),
    "reward": (
        "core.rewards.protocols.RewardScorer",
        "core.rewards.mix_engine.RewardMix",
        "core.rewards.reward_client.RewardClient",
        "core.rewards.reward_app.reward_app",
        "reward",
        "reward",
    ),
}
# The in-process option of a group, where it is not `local`: every reward= mix is the engine.
LOCAL_OPTION = {"reward": "qa_format"}


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=outputs/composed", *overrides])


def protocol_methods(protocol) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for cls in protocol.__mro__
        if typing.Protocol in cls.__bases__ or cls is protocol
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def accepts(implementation: inspect.Signature, declared: inspect.Signature) -> bool:
    """Whether a method with ``implementation`` can be called as ``declared`` says (by name)."""
    params = implementation.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return True
    wanted = [n for n, p in declared.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return all(name in params for name in wanted)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_one_rule_places_every_capability(capability):
    protocol, engine, client, app, group, service = CAPABILITIES[capability]
    package = protocol.rsplit(".protocols.", 1)[0]
    assert package.count(".") == (1 if package.startswith("core.") else 0)  # a domain package, or one of core's
    assert engine.startswith(package) and "engine" in engine.rsplit(".", 2)[-2]
    assert client.startswith(package) and "client" in client.rsplit(".", 2)[-2]
    assert "app" in app.rsplit(".", 2)[-2]
    # the mode switch: <group>=local builds the engine, <group>=remote the client
    assert composed(f"{group}={LOCAL_OPTION.get(capability, 'local')}")[group]._target_ == engine
    assert composed(f"{group}=remote")[group]._target_ == client
    # the service: the one runner, over this capability's app
    served = composed(f"service={service}")
    assert served.task._target_ == "core.serving.run_service" and served.app._target_ == app
    assert "trainer" not in served and "lora" not in served  # a service composes no training settings


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_engine_and_client_both_meet_the_protocol(capability):
    protocol_path, engine, client, *_ = CAPABILITIES[capability]
    protocol = get_class(protocol_path)
    declared = protocol_methods(protocol)
    assert declared, f"{protocol_path} declares no methods"
    for implementation in (get_class(engine), get_class(client)):
        for name, signature in declared.items():
            method = getattr(implementation, name, None)
            assert callable(method), f"{implementation.__name__} lacks {name}"
            assert accepts(inspect.signature(method), signature), f"{implementation.__name__}.{name}{signature}"


def test_apps_take_an_engine_and_server_settings():
    for *_, app, _group, _service in CAPABILITIES.values():
        first_two = list(inspect.signature(get_method(app)).parameters)[:2]
        assert len(first_two) == 2 and first_two[1] == "settings", app


@pytest.fixture(params=["engine", "client"])
def generator(request, judge_server, tiny_model_cfg) -> TextGenerator:
    if request.param == "engine":
        return instantiate(composed("model@judge_model=tiny_lm").judge)
    return instantiate(composed("judge=remote", f"judge.url={judge_server.url}", f"judge.api_key={JUDGE_KEY}").judge)


def test_generation_behaves_the_same_in_process_and_served(generator):
    assert isinstance(generator, TextGenerator) and generator.name
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=6, logprobs=True, top_logprobs=2)
    (pair,) = generator.complete(["The capital of France is"], greedy)
    assert len(pair) == 2 and pair[0].text == pair[1].text  # greedy: both samples agree
    for c in pair:
        assert 1 <= c.completion_tokens <= 6 and c.finish_reason in ("stop", "length")
        assert len(c.logprobs) == c.completion_tokens and all(len(t.top) == 2 for t in c.logprobs)
        assert c.mean_logprob <= 0.0
    (reply,) = generator.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=4, seed=1))
    assert len(reply) == 1 and reply[0].completion_tokens <= 4


def test_generation_engine_and_server_agree_token_for_token(judge_server):
    engine = instantiate(composed("model@judge_model=tiny_lm").judge)
    client = instantiate(composed("judge=remote", f"judge.url={judge_server.url}", f"judge.api_key={JUDGE_KEY}").judge)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = ["Paris is", "One, two, three,"]
    assert [g[0].text for g in engine.complete(prompts, greedy)] == [
        g[0].text for g in client.complete(prompts, greedy)
    ]


@pytest.fixture(params=["engine", "client"])
def embedder(request, embedding_server) -> Embedder:
    if request.param == "engine":
        return instantiate(composed().embedder)
    return instantiate(composed("embedder=remote", f"embedder.url={embedding_server.url}").embedder)


def test_embedding_behaves_the_same_in_process_and_served(embedder):
    assert isinstance(embedder, Embedder)
    texts = ["Paris is the capital of France.", "France's capital city is Paris.", "I like green bicycles."]
    unit = embedder.embed(texts)
    assert unit.shape == (3, 384) and unit.dtype == np.float32
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-4)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.2  # a paraphrase is closer than an unrelated text
    raw = embedder.embed(texts[:1], normalize=False)
    assert not np.isclose(np.linalg.norm(raw), 1.0, atol=1e-3) and np.allclose(
        raw / np.linalg.norm(raw), unit[:1], atol=1e-4
    )
    assert embedder.info()["model_id"].endswith("all-MiniLM-L6-v2")
