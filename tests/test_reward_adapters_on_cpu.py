"""The reward adapters with the data shapes verl and TRL really pass: verl's dict and array ground
truths, and TRL's GRPOTrainer on a verl-style dataset (``reward_model`` and ``data_source`` columns)."""

from __future__ import annotations

import numpy as np
import pytest

from core.rewards.base import RewardSample, references, trl_reward_func, verl_compute_score
from core.rewards.builtin import ExactMatch


class Recording:
    """A reward that remembers the samples it was given and scores exact matches."""

    name = "recording"

    def __init__(self):
        self.seen: list[RewardSample] = []

    def __call__(self, samples):
        self.seen.extend(samples)
        return ExactMatch()(samples)


def test_verl_search_r1_ground_truth_scores_a_right_answer():
    compute_score = verl_compute_score(ExactMatch())
    truth = {"target": np.array(["Paris", "City of Light"])}  # as verl's Search-R1 parquet rows hold it
    assert references(truth) == ["Paris", "City of Light"]
    assert compute_score("nq", "<answer>Paris</answer>", truth) == 1.0
    assert compute_score("nq", "<answer>Lyon</answer>", truth) == 0.0
    assert compute_score("gsm8k", "<answer>42</answer>", np.array(["42"])) == 1.0
    assert references({"unrelated": "x"}) == []


def test_trl_grpo_trainer_reads_a_verl_style_dataset(tmp_path, tiny_model_cfg):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from core.models.loading import build_causal_lm, device_for, load_tokenizer

    rows = [
        {
            "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
            "reward_model": {"ground_truth": "4", "style": "rule"},
            "data_source": "verl/arith",
        }
    ] * 4
    tokenizer = load_tokenizer(tiny_model_cfg)
    model = build_causal_lm(tiny_model_cfg, tokenizer, device_for(0))
    reward = Recording()
    args = GRPOConfig(
        output_dir=str(tmp_path),
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward_func(reward)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    assert reward.seen, "TRL never called the reward"
    assert {references(s.ground_truth)[0] for s in reward.seen} == {"4"}
    assert {s.data_source for s in reward.seen} == {"verl/arith"}
    assert all(s.prompt == "What is 2 plus 2?" for s in reward.seen)


@pytest.mark.parametrize("column", ["ground_truth", "solution", "answer"])
def test_trl_style_columns_give_the_ground_truth(column):
    reward = Recording()
    scores = trl_reward_func(reward)(prompts=["q", "q"], completions=["4", "5"], **{column: ["4", "4"]})
    assert scores == [1.0, 0.0]


def test_verl_reward_kwargs_set_every_samples_options(tmp_path):
    from omegaconf import OmegaConf

    from conftest import ROOT, free_port
    from core.models.embedding_client import EmbeddingClient
    from core.models.embedding_engine import EmbeddingEngine
    from judges.embedding_reward import EmbeddingSimilarityReward

    engine = EmbeddingEngine(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/minilm.yaml")))
    compute_score = verl_compute_score(EmbeddingSimilarityReward(engine))
    long = "Paris, the capital and largest city of France, on the Seine"
    plain = compute_score("qa", long, "Paris")
    assert compute_score("qa", long, "Paris", None, length_penalty="ratio") < plain  # reward_kwargs reach it
    assert compute_score("qa", long, "Paris", {"length_penalty": "none"}, length_penalty="ratio") == plain
    dead = EmbeddingClient(f"http://127.0.0.1:{free_port()}", timeout=1, max_retries=0)
    down = verl_compute_score(EmbeddingSimilarityReward(dead))
    assert down("qa", "Paris!", "Paris") > 0.5  # lexical fallback by default
    assert down("qa", "Paris!", "Paris", None, fallback="zero") == 0.0
    assert down(data_sources=["qa"], solution_strs=["Paris!"], ground_truths=["Paris"], fallback="zero") == [0.0]
