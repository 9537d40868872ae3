"""Merge concurrent requests into one model call.

Servers hold one model and answer many clients. Calling the model once per request wastes
the batch dimension, so each request ``submit``s its items and awaits them; a single worker
collects whatever is pending (up to ``max_batch_size`` items, waiting at most ``max_wait_ms``
for more), runs the blocking batch function once in a thread, and hands each request its slice.
Requests are merged only when their ``key`` is equal (e.g. the same sampling parameters).
A request whose client left before its batch started is dropped; a model call whose requests
have all left sees ``core.serving.cancel.abandoned()`` turn true, so its loop can stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from core.serving.cancel import call_for, request_flag

log = logging.getLogger(__name__)


@dataclass
class _Job:
    items: Sequence[Any]
    future: asyncio.Future
    # set when the requesting client is gone (core.serving.cancel); None outside a served request
    gone: Any = None

    @property
    def abandoned(self) -> bool:
        return self.future.done() or (self.gone is not None and self.gone.is_set())


class MicroBatcher:
    """Collects ``submit(items, key)`` calls and runs ``fn(all_items, key) -> results`` once per batch.

    ``fn`` must return one result per item, in order. ``on_batch(n_items)`` is called after each
    model call (for metrics). An exception from ``fn`` is given to every request of that batch.
    """

    def __init__(
        self,
        fn: Callable[[list, Hashable], Sequence[Any]],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.calls = 0
        self.items = 0
        self._queues: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._event: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, items: Sequence[Any], key: Hashable = None) -> list:
        """Queue ``items`` and wait for their results (same order, same length)."""
        if not items:
            return []
        if self._worker is None or self._worker.done():
            self._event = asyncio.Event()
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Job(list(items), future, request_flag()))
        self._event.set()
        return await future

    def pending(self) -> int:
        """Items waiting for a model call."""
        return sum(len(job.items) for queue in self._queues.values() for job in queue)

    async def close(self) -> None:
        """Stop the worker; requests still queued get a ``RuntimeError``."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("server is shutting down"))
        self._queues.clear()

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            while self._queues:
                key, queue = next(iter(self._queues.items()))
                await self._wait_for_more(queue)
                jobs = self._take(queue)
                if not queue:
                    del self._queues[key]
                await self._execute(jobs, key)

    async def _wait_for_more(self, queue: deque[_Job]) -> None:
        """Give concurrent callers a few milliseconds to join, unless the batch is already full."""
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while sum(len(j.items) for j in queue) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self, queue: deque[_Job]) -> list[_Job]:
        for job in [j for j in queue if j.abandoned]:  # nobody waits for these: never computed
            queue.remove(job)
            if not job.future.done():
                job.future.cancel()
        if not queue:
            return []
        jobs = [queue.popleft()]  # always at least one job, even one larger than the batch size
        size = len(jobs[0].items)
        while queue and size + len(queue[0].items) <= self.max_batch_size:
            size += len(queue[0].items)
            jobs.append(queue.popleft())
        return jobs

    async def _execute(self, jobs: list[_Job], key: Hashable) -> None:
        if not jobs:
            return
        flat = [item for job in jobs for item in job.items]
        try:
            results = await asyncio.to_thread(call_for, [job.gone for job in jobs], self.fn, flat, key)
            if len(results) != len(flat):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(flat)} items")
        except Exception as exc:  # noqa: BLE001 - handed to the callers, who turn it into an HTTP error
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.calls += 1
        self.items += len(flat)
        if self.on_batch is not None:
            self.on_batch(len(flat))
        start = 0
        for job in jobs:
            end = start + len(job.items)
            if not job.future.done():
                job.future.set_result(list(results[start:end]))
            start = end
