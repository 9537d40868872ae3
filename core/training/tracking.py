"""Experiment trackers: wandb (offline by default) or none. Both have ``log`` and ``finish``."""

from __future__ import annotations

from pathlib import Path


class NullTracker:
    """Tracks nothing."""

    def __init__(self, run_dir: str | Path | None = None, run_config: dict | None = None):
        self.run_dir = run_dir

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Ignore ``metrics``."""

    def summary(self, values: dict) -> None:
        """Ignore ``values``."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbTracker:
    """A wandb run written under ``dir``, else ``run_dir`` (offline unless ``mode=online``)."""

    def __init__(
        self,
        project: str,
        mode: str = "offline",
        name: str | None = None,
        tags=(),
        dir: str | Path | None = None,  # noqa: A002 - wandb's own name for it
        run_dir: str | Path | None = None,
        run_config: dict | None = None,
    ):
        import wandb

        self.run = wandb.init(
            project=project,
            mode=mode,
            name=name,
            tags=list(tags or []),
            config=run_config,
            dir=str(dir or run_dir) if (dir or run_dir) else None,
            reinit="finish_previous",
        )

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Log scalar metrics."""
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        """Set the run's summary values."""
        self.run.summary.update(values)

    def finish(self) -> None:
        """Close the run (and flush the offline files)."""
        self.run.finish()


def open_tracker(logger_cfg, run_dir: str | Path, cfg) -> NullTracker | WandbTracker:
    """The tracker ``logger_cfg`` names, given the resolved run config as plain data.

    Not ``hydra.utils.instantiate``: that would try to instantiate the ``_target_`` nodes
    inside the run config we hand to the tracker.
    """
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    params = {k: v for k, v in OmegaConf.to_container(logger_cfg, resolve=True).items() if k != "_target_"}
    return get_class(logger_cfg._target_)(
        **params, run_dir=run_dir, run_config=OmegaConf.to_container(cfg, resolve=True)
    )
