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


# The failures recorded by the scoring call in progress on this thread (see ``failure_scope``).
_FAILURES: contextvars.ContextVar[Failures | None] = contextvars.ContextVar("reward_failures", default=None)


@dataclass
class Failures:
    """What a scoring call could not do: ``counts`` by failure key, and ``samples``, the index of
    each sample a reward could not score in that call, with the reason and whether the score it
    returned for it is a fallback (lexical similarity, the exact-match part alone) rather than 0."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: dict[int, tuple[str, bool]] = field(default_factory=dict)


def count_failure(stats: dict, key: str, n: int = 1) -> None:
    """Add ``n`` to a reward's ``stats[key]`` and to the enclosing ``failure_scope``, if any."""
    stats[key] = stats.get(key, 0) + n
    scope = _FAILURES.get()
    if scope is not None:
        scope.counts[key] = scope.counts.get(key, 0) + n


def mark_unscored(samples: Sequence[int], reason: str, fell_back: bool = False) -> None:
    """Tell the enclosing ``failure_scope`` (the reward mix) that the samples at these indices of
    the batch being scored could not be scored, why, and whether the score returned for them is a
    fallback (``fell_back``) or a placeholder 0.0."""
    scope = _FAILURES.get()
    if scope is not None:
        for i in samples:
            scope.samples[i] = (reason, fell_back)


@contextlib.contextmanager
def failure_scope() -> Iterator[Failures]:
    """The failures recorded (``count_failure``) by the scoring done inside this block, on this
    thread only: concurrent calls from verl's thread pool each see their own. A scope opened
    inside another adds its counts to the outer one when it closes (its sample indices refer to
    its own batch, so they stay its own)."""
    outer = _FAILURES.get()
    scope = Failures()
    token = _FAILURES.set(scope)
    try:
        yield scope
    finally:
        _FAILURES.reset(token)
        if outer is not None:
            for key, n in scope.counts.items():
                outer.counts[key] = outer.counts.get(key, 0) + n


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
    ``failure_advice``: ``{key: what to do when it is non-zero}``; it says which samples it could
    not score with ``mark_unscored``, so the mix reports them and applies its ``on_failure`` rule.
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
        samples = verl_samples([data_source or ""], [solution_str or ""], [ground_truth], [extra_info], **reward_kwargs)
        with failure_scope() as failed:
            score = float(reward(samples)[0])
        if not return_dict:
            return score
        return {"score": score, **{key: failed.counts.get(key, 0) for key in failure_keys}}

    return verl_entry(single, verl_batched(reward), f"{reward.name}_compute_score")


def verl_async(compute_score: Callable[..., Any]) -> Callable[..., Any]:
    """An ``async`` twin of a verl entry point (same arguments and result), run in a worker thread
    so verl's event loop keeps scoring other samples meanwhile."""

    @functools.wraps(compute_score)
    async def compute_score_async(*args, **kwargs):
        return await asyncio.to_thread(compute_score, *args, **kwargs)

    compute_score_async.__name__ = f"{compute_score.__name__}_async"
    return compute_score_async


def verl_samples(data_sources, solution_strs, ground_truths, extra_infos=None, **reward_kwargs) -> list[RewardSample]:
    """The samples of one call of verl's batched form (``reward_kwargs`` as in ``verl_compute_score``)."""
    n = len(solution_strs)
    return [
        RewardSample(
            solution_strs[i],
            ground_truths[i] if ground_truths is not None else None,
            "",
            {**reward_kwargs, **((extra_infos[i] if extra_infos is not None else None) or {})},
            data_sources[i] if data_sources is not None else "",
        )
        for i in range(n)
    ]


def verl_batched(reward: RewardFunction) -> Callable[..., list[float]]:
    """verl's batched form: ``compute_score(data_sources, solution_strs, ground_truths, extra_infos=None,
    **reward_kwargs)`` (``reward_kwargs`` as in ``verl_compute_score``)."""

    def compute_score_batched(data_sources, solution_strs, ground_truths, extra_infos=None, **reward_kwargs):
        samples = verl_samples(data_sources, solution_strs, ground_truths, extra_infos, **reward_kwargs)
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


def trl_samples(prompts=None, completions=None, **kwargs) -> list[RewardSample]:
    """The samples of one call of a TRL reward function: the ground truth comes from the first
    dataset column named ``ground_truth``, ``solution``, ``answer`` or ``answers``, or from verl's
    ``reward_model`` column (``{"ground_truth": ...}`` per row); ``extra_info`` (dicts) and
    ``data_source`` columns are passed through."""
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
    return [
        RewardSample(as_text(c), truths[i], as_text(prompts[i]), dict(infos[i] or {}), str(sources[i] or ""))
        for i, c in enumerate(completions)
    ]


def trl_reward_func(reward: RewardFunction, name: str | None = None) -> Callable[..., list[float]]:
    """TRL's ``reward_func(prompts, completions, **kwargs)`` over one reward (samples as ``trl_samples`` reads them)."""

    def reward_func(prompts=None, completions=None, **kwargs) -> list[float]:
        return [float(s) for s in reward(trl_samples(prompts, completions, **kwargs))]

    reward_func.__name__ = name or reward.name  # TRL logs each reward under its function's name
    return reward_func
