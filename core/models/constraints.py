"""Structured outputs: OpenAI's ``response_format`` (``json_object``, ``json_schema``) enforced
while decoding, with llguidance.

llguidance (MIT, the grammar engine behind Guidance, and one of vLLM's structured-output
backends) compiles a JSON schema into a grammar over the model's own tokens and computes, for
each step, the mask of tokens that keep the output valid, in microseconds on the CPU, from a
wheel without other dependencies. xgrammar's wheel pulls triton (a GPU compiler) in, and
outlines-core indexes the whole vocabulary for each schema before decoding; llguidance fits a
CPU server best.

Each constrained row of a decode batch carries its own matcher (``Row.matcher``): a batch mixes
constrained and free rows, and rows with different schemas. The mask only shapes the choice; the
log-probabilities reported stay the model's own, as vLLM reports them by default.
"""

from __future__ import annotations

import json
import threading
import weakref
from functools import lru_cache

import torch

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def response_format_key(response_format: dict | None) -> str | None:
    """The request's ``response_format`` as a canonical JSON string (sampling settings are
    hashable, so requests with the same format can share a batch), ``None`` for plain text.
    ``ValueError`` for a type other than ``text``, ``json_object`` or ``json_schema``."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"type": "json_object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format json_schema needs {json_schema: {name, schema: {...}}}")
        # keys in the order given: a schema's property order is the order the reply is written in
        return json.dumps({"type": "json_schema", "schema": spec.get("schema") or {}})
    raise ValueError(f"response_format type must be text, json_object or json_schema, not {kind!r}")


@lru_cache(maxsize=256)
def grammar_of(key: str) -> str:
    """llguidance's grammar for a ``response_format_key``."""
    import llguidance

    spec = json.loads(key)
    schema = {"type": "object"} if spec["type"] == "json_object" else spec["schema"]
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except Exception as exc:  # noqa: BLE001 - llguidance raises its own errors for schemas it cannot compile
        raise ValueError(f"response_format json_schema cannot be compiled: {exc}") from None


def grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of ``tokenizer`` (built once per tokenizer: about 0.3 s for 49k tokens),
    its masks ``vocab_size`` wide (the model's logits)."""
    import llguidance.hf

    with _LOCK:
        by_width = _TOKENIZERS.setdefault(tokenizer, {})
        if vocab_size not in by_width:
            try:
                by_width[vocab_size] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
            except Exception as exc:  # noqa: BLE001 - llguidance reads fast (byte-level or sentencepiece) tokenizers only
                raise ValueError(f"structured outputs need a tokenizer llguidance can read: {exc}") from None
        return by_width[vocab_size]


def check_format(key: str, tokenizer, vocab_size: int) -> None:
    """``ValueError`` with llguidance's reason when the schema cannot be compiled."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar_of(key), grammar_tokenizer(tokenizer, vocab_size)
    )
    if is_error:
        raise ValueError(f"response_format cannot be enforced: {messages[0]}")


def new_matcher(key: str, tokenizer, vocab_size: int):
    """A fresh matcher for one row."""
    import llguidance

    return llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), grammar_of(key))


def mask_logits(matchers: list, logits: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` where each row with a matcher keeps only the tokens its grammar allows
    next (``matchers[i]`` ``None``: row ``i`` is free; at least one row has a matcher)."""
    import llguidance.torch as lt

    constrained = [i for i, m in enumerate(matchers) if m is not None]
    masked = logits.clone()
    bitmask = lt.allocate_token_bitmask(len(constrained), logits.shape[-1])
    for k, i in enumerate(constrained):
        lt.fill_next_token_bitmask(matchers[i], bitmask, k)
    index = torch.tensor(constrained, device=logits.device)
    part = masked[index]
    lt.apply_token_bitmask_inplace(part, bitmask.to(logits.device))
    masked[index] = part
    return masked
