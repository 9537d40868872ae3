"""core.training.dist in one process (fallbacks) and in a real two-process gloo group, with the Lewis
accuracy reward (a tiny listener on each rank) sharing its listener results across ranks."""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from core.rewards.base import RewardSample
from core.serving.local_server import ROOT, free_port
from core.training.dist import all_gather_object_fallback, broadcast_object_fallback, get_world_info
from lewis.data import load_games, make_shapes
from lewis.engines import ListenerEngine
from lewis.rewards import ListenerAccuracy


def samples(games: list[dict]) -> list[RewardSample]:
    return [
        RewardSample(
            f"<detailed>{g['description']}</detailed>",
            extra_info={"candidates": g["candidates"], "target_index": g["target_index"]},
        )
        for g in games
    ]


def test_fallbacks_without_a_process_group():
    assert not dist.is_initialized()
    assert get_world_info() == (0, 1)
    assert all_gather_object_fallback({"x": 1}) == [{"x": 1}]
    assert broadcast_object_fallback("mine") == "mine"


def _rank(rank: int, port: int, root: str, tiny_vl: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert get_world_info() == (rank, 2)
        assert all_gather_object_fallback(rank * 10) == [0, 10]
        assert broadcast_object_fallback(f"from {rank}") == "from 0"
        listener = ListenerEngine(tiny_vl, image_roots=[root], batch_size=16)
        reward = ListenerAccuracy(listener, log_path=None)
        games = load_games(root)
        mine, theirs = (games[:2], games[2:4]) if rank == 0 else (games[2:4], games[:2])
        reward(samples(mine))
        asked = listener.model_calls
        reward(samples(theirs))  # the other rank's results arrived with the gather: no model call
        with open(os.path.join(root, f"rank{rank}"), "w") as f:
            f.write(f"{asked} {listener.model_calls} {reward.stats['cache_hits']}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_listener_results(tmp_path):
    from omegaconf import OmegaConf

    root = make_shapes(tmp_path / "shapes", games=8, seed=1)
    tiny_vl = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vlm/tiny_vl.yaml"))
    mp.spawn(_rank, args=(free_port(), str(root), tiny_vl), nprocs=2, join=True)
    for rank in (0, 1):
        assert (root / f"rank{rank}").read_text() == "1 1 2"
