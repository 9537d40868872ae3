"""Iteration-level batching for the generation server (as vLLM and TGI schedule).

A whole-batch server makes a request that arrives while a batch decodes wait until the batch's
longest row ends. Here one worker thread runs the engine's decode loop step by step; between two
steps, waiting requests join the running batch (up to the rows and token positions it may hold)
and rows that ended leave it, so a request starts at the next step and is answered as soon as
its own rows end. Requests with different sampling settings share the batch (each row carries
its own), and a seeded request draws from its own generator.

When nothing is decoding, the first request to arrive waits up to ``max_wait_ms`` for others to
share its prefill. On a CPU (and on a GPU at small batches) a forward costs about the same for
one row as for several, since reading the weights dominates; clients that send many short
requests at once (lm-eval's loglikelihood requests, a reward's scoring calls) otherwise reach an
idle worker a few milliseconds apart and split into small prefills.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.models.generation import Completion, SamplingParams
from core.models.generation_engine import GenerationEngine
from core.serving.cancel import Abandoned, request_flag

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    params: SamplingParams
    stop: Sequence[str] | None
    prompts: int
    gone: threading.Event | None
    arrived: float = field(default_factory=time.monotonic)
    rows: list = field(default_factory=list)
    open_rows: int = 0

    @property
    def abandoned(self) -> bool:
        return self.future.done() or (self.gone is not None and self.gone.is_set())

    def answer(self, result=None, error: BaseException | None = None) -> None:
        def settle():
            if self.future.done():
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        self.loop.call_soon_threadsafe(settle)


class GenerationScheduler:
    """Runs ``engine``'s decode loop for served requests, admitting them between steps.

    Args:
        engine: the model.
        max_rows: rows decoded together at most (the app's ``max_batch_size``).
        on_admit: called with the number of rows each time waiting rows join the batch
            (one prefill: the server counts it as a model call).
        max_wait_ms: how long a request that finds nothing decoding waits for others to join
            its prefill (0: none).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        max_rows: int,
        on_admit: Callable[[int], None] | None = None,
        max_wait_ms: float = 0.0,
    ):
        self.engine = engine
        self.loop = engine.decode_loop(max_rows)
        self.on_admit = on_admit
        self.max_wait = max_wait_ms / 1000
        self.steps = 0
        self._waiting: deque = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    async def submit(
        self, ids: Sequence[list[int]], params: SamplingParams, stop: Sequence[str] | None
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt (token ids), cut at the first of ``stop``."""
        running = asyncio.get_running_loop()
        request = _Request(running, running.create_future(), params, stop, len(ids), request_flag())
        request.rows = self.engine.rows(ids, params, stop, owner=request)
        request.open_rows = len(request.rows)
        with self._wake:
            if self._closed:
                raise RuntimeError("server is shutting down")
            self._waiting.extend(request.rows)
            self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="generation-scheduler", daemon=True)
                self._thread.start()
        return await request.future

    def pending(self) -> int:
        """Rows waiting to join the batch."""
        return len(self._waiting)

    async def close(self) -> None:
        """Stop the worker; requests still waiting or decoding get a ``RuntimeError``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self.loop.batch:
                    self._wake.wait()
                if self._closed:
                    break
                if not self.loop.batch.rows:
                    self._gather()
                self._forget_abandoned()
                ready = deque(self.loop.admit(self._waiting))
            if not ready and not self.loop.batch:
                continue
            joining = list(ready)
            try:
                with self.engine.lock:
                    ended = self.loop.step(ready)
            except Exception as exc:  # noqa: BLE001 - handed to every request in the batch
                log.exception("decode step failed")
                self._fail({r.owner for r in self.loop.batch.rows + joining}, exc)
                self.loop.batch.keep([])
                continue
            self.steps += 1
            if self.on_admit is not None and joining:
                self.on_admit(len(joining))
            for row in ended:
                self._row_ended(row)
        self._fail(
            {r.owner for r in self._waiting} | {r.owner for r in self.loop.batch.rows},
            RuntimeError("server is shutting down"),
        )

    def _gather(self) -> None:
        # called holding self._wake with nothing decoding: wait until the first waiting request
        # has waited max_wait, or the batch is full (each submit notifies)
        deadline = self._waiting[0].owner.arrived + self.max_wait
        while not self._closed and len(self._waiting) < self.loop.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(left)

    def _forget_abandoned(self) -> None:
        # rows nobody waits for leave the queue and the batch; their request gets Abandoned
        gone = {r.owner for r in self._waiting if r.owner.abandoned}
        gone |= {r.owner for r in self.loop.drop(lambda r: r.owner.abandoned)}
        if gone:
            self._waiting = deque(r for r in self._waiting if r.owner not in gone)
            self._fail(gone, Abandoned("generation stopped: the client is gone"))

    def _row_ended(self, row) -> None:
        request: _Request = row.owner
        request.open_rows -= 1
        if request.open_rows:
            return
        try:
            completions = self.engine.completions(request.rows, request.prompts, request.params, request.stop)
        except Exception as exc:  # noqa: BLE001 - the request's error, not the worker's
            request.answer(error=exc)
            return
        request.answer(completions)

    @staticmethod
    def _fail(requests, error: BaseException) -> None:
        for request in requests:
            request.answer(error=error)
