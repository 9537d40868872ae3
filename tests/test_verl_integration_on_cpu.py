"""verl 0.9 calls our rewards through its own code: its ``ppo_trainer`` config, its loader
(``load_reward_manager``), its reward-loop managers (naive, dapo) and real ``DataProto`` batches,
against live servers on loopback. The overrides are the ones docs/rewards.md tells users to paste."""

from __future__ import annotations

import numpy as np
import pytest
from verl.trainer.ppo.reward import load_reward_manager

from conftest import free_port
from verl_calls import score_with_verl, verl_config


@pytest.mark.parametrize("manager", ["naive", "dapo"])
def test_verl_scores_embedding_rewards_through_its_managers(smollm2_tokenizer, embedding_server, monkeypatch, manager):
    monkeypatch.setenv("EMBEDDING_SERVER_URL", embedding_server.url)
    rows = [
        {
            "data_source": "embedding_remote_qa",
            "response": "Paris is the capital of France.",
            "ground_truth": "Paris is the capital of France.",
        },
        {
            "data_source": "embedding_remote_qa",
            "response": "France's capital city is Paris.",
            "ground_truth": "Paris is the capital of France.",
        },
        {
            "data_source": "embedding_remote_qa",
            "response": "I like green bicycles.",
            "ground_truth": "Paris is the capital of France.",
        },
    ]
    results = score_with_verl(
        smollm2_tokenizer, verl_config("pkg://judges.verl_rewards", "compute_score", manager), rows
    )
    exact, paraphrase, unrelated = (r["reward_score"] for r in results)
    assert exact == pytest.approx(1.0, abs=1e-3) and exact > paraphrase > unrelated + 0.2


def test_verl_default_scorer_takes_other_data_sources(smollm2_tokenizer):
    rows = [
        {"data_source": "openai/gsm8k", "response": "so the answer is #### 42", "ground_truth": "42"},
        {"data_source": "openai/gsm8k", "response": "so the answer is #### 41", "ground_truth": "42"},
    ]
    results = score_with_verl(smollm2_tokenizer, verl_config("pkg://judges.verl_rewards", "compute_score"), rows)
    assert [r["reward_score"] for r in results] == [1.0, 0.0]


def test_search_r1_ground_truth_and_a_dead_infogain_service(smollm2_tokenizer, monkeypatch):
    # verl's Search-R1 data keeps the answers as {"target": array([...])}; the exact-match part must
    # count even when the InfoGain service is down (its term is 0.0 then).
    monkeypatch.setenv("IG_SERVICE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("IG_TIMEOUT", "2")
    truth = {"target": np.array(["Paris"], dtype=object)}
    rows = [
        {
            "data_source": "nq",
            "response": "<answer>paris</answer>",
            "ground_truth": truth,
            "extra_info": {"question": "capital of france?"},
        },
        {
            "data_source": "nq",
            "response": "<answer>lyon</answer>",
            "ground_truth": truth,
            "extra_info": {"question": "capital of france?"},
        },
    ]
    results = score_with_verl(
        smollm2_tokenizer, verl_config("pkg://infogain.verl_rewards", "qa_em_ig_compute_score"), rows
    )
    assert [r["reward_score"] for r in results] == [1.0, 0.0]


def test_reward_kwargs_reach_the_reward(smollm2_tokenizer, embedding_server, monkeypatch):
    monkeypatch.setenv("EMBEDDING_SERVER_URL", embedding_server.url)
    long = "paris is the capital of france and it is a large city with many museums and old bridges."
    rows = [{"data_source": "embedding_remote_qa", "response": long, "ground_truth": "Paris is the capital of France."}]
    plain = score_with_verl(
        smollm2_tokenizer, verl_config("pkg://judges.verl_rewards", "embedding_compute_score"), rows
    )
    penalised = score_with_verl(
        smollm2_tokenizer,
        verl_config(
            "pkg://judges.verl_rewards",
            "embedding_compute_score",
            "naive",
            "+reward.custom_reward_function.reward_kwargs.length_penalty=ratio",
        ),
        rows,
    )
    assert penalised[0]["reward_score"] < plain[0]["reward_score"] - 0.1


def test_async_entry_points_score_the_same_in_verls_loop(smollm2_tokenizer, embedding_server, monkeypatch):
    monkeypatch.setenv("EMBEDDING_SERVER_URL", embedding_server.url)
    rows = [
        {
            "data_source": "embedding_remote_qa",
            "response": "France's capital city is Paris.",
            "ground_truth": "Paris is the capital of France.",
        },
        {"data_source": "openai/gsm8k", "response": "so the answer is #### 42", "ground_truth": "42"},
    ]
    sync = score_with_verl(smollm2_tokenizer, verl_config("pkg://judges.verl_rewards", "compute_score"), rows)
    config = verl_config("pkg://judges.verl_rewards", "compute_score_async")
    assert load_reward_manager(config, smollm2_tokenizer).is_async_reward_score  # verl awaits it
    awaited = score_with_verl(smollm2_tokenizer, config, rows)
    assert [r["reward_score"] for r in awaited] == pytest.approx([r["reward_score"] for r in sync])
    assert awaited[1]["reward_score"] == 1.0


def test_failures_reach_verls_reward_extra_info(smollm2_tokenizer):
    # return_dict: each sample's failure counts travel with its score into verl's reward_extra_info.
    from judges.embedding_reward import lexical_similarity

    dead = {"server_url": f"http://127.0.0.1:{free_port()}", "timeout": 1}
    rows = [
        {
            "data_source": "embedding_remote_qa",
            "response": "the capital is paris",
            "ground_truth": "paris is the capital",
            "extra_info": dead,
        },
        {"data_source": "openai/gsm8k", "response": "so the answer is #### 42", "ground_truth": "42"},
    ]
    config = verl_config(
        "pkg://judges.verl_rewards",
        "compute_score",
        "naive",
        "+reward.custom_reward_function.reward_kwargs.return_dict=true",
    )
    embedded, gsm8k = score_with_verl(smollm2_tokenizer, config, rows)
    assert embedded["reward_score"] == pytest.approx(lexical_similarity("the capital is paris", "paris is the capital"))
    assert (
        embedded["reward_extra_info"]["requests_failed"] == 1 and embedded["reward_extra_info"]["fallback_samples"] == 1
    )
    assert gsm8k["reward_score"] == 1.0 and gsm8k["reward_extra_info"]["requests_failed"] == 0
    assert set(embedded["reward_extra_info"]) == set(gsm8k["reward_extra_info"])  # verl lines them up by key
