"""One decode loop for every generator: a KV-cached batch that rows join and leave between steps.

Every text generator here decodes through ``DecodeLoop``: the in-process ``GenerationEngine``
(judge, InfoGain, evaluation), the OpenAI-compatible server's scheduler (iteration-level
batching: ``generation_scheduler``) and the policy server's three strategies (sampling,
beam search, diverse beam search: ``ppo_server.decoding``).

A ``Row`` is one sequence being generated, with its own budget, sampling settings, stop
strings and log-probability wishes. ``DecodeBatch`` holds the rows that decode together, their
attention mask and one KV cache: rows are left-padded, a row that joins is prefilled alone and
its cache is padded into the batch's, a row that ends is dropped (and padding columns no row
needs any more are cut), so the batch is always as wide as its longest live row. Each step
runs the model once for the whole batch; the sampler (``core.models.sampling``) never sorts
the vocabulary, and the chosen token's log-probability is recorded from the same logits (no
second forward pass).

A row ends at any of the model's end ids (kept as its last token), as soon as its generated
text holds one of its stop strings (matched on decoded text, so a string the vocabulary has
no token for works too), or at its token budget. A row may also ask for its prompt tokens'
log-probabilities: they come from the prefill's own forward (every position's logits, for the
rows that ask), and a row with a budget of 0 tokens ends there (OpenAI's ``echo`` with
``max_tokens: 0``, lm-eval's loglikelihood requests).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from core.models.constraints import mask_logits, new_matcher
from core.models.generation import cut_at_stop
from core.models.sampling import sample_nucleus
from core.serving.cancel import check_abandoned


@dataclass(frozen=True)
class RowSpec:
    """How one row decodes: ``temperature`` 0 is greedy; ``top_p`` < 1 cuts to the nucleus."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # record each chosen token's log-probability (and this many most likely alternatives)
    logprobs: bool = False
    top_logprobs: int = 0
    # record each prompt token's log-probability given the tokens before it, from the prefill's
    # own forward (and this many most likely alternatives); None: not asked
    prompt_logprobs: int | None = None
    # OpenAI's response_format (``core.models.constraints.response_format_key``) the text must
    # follow, enforced token by token; None: free text
    response_format: str | None = None


@dataclass(eq=False)
class Row:
    """One sequence being generated, and what it has produced so far."""

    prompt: list[int]
    spec: RowSpec
    # Rows that share a generator draw from it together, in order: a seeded request gets the
    # same samples whatever else runs in the batch.
    generator: torch.Generator | None = None
    # who asked for the row (the server's scheduler uses it to answer and to drop abandoned rows)
    owner: object = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # per generated token: (alternative token ids, their log-probabilities), most likely first
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)
    finish: str | None = None  # "end" (an end id), "stop" (a stop string) or "length"
    stop_found: str | None = None
    # with ``spec.prompt_logprobs``: per prompt token after the first, (log-probability, rank
    # among the vocabulary (1 = most likely), alternative ids, their log-probabilities)
    prompt_scores: list[tuple[float, int, list[int], list[float]]] | None = None
    # with ``spec.response_format``: llguidance's matcher of this row's output so far
    matcher: object = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def budget(self) -> int:
        """Token positions the row can occupy in the cache."""
        return len(self.prompt) + self.spec.max_new_tokens

    def copy(self) -> Row:
        return dataclasses.replace(self, tokens=list(self.tokens), logprobs=list(self.logprobs), top=list(self.top))


# Temperatures below this decode greedily (as vLLM's): dividing logits by 1e-145 overflows to inf.
GREEDY_BELOW = 1e-5
# Every-position logits a prefill that scores prompts may hold at once (float32).
PROMPT_LOGITS_BYTES = 1 << 30


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN and infinite logits replaced by finite ones, so a diverging model still answers."""
    finfo = torch.finfo(logits.dtype)
    return torch.nan_to_num(logits, nan=0.0, posinf=finfo.max / 2, neginf=finfo.min / 2)


class DecodeBatch:
    """Rows decoded together over one KV cache (see the module docstring).

    Between steps every row has one chosen token not yet in the cache (``pending``); the mask
    has a column for it, so it is one column wider than the cache.
    """

    def __init__(self, model, pad_id: int, safe_logits: bool = False):
        self.model, self.pad_id, self.safe_logits = model, pad_id, safe_logits
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.forward_calls = 0

    def __len__(self) -> int:
        return len(self.rows)

    def positions(self) -> int:
        """Token positions the rows may still fill: the budget admission is checked against."""
        return sum(r.budget() for r in self.rows)

    def logits(self, joining: Sequence[Row] = ()) -> torch.Tensor:
        """Next-token logits (float32, ``[rows, vocab]``) of every row, after the running rows
        took their pending token and ``joining`` rows were prefilled and appended to the batch."""
        parts = []
        if self.rows:
            parts.append(self._advance())
        if joining:
            logits, cache, mask = self._prefill(joining)
            self._merge(cache, mask)
            self.rows.extend(joining)
            parts.append(logits)
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.safe_logits:
            return clean_logits(logits)
        if bool(torch.isnan(logits.amax(dim=-1)).any()):  # (amax keeps a NaN) a sampler would pick from them silently
            raise RuntimeError("the model returned NaN logits (a diverging model?); safe_logits replaces them")
        return logits

    def append(self, tokens: torch.Tensor) -> None:
        """Each row's chosen token becomes its pending one."""
        self.pending = tokens.to(self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.pending)], 1)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep these rows, in this order (an index may repeat: beam search copies beams)."""
        if list(indices) == list(range(len(self.rows))):
            return
        if not indices:
            self.rows, self.cache, self.mask, self.pending = [], None, None, None
            return
        index = torch.tensor(list(indices), device=self.device)
        # a row kept twice (a beam that branches) is copied; the first keeps its identity
        rows, seen = [], set()
        for i in indices:
            rows.append(self.rows[i].copy() if i in seen else self.rows[i])
            seen.add(i)
        self.rows = rows
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        if self.pending is not None:
            self.pending = self.pending[index]
        # columns that are padding for every remaining row are cut from mask and cache
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, every_position: bool = False
    ) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        # only the last position's logits unless prompt log-probabilities are asked for: a prefill
        # would otherwise project every prompt position onto the vocabulary (rows × prompt × 49k
        # floats for SmolLM2)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
        )
        self.forward_calls += 1
        return out.logits.float() if every_position else out.logits[:, -1].float()

    def _advance(self) -> torch.Tensor:
        return self._forward(self.pending, self.mask, self.cache)

    def _prefill(self, rows: Sequence[Row]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        # rows with the same prompt (n samples of one prompt) are computed once and copied
        unique: dict[tuple[int, ...], int] = {}
        which = [unique.setdefault(tuple(r.prompt), len(unique)) for r in rows]
        width = max(len(p) for p in unique)
        ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for i, prompt in enumerate(unique):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        scored = [r for r in rows if r.spec.prompt_logprobs is not None]
        if scored:
            logits, cache = self._scored_prefill(ids, mask, list(unique), scored)
        else:
            cache = DynamicCache()
            logits = self._forward(ids, mask, cache)
        if len(unique) < len(rows):
            index = torch.tensor(which, device=self.device)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
        return logits, cache, mask

    def _scored_prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, prompts: list[tuple[int, ...]], scored: Sequence[Row]
    ) -> tuple[torch.Tensor, DynamicCache]:
        """The prefill when rows ask for their prompt's log-probabilities: every position's logits
        are needed, so the prompts go through in groups whose logits fit ``PROMPT_LOGITS_BYTES``
        (a 2,048-token prompt's alone are 400 MB on a 49k vocabulary); returns the last
        position's logits and the whole batch's cache, as the plain prefill does."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 65536)
        group = max(1, PROMPT_LOGITS_BYTES // (ids.shape[1] * vocab * 4))
        position = {p: i for i, p in enumerate(prompts)}
        last, caches = [], []
        for start in range(0, len(prompts), group):
            cache = DynamicCache()
            logits = self._forward(ids[start : start + group], mask[start : start + group], cache, every_position=True)
            for row in scored:
                i = position[tuple(row.prompt)] - start
                if 0 <= i < len(logits):
                    row.prompt_scores = _prompt_scores(logits[i], row.prompt, row.spec.prompt_logprobs)
            last.append(logits[:, -1])
            caches.append(cache)
        for other in caches[1:]:  # the groups are as wide as the batch: their caches stack
            for mine, theirs in zip(caches[0].layers, other.layers, strict=True):
                mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        return torch.cat(last), caches[0]

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])


def _prompt_scores(
    logits: torch.Tensor, prompt: Sequence[int], top: int
) -> list[tuple[float, int, list[int], list[float]]]:
    """Each prompt token after the first: its log-probability given the tokens before it (from
    ``logits``, one row of every position, the prompt right-aligned), its rank, and the ``top``
    most likely tokens at that position with theirs."""
    n = len(prompt)
    if n < 2:
        return []
    logp = torch.log_softmax(logits[-n:-1], dim=-1)
    chosen = logp.gather(1, torch.tensor(prompt[1:], device=logp.device)[:, None])
    ranks = ((logp > chosen).sum(-1) + 1).tolist()
    if top:
        alternatives = logp.topk(top, dim=-1)
        ids, values = alternatives.indices.tolist(), alternatives.values.tolist()
    else:
        ids = values = [[] for _ in range(n - 1)]
    return list(zip(chosen.squeeze(1).tolist(), ranks, ids, values, strict=True))


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def choose_tokens(rows: Sequence[Row], logits: torch.Tensor) -> torch.Tensor:
    """Each row's next token: greedy at temperature 0, else nucleus sampling; rows with equal
    settings (and the same generator, if any) are drawn in one call."""
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.spec.temperature, r.spec.top_p, id(r.generator)), []).append(i)
    for (temperature, top_p, _), members in groups.items():
        index = torch.tensor(members, device=logits.device)
        part = logits if len(members) == len(rows) else logits[index]  # one group: no copy
        if temperature < GREEDY_BELOW:
            tokens[index] = part.argmax(-1)
        else:
            tokens[index] = sample_nucleus(part, temperature, top_p, rows[members[0]].generator)
    return tokens


def record_logprobs(rows: Sequence[Row], logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Append each chosen token's log-probability under the model (the raw logits, before
    temperature and top-p) to the rows that asked for them."""
    wanted = [i for i, r in enumerate(rows) if r.spec.logprobs and not r.done]
    if not wanted:
        return
    index = torch.tensor(wanted, device=logits.device)
    logp = torch.log_softmax(logits if len(wanted) == len(rows) else logits[index], dim=-1)
    chosen = logp.gather(1, tokens[index][:, None]).squeeze(1).tolist()
    top = max(rows[i].spec.top_logprobs for i in wanted)
    alternatives = logp.topk(top, dim=-1) if top else None
    for k, i in enumerate(wanted):
        rows[i].logprobs.append(chosen[k])
        n = rows[i].spec.top_logprobs
        if n:
            rows[i].top.append((alternatives.indices[k, :n].tolist(), alternatives.values[k, :n].tolist()))


class DecodeLoop:
    """Decodes rows with a model: ``run`` for a list of rows, ``step`` for a scheduler that
    admits rows as they come, ``beam_search`` for the policy server's beam strategies.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        end_ids: every token id that ends a row (``core.models.loading.end_token_ids``).
        max_rows: rows decoded together at most.
        max_tokens: token positions (prompt + budget, summed over the rows) the batch may hold,
            which bounds the KV cache; a row that alone exceeds it is still decoded, alone.
        safe_logits: replace NaN/inf logits instead of failing.
    """

    def __init__(
        self,
        model,
        tokenizer,
        end_ids: Iterable[int],
        max_rows: int = 32,
        max_tokens: int = 65536,
        safe_logits: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.end_ids = set(end_ids)
        self.max_rows, self.max_tokens = max_rows, max_tokens
        pad = tokenizer.pad_token_id
        self.batch = DecodeBatch(model, tokenizer.eos_token_id if pad is None else pad, safe_logits)

    @torch.inference_mode()
    def run(self, rows: Sequence[Row], what: str = "generation") -> list[Row]:
        """Decode ``rows`` to the end; rows join the batch as places free up. Checks between
        steps whether the requester is gone (``core.serving.cancel``)."""
        waiting = deque(rows)
        while waiting or self.batch:
            check_abandoned(what)
            self.step(waiting)
        return list(rows)

    def admit(self, waiting: deque[Row]) -> list[Row]:
        """Rows taken from the front of ``waiting`` that fit the batch's rows and token positions
        (at least one when the batch is empty)."""
        joining, used = [], self.batch.positions()
        while waiting and len(self.batch) + len(joining) < self.max_rows:
            need = waiting[0].budget()
            if (self.batch or joining) and used + need > self.max_tokens:
                break
            joining.append(waiting.popleft())
            used += need
        return joining

    @torch.inference_mode()  # no autograd graph: it held every step's activations (gigabytes)
    def step(self, waiting: deque[Row]) -> list[Row]:
        """One token for every row of the batch, after admitting what fits from ``waiting``;
        returns the rows that ended in this step (they have left the batch)."""
        joining = self.admit(waiting)
        if not self.batch and not joining:
            return []
        logits = self.batch.logits(joining)
        rows = self.batch.rows
        for row in joining:
            if row.spec.response_format is not None:
                row.matcher = new_matcher(row.spec.response_format, self.tokenizer, logits.shape[-1])
        for row in rows:
            if not row.spec.max_new_tokens:  # a prompt scored only (OpenAI's echo with max_tokens 0)
                row.finish = "length"
        matchers = [r.matcher for r in rows]
        choosing = logits
        if any(matchers):
            # the grammar shapes the choice; the log-probabilities recorded stay the model's own
            choosing = mask_logits(matchers, logits)
            for i in (choosing.amax(-1) == float("-inf")).nonzero().flatten().tolist():
                # no token of this model's vocabulary continues the grammar: the row ends here
                rows[i].finish = "length"
                choosing[i] = logits[i]
        # rows that ended above take no token (their draw is discarded)
        tokens = choose_tokens(rows, choosing)
        record_logprobs(rows, logits, tokens)
        self.batch.append(tokens)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if row.done:
                continue
            row.tokens.append(token)
            if row.matcher is not None:
                row.matcher.consume_token(token)
            self._check_end(row)
        self.batch.keep([i for i, r in enumerate(rows) if not r.done])
        return [r for r in rows if r.done]

    @torch.inference_mode()
    def drop(self, gone: Callable[[Row], bool]) -> list[Row]:
        """Remove the rows ``gone`` picks (their requester left); returns them."""
        dropped = [r for r in self.batch.rows if gone(r)]
        if dropped:
            self.batch.keep([i for i, r in enumerate(self.batch.rows) if not gone(r)])
        return dropped

    def _check_end(self, row: Row) -> None:
        if row.tokens[-1] in self.end_ids or (row.matcher is not None and row.matcher.is_stopped()):
            row.finish = "end"  # an end id, or the structured output is complete
        elif row.spec.stop and self._stop_in_tail(row):
            row.finish = "stop"
        elif len(row.tokens) >= row.spec.max_new_tokens:
            row.finish = "length"

    def _stop_in_tail(self, row: Row) -> bool:
        # a stop string of n characters spans at most n tokens (+2 for partly decoded bytes)
        tail = max(len(s) for s in row.spec.stop) + 2
        text = self.tokenizer.decode(row.tokens[-tail:], skip_special_tokens=False)
        _, row.stop_found = cut_at_stop(text, row.spec.stop)
        return row.stop_found is not None

    @torch.inference_mode()
    def beam_search(
        self, rows: Sequence[Row], groups: int, beams: int, diversity_penalty: float = 0.0
    ) -> list[list[tuple[Row, float]]]:
        """Beam search over ``rows`` (one per prompt): ``groups`` groups of ``beams`` beams each;
        with more than one group, a group's candidates lose ``diversity_penalty`` for each earlier
        group that chose the same token at this step (Hamming diversity, Vijayakumar et al. 2016).
        Returns per prompt every beam with its length-normalised log-probability, group by group."""
        width = groups * beams
        start = [r.copy() for r in rows for _ in range(width)]
        n = len(rows)
        # Only the first beam of each group is alive at the start, so beams do not begin as copies.
        scores = torch.zeros(n, groups, beams, device=self.batch.device)
        scores[:, :, 1:] = float("-inf")
        joining = start
        while True:
            check_abandoned("beam search")
            logits = self.batch.logits(joining)
            joining = []
            done = torch.tensor([r.done for r in self.batch.rows], device=logits.device)
            order, tokens = _beam_step(
                scores, torch.log_softmax(logits, -1), done, self.batch.pad_id, diversity_penalty
            )
            self.batch.keep(order.tolist())
            self.batch.append(tokens)
            for row, token in zip(self.batch.rows, tokens.tolist(), strict=True):
                if not row.done:
                    row.tokens.append(token)
                    self._check_end(row)
            if all(r.done for r in self.batch.rows):
                break
        final = self.batch.rows
        self.batch.keep([])
        lengths = torch.tensor([max(1, len(r.tokens)) for r in final], device=scores.device)
        norm = (scores.view(-1) / lengths).tolist()
        return [[(final[p * width + i], norm[p * width + i]) for i in range(width)] for p in range(n)]


def _beam_step(scores, logp, done, pad: int, penalty: float):
    """Advance every group's beams by one token (``scores`` in place); return (row order, tokens)."""
    n, groups, beams = scores.shape
    vocab = logp.shape[-1]
    # A finished beam only continues with padding, at no cost, so its score is kept.
    finished = torch.full_like(logp, float("-inf"))
    finished[:, pad] = 0.0
    logp = torch.where(done[:, None], finished, logp).view(n, groups, beams, vocab)
    used = torch.zeros(n, vocab, device=logp.device)
    order = torch.empty(n, groups, beams, dtype=torch.long, device=logp.device)
    tokens = torch.empty_like(order)
    for g in range(groups):
        total = scores[:, g, :, None] + logp[:, g]
        # Diversity shapes the choice only; the kept score stays the sequence log-probability.
        chosen = (total - penalty * used[:, None, :]).view(n, -1).topk(beams, dim=-1).indices
        beam, token = chosen // vocab, chosen % vocab
        scores[:, g] = total.view(n, -1).gather(1, chosen)
        used.scatter_add_(1, token, torch.ones_like(token, dtype=used.dtype))
        order[:, g], tokens[:, g] = g * beams + beam, token
    rows = torch.arange(n, device=logp.device)[:, None] * groups * beams
    return (rows + order.view(n, -1)).view(-1), tokens.view(-1)
