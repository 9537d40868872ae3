"""Choosing which references a completion is judged against (``target_gt``, prompt-token filter)."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens."""
    return _TOKEN.findall(text.lower())


def filter_references(refs: list[str], extra_info: dict | None) -> list[str]:
    """The references to score against, as the reference judge and embedding rewards define them.

    * ``target_gt`` (a string or list): keep the references equal to it.
    * ``filter_gt_by_prompt_token`` with ``prompt``: keep the references that contain the
      prompt's last whitespace-separated word (lower-cased) as a token.

    A filter that would leave nothing is ignored, so there is always something to score against.

    >>> filter_references(["cat", "dog"], {"filter_gt_by_prompt_token": True, "prompt": "The answer is dog"})
    ['dog']
    """
    if not extra_info:
        return refs
    target = extra_info.get("target_gt")
    if target is not None:
        wanted = {target} if isinstance(target, str) else set(target)
        subset = [r for r in refs if r in wanted]
        if subset:
            return subset
    prompt = str(extra_info.get("prompt") or "").strip()
    if extra_info.get("filter_gt_by_prompt_token") and prompt:
        last = prompt.split()[-1].lower()
        subset = [r for r in refs if last in tokens(r)]
        if subset:
            return subset
    return refs
