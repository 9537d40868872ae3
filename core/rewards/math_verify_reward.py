"""Math answers compared as math, by Hugging Face's ``math-verify``: ``\\frac{1}{2}`` = ``0.5`` =
``1/2``, ``2^(n-1)`` = ``2^{n-1}``, sets and intervals in any order; ``1/3`` and ``0.333`` differ,
because the checker says they do (it compares numbers to 6 decimal places after rounding). An
answer equal to a reference as text (up to case and spacing) matches first: prose answers such
as "No integer solutions", and expressions math-verify fails to read, would never match otherwise.

math-verify bounds each parse and comparison with ``signal.alarm``, which works only in a
process's main thread, and reward servers score in worker threads. So, as verl does, the
checks run in a worker process of their own (``python -m core.rewards.math_verify_reward``, one per
reward, started on first use; not multiprocessing, which would re-import the caller's script), a
whole batch per round trip over its pipes. A pathological expression costs its own timeout and
scores 0.0, counted; a worker that dies or hangs is replaced and its batch scores 0.0, counted.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import threading
from collections.abc import Sequence

from core.rewards.answers import check_extraction, extract_answer
from core.rewards.base import RewardSample, count_failure, mark_unscored, references

log = logging.getLogger(__name__)


def _plain(text: str) -> str:
    # the text up to case, spacing and a final full stop: math-verify reads only math, so prose
    # answers ("No integer solutions", "Yes") match only this way
    return " ".join(text.strip().rstrip(".").lower().split())


def equivalent(pairs: list[tuple[str, list[str]]], timeout_s: int) -> list[tuple[bool, bool]]:
    """For each (answer, references): whether math-verify finds the answer equal to any reference,
    and whether a parse or comparison ran out of time. Runs in the worker process."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    out = []
    for answer, refs in pairs:
        if any(_plain(answer) == _plain(ref) for ref in refs):
            out.append((True, False))
            continue
        try:
            parsed = parse(answer, parsing_timeout=timeout_s)
            same = bool(parsed) and any(
                verify(parse(ref, parsing_timeout=timeout_s), parsed, timeout_seconds=timeout_s) for ref in refs
            )
            out.append((same, False))
        except TimeoutException:
            out.append((False, True))
    return out


class MathVerifyReward:
    """1.0 when the completion's answer equals a reference as math (``math-verify``), else 0.0.

    Args:
        extract: where the completion's answer is (``tags``, ``boxed``, ``gsm8k``, ``none``);
            math-verify then reads LaTeX or a plain expression from it.
        timeout_s: seconds each parse or comparison may take.
    """

    name = "math"
    failure_keys = ("timeouts", "worker_failures")

    def __init__(self, extract: str = "tags", timeout_s: int = 5):
        self.extract = check_extraction(extract)
        self.timeout_s = int(timeout_s)
        self.stats = {"samples": 0, "timeouts": 0, "worker_failures": 0}
        self._worker: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one batch at a time through the worker's pipes

    def __call__(self, samples: Sequence[RewardSample]) -> list[float]:
        pairs = [(extract_answer(s.completion, self.extract), references(s.ground_truth)) for s in samples]
        self.stats["samples"] += len(samples)
        if not samples:
            return []
        # every item may spend its timeout on a parse of the answer and of each reference
        budget = 30 + self.timeout_s * sum(1 + len(refs) for _, refs in pairs)
        try:
            with self._lock:
                results = self._ask({"pairs": pairs, "timeout_s": self.timeout_s}, budget)
        except (OSError, ValueError, TimeoutError) as exc:
            count_failure(self.stats, "worker_failures")
            log.warning("math reward: the checking process failed (%s); %d samples score 0.0", exc, len(samples))
            self.close()  # the next call starts a new worker
            mark_unscored(list(range(len(samples))), "the math checker failed")
            return [0.0] * len(samples)
        count_failure(self.stats, "timeouts", sum(timed_out for _, timed_out in results))
        return [float(same) for same, _ in results]

    def _ask(self, request: dict, budget: float) -> list:
        if self._worker is None or self._worker.poll() is not None:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        self._worker.stdin.write(json.dumps(request) + "\n")
        self._worker.stdin.flush()
        ready, _, _ = select.select([self._worker.stdout], [], [], budget)
        if not ready:
            raise TimeoutError(f"no answer within {budget:.0f} s")
        line = self._worker.stdout.readline()
        if not line:
            raise OSError(f"the worker exited ({self._worker.poll()})")
        return json.loads(line)

    def close(self) -> None:
        """Stop the checking process (a new one starts on the next call)."""
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker = None


def _serve() -> None:
    # The worker: one JSON request a line on stdin, one JSON answer a line on stdout; its main
    # thread is where math-verify's alarms work.
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(equivalent(request["pairs"], request["timeout_s"])), flush=True)


if __name__ == "__main__":
    _serve()
