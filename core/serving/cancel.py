"""Work nobody waits for any more stops early.

Each request the kit serves carries a flag (``request_scope``) that is set when its client
disconnects (a timeout on the client side included). A merged model call (the micro-batcher) is
abandoned when every request in it is. Model loops ask ``abandoned()`` between steps and raise
``Abandoned`` (or stop generating), so a client that gave up frees the model for the next one.
Outside a served request both are always false: in-process callers are never cut short.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_REQUEST: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("request_gone", default=None)
_BATCH: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("batch_gone", default=None)


class Abandoned(Exception):
    """Raised by a model loop that stopped because nobody waits for its result."""


@contextlib.contextmanager
def request_scope() -> Iterator[threading.Event]:
    """The flag of the request served in this context (and the threads it starts)."""
    flag = threading.Event()
    token = _REQUEST.set(flag)
    try:
        yield flag
    finally:
        _REQUEST.reset(token)


def request_flag() -> threading.Event | None:
    """The flag of the request being served here, if any."""
    return _REQUEST.get()


def abandoned() -> bool:
    """Whether nobody waits for the work running here: inside a merged model call, every request
    of the batch is gone; elsewhere, this request's client is."""
    batch = _BATCH.get()
    if batch is not None:
        return batch()
    flag = _REQUEST.get()
    return flag is not None and flag.is_set()


def check_abandoned(what: str = "work") -> None:
    """Raise ``Abandoned`` when ``abandoned()``: the check a model loop makes between steps."""
    if abandoned():
        raise Abandoned(f"{what} stopped: the client is gone")


def call_for(flags: Sequence[threading.Event | None], fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` as a model call on behalf of the requests ``flags`` belong to (run it in the
    worker thread): ``abandoned()`` inside it is true once every one of them is set."""
    live = [f for f in flags if f is not None]
    token = _BATCH.set(lambda: bool(live) and len(live) == len(flags) and all(f.is_set() for f in live))
    try:
        return fn(*args)
    finally:
        _BATCH.reset(token)
