"""verl's own reward path, as its trainer runs it: its ``ppo_trainer`` config with a user's
overrides, its loader (``load_reward_manager``), and real ``DataProto`` batches."""

from __future__ import annotations

import os

import numpy as np
import torch
import verl  # installed by the README's test command (tests/requirements-no-deps.txt)
from hydra import compose, initialize_config_dir
from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager

VERL_CONF = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def verl_config(path: str, name: str, manager: str = "naive", *extra: str):
    """verl's own ppo_trainer config with the overrides a user pastes."""
    with initialize_config_dir(VERL_CONF, version_base=None):
        return compose(
            "ppo_trainer",
            overrides=[
                f"reward.custom_reward_function.path={path}",
                f"reward.custom_reward_function.name={name}",
                f"reward.reward_manager.name={manager}",
                *extra,
            ],
        )


def batch(tok, rows: list[dict]) -> DataProto:
    """A rollout batch as verl's trainer hands it to the reward loop: left-padded prompts,
    right-padded responses, one attention mask, and the dataset's non-tensor fields."""
    prompts = [tok.encode(r.get("prompt", "question"), add_special_tokens=False) for r in rows]
    responses = [tok.encode(r["response"], add_special_tokens=False) for r in rows]
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor(
        [
            [0] * (p_len - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (r_len - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask},
        non_tensors={
            "data_source": np.array([r["data_source"] for r in rows], dtype=object),
            "reward_model": np.array([{"ground_truth": r["ground_truth"]} for r in rows], dtype=object),
            "extra_info": np.array([dict(r.get("extra_info", {})) for r in rows], dtype=object),
        },
    )


def score_with_verl(tok, config, rows: list[dict]) -> list[dict]:
    """What verl's reward loop does with each sample: ``run_single`` on its manager's event loop."""
    manager = load_reward_manager(config, tok)
    data = batch(tok, rows)
    return [manager.loop.run_until_complete(manager.run_single(data[i : i + 1])) for i in range(len(data))]
