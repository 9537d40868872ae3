"""torch.distributed helpers that also work in a single process (the Lewis reference scripts' ``dist_helpers``).

Without an initialised process group (one CPU process, tests, a failed NCCL setup) they fall back
to the single-process answer instead of raising.
"""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

log = logging.getLogger(__name__)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed (``RANK``/``WORLD_SIZE`` are read if set)."""
    if _active():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def all_gather_object_fallback(obj) -> list:
    """Every rank's ``obj``, in rank order; ``[obj]`` without a process group or if gathering fails."""
    if not _active() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, obj)
    except RuntimeError as exc:  # e.g. a backend without object collectives
        log.warning("all_gather_object failed (%s); using this rank's data only", exc)
        return [obj]
    return gathered


def broadcast_object_fallback(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself without a process group."""
    if not _active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=src)
    except RuntimeError as exc:
        log.warning("broadcast_object_list failed (%s); keeping this rank's value", exc)
        return obj
    return box[0]
