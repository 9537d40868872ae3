"""Run the task a composed config names: seed everything, then call ``cfg.task._target_(cfg)``."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from hydra.utils import get_method
from omegaconf import DictConfig

from core.config_errors import ConfigError, check_types

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The groups that each pick what runs; exactly one of them may be chosen.
TASK_GROUPS = ("train", "eval", "service", "check", "launch")


def check_one_task(cfg: DictConfig) -> None:
    """Refuse a config that names two tasks (``train=speaker service=listener``): each task option
    records itself under ``tasks:``, and a service, evaluation, check or launch drops the default
    ``train=grpo``, so exactly one entry is left when the choice is unambiguous."""
    chosen = dict(cfg.get("tasks") or {})
    if len(chosen) != 1:
        named = ", ".join(f"{group}={option}" for group, option in chosen.items()) or "none"
        raise ConfigError(
            f"choose exactly one task with one of {', '.join(g + '=' for g in TASK_GROUPS)} (got {named})"
        )


def run_task(cfg: DictConfig):
    """Seed, then hand the whole config to the task function (no name-based dispatch)."""
    from core.serving.app import ServerSettings

    check_one_task(cfg)
    check_types(cfg, {"server": ServerSettings})
    seed_everything(int(cfg.seed))
    # One INFO line per HTTP request (httpx's default) drowns the run log of a client-heavy task.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    task = get_method(cfg.task._target_)
    return task(cfg)


def job_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (recorded for sweep summaries), or
    none when a task runs from Python with a composed config."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra job: the config was composed in code
        return []
