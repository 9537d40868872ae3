"""Where the final answer sits in a text: the forms RL datasets and math models use.

``extract_answer(text, how)`` with ``how``:

* ``tags``: the last ``<answer>…</answer>`` block (our prompts ask for it);
* ``boxed``: the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced (MATH, CHAMP, most math models);
* ``gsm8k``: the number after the last ``####`` with its thousands commas removed (GSM8K's
  worked solutions end with ``#### 72``; verl's preprocessing keeps just that number);
* ``none``: the text as it is.

When the text has no such marker, the whole text is the answer (so an answer that is only the
number still counts).
"""

from __future__ import annotations

import re

from core.config_errors import ConfigError

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_GSM8K = re.compile(r"####\s*(-?[0-9.,]+)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}``, nested braces included; ``None`` when there is none
    or it is never closed.

    >>> last_boxed(r"so \\boxed{\\frac{1}{3}}.")
    '\\\\frac{1}{3}'
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for at in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[at], 0)
        if depth == 0:
            return text[start:at]
    return None


def _tags(text: str) -> str | None:
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else None


def _gsm8k(text: str) -> str | None:
    found = _GSM8K.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


_FINDERS = {"tags": _tags, "boxed": last_boxed, "gsm8k": _gsm8k, "none": lambda text: None}
EXTRACTIONS = tuple(_FINDERS)


def check_extraction(how: str) -> str:
    """``how`` when it names an extraction, else a ``ConfigError`` that lists them."""
    if how not in _FINDERS:
        raise ConfigError(f"answer extraction must be one of {', '.join(EXTRACTIONS)}, got {how!r}")
    return how


def extract_answer(text: str, how: str = "tags") -> str:
    """The answer in ``text`` as ``how`` finds it (see the module), else the whole text.

    >>> extract_answer("Think... <answer>Paris</answer>")
    'Paris'
    >>> extract_answer("48/2 = 24 clips.\\n#### 1,024", "gsm8k")
    '1024'
    >>> extract_answer(r"The answer is \\boxed{42}.", "boxed")
    '42'
    """
    found = _FINDERS[check_extraction(how)](text)
    return text if found is None else found
