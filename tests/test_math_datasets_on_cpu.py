"""Real data in: verl-format files as verl's GSM8K preprocessing writes them, GSM8K's worked
answers, CHAMP from its wheel, the held-out splits, and math answers compared by math-verify."""

from __future__ import annotations

import json
import re
import threading

import pytest

from conftest import run_in_process
from core.config_errors import ConfigError
from core.rewards.base import RewardSample
from core.rewards.math_verify_reward import MathVerifyReward
from core.training.datasets import champ, from_files, from_hub, synthetic_qa

# Two rows of openai/gsm8k (train) as the hub has them.
GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to "
        "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop sold 1,000 pens on Monday and 234 on Tuesday. How many pens did it sell?",
        "answer": "It sold 1,000 + 234 = <<1000+234=1234>>1,234 pens.\n#### 1,234",
    },
]
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def verl_gsm8k_rows(split: str = "train") -> list[dict]:
    """The rows verl's examples/data_preprocess/gsm8k.py writes, field for field."""
    rows = []
    for idx, example in enumerate(GSM8K):
        solution = re.search("#### (\\-?[0-9\\.\\,]+)", example["answer"]).group(0).split("#### ")[1].replace(",", "")
        rows.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": example["question"] + " " + INSTRUCTION}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": solution},
                "extra_info": {
                    "split": split,
                    "index": idx,
                    "answer": example["answer"],
                    "question": example["question"],
                },
            }
        )
    return rows


@pytest.fixture
def verl_parquet(tmp_path):
    from datasets import Dataset

    path = tmp_path / "train.parquet"
    Dataset.from_list(verl_gsm8k_rows()).to_parquet(str(path))
    return path


def test_a_verl_parquet_file_maps_with_no_keys_and_keeps_its_fields(verl_parquet):
    rows = from_files(str(verl_parquet))
    assert rows["ground_truth"] == [["72"], ["1234"]]
    assert rows[0]["prompt"] == verl_gsm8k_rows()[0]["prompt"]
    assert rows[0]["data_source"] == "openai/gsm8k"
    assert rows[1]["extra_info"]["index"] == 1 and rows[1]["extra_info"]["answer"].endswith("#### 1,234")
    # the nested dict named directly gives its ground truth, never the dict's keys
    assert from_files(str(verl_parquet), answer_key="reward_model")["ground_truth"] == [["72"], ["1234"]]
    worked = from_files(str(verl_parquet), answer_key="extra_info.answer", answer_extract="gsm8k")
    assert worked["ground_truth"] == [["72"], ["1234"]]


def test_rows_that_cannot_be_mapped_name_the_row_and_its_keys(tmp_path, verl_parquet):
    with pytest.raises(ConfigError, match=r"row 0 of train.parquet lacks 'question'.*\['ability', 'data_source'"):
        from_files(str(verl_parquet), prompt_key="question")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "2+2?", "reward_model": {"style": "rule"}}) + "\n")
    with pytest.raises(ConfigError, match=r"row 0 of bad.jsonl: 'reward_model' holds no answer string"):
        from_files(str(bad), answer_key="reward_model")
    with pytest.raises(ConfigError, match="answer extraction must be one of tags, boxed, gsm8k, none"):
        from_files(str(verl_parquet), answer_extract="last_number")


def test_a_hub_style_gsm8k_folder_gets_the_final_number_as_ground_truth(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    rows = from_hub(str(folder), answer_extract="gsm8k", instruction=INSTRUCTION)
    assert rows["ground_truth"] == [["72"], ["1234"]]
    assert rows[0]["prompt"][0]["content"].endswith(INSTRUCTION)


def test_the_gsm8k_config_is_verls_shape_of_the_hub_set():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=gsm8k", "reward=gsm8k"])
    assert (cfg.dataset.name, cfg.dataset.config, cfg.dataset.answer_extract) == ("openai/gsm8k", "main", "gsm8k")
    assert cfg.dataset.instruction == INSTRUCTION and cfg.reward.components.math.fn.extract == "gsm8k"


def test_a_verl_file_trains_as_it_is_and_its_math_is_scored(tmp_path, verl_parquet):
    final = run_in_process(
        tmp_path / "run",
        "experiment=smoke",
        "logger=none",
        "reward=gsm8k",
        "trainer.max_steps=2",
        "trainer.save_strategy=no",
        "dataset=files",
        f"dataset.path={verl_parquet}",
    )
    assert final["steps"] == 2 and "reward/math" in final["components"]
    assert final["failures"]["math"] == {"timeouts": 0, "worker_failures": 0}


def test_math_verify_compares_answers_as_math_from_a_worker_thread():
    reward = MathVerifyReward(extract="boxed")
    samples = [
        RewardSample(r"so \boxed{\frac{1}{2}}", "0.5"),
        RewardSample(r"\boxed{2^{n-1}}", "2^(n-1)"),
        RewardSample(r"\boxed{0.333}", "1/3"),  # math-verify says these differ
        RewardSample(r"\boxed{252}", "C(10, 5), or equivalently 252"),
        RewardSample("no answer at all", "3"),
        RewardSample(r"The answer is \boxed{7}.", ["6", "7"]),
    ]
    out = []
    worker = threading.Thread(target=lambda: out.append(reward(samples)))  # as a reward server calls it
    worker.start()
    worker.join(60)
    assert out == [[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]]
    reward._worker.kill()  # a checker that died is replaced on the next call
    reward._worker.wait()
    assert reward([RewardSample("<answer>3/4</answer>", "0.75")]) == [0.0]  # extract=boxed: the whole text
    assert MathVerifyReward()([RewardSample("<answer>3/4</answer>", "0.75")]) == [1.0]
    assert reward.stats["worker_failures"] == 0 and reward.stats["samples"] == 7


def test_champ_has_a_fixed_held_out_split_and_its_answers_score_as_math():
    train, test = champ(), champ(split="test")
    assert (len(train), len(test)) == (200, 70)
    ids = lambda rows: {r["identifier"] for r in rows["extra_info"]}  # noqa: E731
    assert not ids(train) & ids(test) and ids(test) == ids(champ(split="test"))
    assert {r.split("/")[0] for r in test["data_source"]} == {"champ"}
    reward = MathVerifyReward()
    scores = reward([RewardSample(f"<answer>{r['ground_truth'][0]}</answer>", r["ground_truth"]) for r in test])
    assert scores == [1.0] * len(test)  # every reference matches itself, prose ones ("No") too


def test_the_bundled_qa_test_split_shares_no_question_with_train():
    def questions(rows):
        return {p[-1]["content"] for p in rows["prompt"]}

    train, test = synthetic_qa(300), synthetic_qa(100, split="test")
    assert not questions(train) & questions(test)
    assert {r["data_source"] for r in test} == {
        f"synthetic_qa/{k}" for k in ("add", "mul", "capital", "opposite", "letters")
    }
