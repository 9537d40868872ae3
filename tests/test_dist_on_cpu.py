"""core.dist in one process (fallbacks) and in a real two-process gloo group, with the Lewis
accuracy reward sharing its listener cache across ranks."""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from core.dist import all_gather_object_fallback, broadcast_object_fallback, get_world_info
from core.local_server import free_port
from core.rewards import RewardSample
from lewis.rewards import ListenerAccuracy


class CountingListener:
    """A scripted listener (the partner service's contract): picks candidate 0, counts items asked."""

    def __init__(self):
        self.items = 0

    def batch_score(self, batch):
        self.items += len(batch)
        return {"results": [{"yes_probabilities": [0.9, 0.1], "predicted_index": 0} for _ in batch], "took": 0.0}


def samples(descriptions: list[str]) -> list[RewardSample]:
    game = {"candidates": ["a.png", "b.png"], "target_index": 0}
    return [RewardSample(f"<detailed>{d}</detailed>", extra_info=game) for d in descriptions]


def test_fallbacks_without_a_process_group():
    assert not dist.is_initialized()
    assert get_world_info() == (0, 1)
    assert all_gather_object_fallback({"x": 1}) == [{"x": 1}]
    assert broadcast_object_fallback("mine") == "mine"


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert get_world_info() == (rank, 2)
        assert all_gather_object_fallback(rank * 10) == [0, 10]
        assert broadcast_object_fallback(f"from {rank}") == "from 0"
        listener = CountingListener()
        reward = ListenerAccuracy(listener, log_path=None)
        mine, theirs = ["red circle", "blue square"], ["green triangle", "two small squares"]
        if rank == 1:
            mine, theirs = theirs, mine
        assert reward(samples(mine)) == [1.0, 1.0]
        asked = listener.items
        assert reward(samples(theirs)) == [1.0, 1.0]  # the other rank's results arrived with the gather
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
            f.write(f"{asked} {listener.items}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_listener_results(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "2 2"
