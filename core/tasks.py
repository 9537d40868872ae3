"""Run the task a composed config names: seed everything, then call ``cfg.task._target_(cfg)``."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from hydra.utils import get_method
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_task(cfg: DictConfig):
    """Seed, then hand the whole config to the task function (no name-based dispatch)."""
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
