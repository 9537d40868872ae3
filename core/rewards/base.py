"""One reward protocol, a weighted mix, and adapters to the ways verl and TRL call reward functions.

A reward function here is any object with ``name`` and ``__call__(samples) -> list[float]``
scoring a batch of ``RewardSample``s. The adapters turn one into

* verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float``
  (and the batched keyword form ``compute_score(data_sources=..., solution_strs=..., ...)``
  that verl's batch reward manager uses), and
* TRL's ``reward_func(prompts, completions, **dataset_columns) -> list[float]``.

``verl_async`` gives any of verl's forms an ``async`` twin, for verl's reward loop to await.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

GROUND_TRUTH_KEYS = ("ground_truth", "solution", "answer", "answers")
# Keys of a dict ground truth that hold the references (verl's Search-R1 data: {"target": array([...])}).
NESTED_GROUND_TRUTH_KEYS = ("target", *GROUND_TRUTH_KEYS)


# The failure counts of the scoring call in progress on this thread (see ``failure_scope``).
_FAILURES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reward_failures", default=None)


def count_failure(stats: dict, key: str, n: int = 1) -> None:
    """Add ``n`` to a reward's ``stats[key]`` and to the enclosing ``failure_scope``, if any."""
    stats[key] = stats.get(key, 0) + n
    scope = _FAILURES.get()
    if scope is not None:
        scope[key] = scope.get(key, 0) + n


@contextlib.contextmanager
def failure_scope() -> Iterator[dict]:
    """The failures counted (``count_failure``) by the scoring done inside this block, on this
    thread only: concurrent calls from verl's thread pool each see their own."""
    scope: dict = {}
    token = _FAILURES.set(scope)
    try:
        yield scope
    finally:
        _FAILURES.reset(token)


@dataclass
class RewardSample:
    """One completion to score, with what it is scored against."""

    completion: str
    ground_truth: Any = None  # a string or a list of acceptable strings
    prompt: str = ""
    extra_info: dict = field(default_factory=dict)
    data_source: str = ""


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch of samples; must not raise for a service failure (score 0.0 or fall back).

    A reward that can fail quietly also keeps ``stats`` (counters), names the ones that count
    failures in ``failure_keys`` (trainers log them, evaluation reports them) and may give
    ``failure_advice``: ``{key: what to do when it is non-zero}``.
    """

    name: str

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]: ...


def references(ground_truth: Any) -> list[str]:
    """The acceptable reference strings of a ground truth: a string, a list or array of them, or
    a dict holding them under ``target``, ``ground_truth``, ``solution``, ``answer`` or ``answers``
    (the shapes verl datasets use).

    >>> references("Paris")
    ['Paris']
    >>> references({"target": ["Paris", "City of Light"]})
    ['Paris', 'City of Light']
    >>> references([42, ["4", "four"]])
    ['42', '4', 'four']
    """
    if ground_truth is None:
        return []
    if isinstance(ground_truth, str):
        return [ground_truth]
    if isinstance(ground_truth, Mapping):
        key = next((k for k in NESTED_GROUND_TRUTH_KEYS if ground_truth.get(k) is not None), None)
        return references(ground_truth[key]) if key else []
    if hasattr(ground_truth, "tolist"):  # numpy arrays and scalars, as parquet-backed datasets give them
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, list | tuple):
        return [ref for item in ground_truth for ref in references(item)]
    return [str(ground_truth)]


@dataclass
class MixScores:
    """Weighted total per sample, and each component's raw scores."""

    total: list[float]
    components: dict[str, list[float]]


class RewardMix:
    """A weighted sum of reward functions: ``total = Σ weight_i · fn_i(samples)``.

    Args:
        components: ``{name: {"fn": RewardFunction, "weight": float}}`` (the ``reward:`` config).
    """

    def __init__(self, components: Mapping[str, Mapping]):
        if not components:
            raise ValueError("a reward mix needs at least one component")
        self.components = {name: (c["fn"], float(c.get("weight", 1.0))) for name, c in components.items()}

    def score(self, samples: Sequence[RewardSample]) -> MixScores:
        """Every component's scores and the weighted total."""
        parts = {name: [float(s) for s in fn(samples)] for name, (fn, _w) in self.components.items()}
        total = [sum(w * parts[name][i] for name, (_fn, w) in self.components.items()) for i in range(len(samples))]
        return MixScores(total, parts)

    def stats(self) -> dict[str, dict]:
        """The counters of each component that keeps them."""
        return {name: dict(getattr(fn, "stats", {})) for name, (fn, _w) in self.components.items()}

    def failures(self) -> dict[str, dict[str, int]]:
        """Each component's failure counters (its ``failure_keys``), for components that have any."""
        out = {}
        for name, (fn, _w) in self.components.items():
            stats = getattr(fn, "stats", {})
            keys = [k for k in getattr(fn, "failure_keys", ()) if k in stats]
            if keys:
                out[name] = {k: stats[k] for k in keys}
        return out

    def advice(self) -> list[str]:
        """What the components advise for the failures they counted."""
        out = []
        for fn, _w in self.components.values():
            stats = getattr(fn, "stats", {})
            out.extend(text for key, text in getattr(fn, "failure_advice", {}).items() if stats.get(key))
        return out


def verl_entry(single: Callable[..., float], batched: Callable[..., list[float]], name: str) -> Callable:
    """One function with both of verl's calling forms: ``f(data_source, solution_str,
    ground_truth, extra_info=None, **kwargs)`` goes to ``single``, ``f(data_sources=...,
    solution_strs=..., ground_truths=..., extra_infos=..., **kwargs)`` to ``batched``."""

    def compute_score(
        data_source=None,
        solution_str=None,
        ground_truth=None,
        extra_info=None,
        *,
        data_sources=None,
        solution_strs=None,
        ground_truths=None,
        extra_infos=None,
        **reward_kwargs,
    ):
        if solution_strs is not None:
            return batched(data_sources, solution_strs, ground_truths, extra_infos, **reward_kwargs)
        return single(data_source, solution_str, ground_truth, extra_info, **reward_kwargs)

    compute_score.__name__ = name
    return compute_score


def verl_compute_score(reward: RewardFunction) -> Callable[..., float | list[float]]:
    """verl's ``compute_score`` over ``reward``: single-sample positional form, or the batched keyword form.

    Other keyword arguments (verl's ``custom_reward_function.reward_kwargs``) set the reward's
    per-sample options for every sample, as ``extra_info`` would; a sample's own ``extra_info`` wins.
    ``return_dict=True`` makes the single form return ``{"score", <each failure key>: count}``,
    which verl's reward loop records in ``reward_extra_info`` (so failures show in its logs).
    """
    failure_keys = tuple(getattr(reward, "failure_keys", ()))

    def single(data_source, solution_str, ground_truth, extra_info=None, return_dict=False, **reward_kwargs):
        info = {**reward_kwargs, **(extra_info or {})}
        with failure_scope() as failed:
            score = float(reward([RewardSample(solution_str or "", ground_truth, "", info, data_source or "")])[0])
        if not return_dict:
            return score
        return {"score": score, **{key: failed.get(key, 0) for key in failure_keys}}

    return verl_entry(single, verl_batched(reward), f"{reward.name}_compute_score")


def verl_async(compute_score: Callable[..., Any]) -> Callable[..., Any]:
    """An ``async`` twin of a verl entry point (same arguments and result), run in a worker thread
    so verl's event loop keeps scoring other samples meanwhile."""

    @functools.wraps(compute_score)
    async def compute_score_async(*args, **kwargs):
        return await asyncio.to_thread(compute_score, *args, **kwargs)

    compute_score_async.__name__ = f"{compute_score.__name__}_async"
    return compute_score_async


def verl_batched(reward: RewardFunction) -> Callable[..., list[float]]:
    """verl's batched form: ``compute_score(data_sources, solution_strs, ground_truths, extra_infos=None,
    **reward_kwargs)`` (``reward_kwargs`` as in ``verl_compute_score``)."""

    def compute_score_batched(data_sources, solution_strs, ground_truths, extra_infos=None, **reward_kwargs):
        n = len(solution_strs)
        samples = [
            RewardSample(
                solution_strs[i],
                ground_truths[i] if ground_truths is not None else None,
                "",
                {**reward_kwargs, **((extra_infos[i] if extra_infos is not None else None) or {})},
                data_sources[i] if data_sources is not None else "",
            )
            for i in range(n)
        ]
        return [float(s) for s in reward(samples)]

    compute_score_batched.__name__ = f"{reward.name}_compute_score_batched"
    return compute_score_batched


def as_text(item: Any) -> str:
    """A completion or prompt as text: TRL passes strings, or message lists for chat datasets."""
    if isinstance(item, str):
        return item
    if isinstance(item, Sequence) and item and isinstance(item[-1], Mapping):
        content = item[-1].get("content", "")
        if isinstance(content, list):  # multimodal content: text parts, "<image>" for each image
            return "".join(c.get("text") or "" if c.get("type") == "text" else f"<{c.get('type')}>" for c in content)
        return str(content)
    return str(item)


def trl_reward_func(reward: RewardFunction, name: str | None = None) -> Callable[..., list[float]]:
    """TRL's ``reward_func(prompts, completions, **kwargs)``; the ground truth comes from the
    first dataset column named ``ground_truth``, ``solution``, ``answer`` or ``answers``, or from
    verl's ``reward_model`` column (``{"ground_truth": ...}`` per row); ``extra_info`` (dicts) and
    ``data_source`` columns are passed through."""

    def reward_func(prompts=None, completions=None, **kwargs) -> list[float]:
        completions = list(completions or [])
        n = len(completions)
        key = next((k for k in GROUND_TRUTH_KEYS if kwargs.get(k) is not None), None)
        if key:
            truths = kwargs[key]
        elif kwargs.get("reward_model") is not None:
            truths = [(row or {}).get("ground_truth") for row in kwargs["reward_model"]]
        else:
            truths = [None] * n
        infos = kwargs.get("extra_info") or [None] * n
        sources = kwargs.get("data_source") or [""] * n
        prompts = prompts or [""] * n
        samples = [
            RewardSample(as_text(c), truths[i], as_text(prompts[i]), dict(infos[i] or {}), str(sources[i] or ""))
            for i, c in enumerate(completions)
        ]
        return [float(s) for s in reward(samples)]

    reward_func.__name__ = name or reward.name  # TRL logs each reward under its function's name
    return reward_func
