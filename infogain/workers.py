"""InfoGain on several workers: one Ray actor per GPU (or per CPU worker), each with its own models.

``WorkerPool.compute(items)`` has the engine's signature: items are dealt round-robin to the
live workers and computed concurrently. A worker that dies (or exceeds ``call_timeout_s``) is
dropped; its items are retried on the others, and only when none is left do they come back
with per-item errors. The service keeps serving with the workers it has.
"""

from __future__ import annotations

import logging
import os

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class _Worker:
    """A Ray actor holding one ``InfoGainEngine``."""

    def __init__(self, engine_cfg: dict, cpu_threads: int | None):
        import torch
        from hydra.utils import instantiate

        if cpu_threads:
            torch.set_num_threads(cpu_threads)  # CPU workers share the cores instead of oversubscribing them
        self.engine = instantiate(engine_cfg)

    def compute(self, items: list) -> list[dict]:
        return self.engine.compute(items)

    def info(self) -> dict:
        return {
            "device": str(self.engine.generator.device),
            "pid": os.getpid(),
            "random_weights": self.engine.random_weights(),
        }


class WorkerPool:
    """Round-robin over Ray actors.

    Args:
        engine_cfg: the ``InfoGainEngine`` config node each worker instantiates.
        num_workers: actors to start.
        gpus_per_worker: 1 puts each actor on its own GPU; 0 runs CPU workers.
        call_timeout_s: a worker slower than this on one call is treated as dead.
    """

    def __init__(
        self, engine_cfg: DictConfig | dict, num_workers: int, gpus_per_worker: int = 0, call_timeout_s: float = 600.0
    ):
        import ray

        if not ray.is_initialized():
            ray.init(
                num_cpus=max(num_workers, os.cpu_count() or 1),
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=True,
            )
        cfg = OmegaConf.to_container(engine_cfg, resolve=True) if isinstance(engine_cfg, DictConfig) else engine_cfg
        threads = None if gpus_per_worker else max(1, (os.cpu_count() or 1) // num_workers)
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=0)(_Worker)
        self.workers = [actor.remote(cfg, threads) for _ in range(num_workers)]
        self.infos = ray.get([w.info.remote() for w in self.workers])
        self.alive = list(range(num_workers))
        self.gpus_per_worker, self.call_timeout_s = gpus_per_worker, call_timeout_s

    def compute(self, items: list) -> list[dict]:
        """Results in item order; items of a dead worker are retried on the others."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        results: list[dict | None] = [None] * len(items)
        todo = list(range(len(items)))
        while todo:
            if not self.alive:
                for i in todo:
                    results[i] = {"score": None, "error": "no InfoGain worker is alive", "details": None}
                break
            share = {w: todo[k :: len(self.alive)] for k, w in enumerate(self.alive)}
            calls = {w: self.workers[w].compute.remote([items[i] for i in idx]) for w, idx in share.items() if idx}
            todo = []
            for w, ref in calls.items():
                try:
                    for i, result in zip(share[w], ray.get(ref, timeout=self.call_timeout_s), strict=True):
                        results[i] = result
                except (RayActorError, GetTimeoutError) as exc:
                    log.error(
                        "InfoGain worker %d failed (%s); retrying its %d items elsewhere",
                        w,
                        type(exc).__name__,
                        len(share[w]),
                    )
                    self.alive.remove(w)
                    todo.extend(share[w])
        return results

    def health(self) -> dict:
        """Aggregated status of the workers."""
        return {
            "mode": "multi-GPU" if self.gpus_per_worker else "multi-worker",
            "num_workers": len(self.alive),
            "devices": [self.infos[w]["device"] for w in self.alive],
            "random_weights": self.infos[0]["random_weights"],
            "workers": [{**info, "alive": w in self.alive} for w, info in enumerate(self.infos)],
        }


def gpus_for(gpus: int, device: str | None) -> int:
    """GPUs the service uses: ``gpus`` (IG_NUM_GPUS), or one when only a GPU ``device`` (IG_DEVICE)
    is named, as the reference service's environment recipe does.

    >>> gpus_for(0, "cuda:1"), gpus_for(0, None), gpus_for(4, "cuda:0"), gpus_for(0, "cpu")
    (1, 0, 4, 0)
    """
    if gpus == 0 and device and str(device).startswith("cuda"):
        return 1
    return gpus


def _on_gpus(node, gpus: int):
    """``node`` with every model in it set to ``gpus`` (its ``gpus`` keys, at any depth)."""
    if isinstance(node, dict):
        return {k: gpus if k == "gpus" else _on_gpus(v, gpus) for k, v in node.items()}
    if isinstance(node, list):
        return [_on_gpus(v, gpus) for v in node]
    return node


def serving_engine(
    engine: DictConfig | dict,
    gpus: int = 0,
    device: str | None = None,
    model_path: str | None = None,
    workers: int = 0,
    worker_timeout_s: float = 600.0,
):
    """The InfoGain service's engine: the ``engine`` node (``ig=local``) built in this process, or a
    ``WorkerPool`` of it when ``workers`` (0: one per GPU) is above one.

    ``model_path`` (IG_MODEL_PATH) replaces the generator's weights; ``device`` (IG_DEVICE, e.g.
    ``cuda:1``) picks the GPU in single-GPU mode, and alone means one GPU.
    """
    from hydra.utils import instantiate

    node = OmegaConf.to_container(engine, resolve=True) if isinstance(engine, DictConfig) else dict(engine)
    gpus = gpus_for(int(gpus), device)
    node = _on_gpus(node, gpus)
    if model_path:
        node["generator"]["model"]["name_or_path"] = model_path
    workers = int(workers) or max(1, gpus)
    log.info("infogain: %d worker(s), pid %d", workers, os.getpid())
    if workers > 1:
        return WorkerPool(node, workers, gpus_per_worker=1 if gpus > 0 else 0, call_timeout_s=float(worker_timeout_s))
    if device and gpus > 0:
        import torch

        torch.cuda.set_device(device)
    return instantiate(node)
