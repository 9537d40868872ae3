"""The shared decode loop: tokens equal to transformers' greedy ``generate`` also when rows join
a running batch mid-way, log-probabilities equal to a forward pass, stop handling, seeded
draws independent of the batch, and the server's iteration-level scheduler answering a short
request while a long one still decodes."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
import torch

from core.models.decoding import DecodeLoop, Row, RowSpec
from core.models.generation import SamplingParams
from core.models.generation_engine import GenerationEngine
from core.models.generation_scheduler import GenerationScheduler

PROMPTS = ["Hello there", "The capital of France is a city with a long history and", "x", "one two three four"]


@pytest.fixture(scope="module")
def engine(tiny_model_cfg) -> GenerationEngine:
    return GenerationEngine(tiny_model_cfg, max_batch_size=8)


def reference_greedy(engine: GenerationEngine, ids: list[int], new: int) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt."""
    out = engine.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new,
        eos_token_id=engine.end_ids,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


def test_greedy_rows_equal_generate_also_when_they_join_a_running_batch(engine):
    ids = engine.token_ids(PROMPTS)
    budgets = [12, 5, 9, 7]  # rows end at different steps, so the batch shrinks and is trimmed
    rows = [Row(p, RowSpec(n)) for p, n in zip(ids, budgets, strict=True)]
    loop = engine.decode_loop(max_rows=8)
    waiting = deque(rows[:2])
    loop.step(waiting)
    loop.step(waiting)
    waiting.extend(rows[2:])  # two rows join after two steps: prefilled and padded into the cache
    loop.step(waiting)
    assert len(loop.batch) == 4
    # no autograd graph behind the cache (it held every step's activations: gigabytes)
    assert not loop.batch.cache.layers[0].keys.requires_grad
    while loop.batch or waiting:
        loop.step(waiting)
    for row, prompt, n in zip(rows, ids, budgets, strict=True):
        assert row.tokens == reference_greedy(engine, prompt, n)
        assert row.finish == "length"


def test_a_full_batch_admits_waiting_rows_as_places_free(engine):
    ids = engine.token_ids(PROMPTS)
    loop = engine.decode_loop(max_rows=2)
    rows = [Row(p, RowSpec(3 + i)) for i, p in enumerate(ids)]
    waiting = deque(rows)
    sizes = []
    while waiting or loop.batch:
        loop.step(waiting)
        sizes.append(len(loop.batch))
    assert max(sizes) == 2
    for row, prompt in zip(rows, ids, strict=True):
        assert row.tokens == reference_greedy(engine, prompt, row.spec.max_new_tokens)


def test_log_probabilities_equal_a_forward_pass(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, logprobs=True, top_logprobs=3, seed=4)
    rows = engine.rows(engine.token_ids(PROMPTS[:2]), params, None)
    engine.decode_loop(4).run(rows)
    for row in rows:
        full = torch.tensor([row.prompt + row.tokens])
        logp = torch.log_softmax(engine.model(full).logits[0, len(row.prompt) - 1 : -1].float(), -1)
        expected = logp.gather(1, torch.tensor(row.tokens)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(row.logprobs), expected, atol=1e-4)
        top = logp.topk(3, dim=-1)
        assert [t[0] for t in row.top] == top.indices.tolist()
        assert torch.allclose(torch.tensor([t[1] for t in row.top]), top.values, atol=1e-4)
    # what the OpenAI routes report is the same numbers (same seed, same draws)
    served = [c.logprobs for (c,) in engine.complete(PROMPTS[:2], params)]
    assert [[t.logprob for t in c] for c in served] == [r.logprobs for r in rows]


@pytest.mark.parametrize("logit_bytes", [1 << 30, 1])  # one prefill; one prompt per prefill group
def test_prompt_log_probabilities_equal_a_forward_pass(engine, monkeypatch, logit_bytes):
    import core.models.decoding as decoding

    monkeypatch.setattr(decoding, "PROMPT_LOGITS_BYTES", logit_bytes)
    ids = engine.token_ids(PROMPTS[:3])
    scored = RowSpec(max_new_tokens=0, prompt_logprobs=2)
    rows = [Row(list(p), scored) for p in ids] + [Row(list(ids[0]), RowSpec(max_new_tokens=4))]
    engine.decode_loop(8).run(rows)
    for row in rows[:3]:
        logp = torch.log_softmax(engine.model(torch.tensor([row.prompt])).logits[0, :-1].float(), -1)
        expected = logp.gather(1, torch.tensor(row.prompt[1:])[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor([v for v, *_ in row.prompt_scores]), expected, atol=1e-4)
        assert [rank for _, rank, *_ in row.prompt_scores] == [
            int((lp > e).sum()) + 1 for lp, e in zip(logp, expected, strict=True)
        ]
        assert [ids for *_, ids, _ in row.prompt_scores] == logp.topk(2, dim=-1).indices.tolist()
        assert row.tokens == [] and row.finish == "length"  # budget 0: scored, nothing generated
    # a row that decodes beside them is unaffected
    assert rows[3].tokens == reference_greedy(engine, ids[0], 4) and rows[3].prompt_scores is None


def test_rows_end_at_an_end_id_a_stop_string_or_their_budget(engine):
    prompt = engine.token_ids(["Hello there"])[0]
    free = reference_greedy(engine, prompt, 8)
    # the row's 3rd greedy token made an end id: it ends there, the end id kept as its last token
    loop = DecodeLoop(engine.model, engine.tokenizer, [free[2]], max_rows=4)
    (ended,) = loop.run([Row(prompt, RowSpec(8))])
    assert ended.tokens == free[:3] and ended.finish == "end"
    # a stop string from the 4th token's text ends the row at that token
    stop = engine.tokenizer.decode(free[3:4]).strip()
    (stopped,) = engine.decode_loop(4).run([Row(prompt, RowSpec(8, stop=(stop,)))])
    assert stopped.finish == "stop" and stopped.stop_found == stop and stopped.tokens == free[:4]
    # a stop string no token of the vocabulary spells (a newline for WordPiece) is harmless
    (plain,) = engine.decode_loop(4).run([Row(prompt, RowSpec(8, stop=("\n",)))])
    assert plain.tokens == free and plain.finish == "length"


def test_a_seeded_request_draws_the_same_whatever_else_is_in_the_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=11, n=3)
    ids = engine.token_ids(PROMPTS[:1])
    alone = engine.rows(ids, params, None)
    engine.decode_loop(8).run(alone)
    crowd = engine.rows(engine.token_ids(PROMPTS[1:]), SamplingParams(temperature=1.0, max_tokens=8), None)
    together = engine.rows(ids, params, None)
    engine.decode_loop(8).run(crowd[:1] + together + crowd[1:])
    assert [r.tokens for r in alone] == [r.tokens for r in together]
    assert len({tuple(r.tokens) for r in alone}) > 1  # n samples, not one sample n times


def test_the_scheduler_answers_a_short_request_while_a_long_one_decodes(engine):
    async def scenario():
        scheduler = GenerationScheduler(engine, max_rows=8)
        ids = engine.token_ids(PROMPTS[:2])
        finished = []

        async def ask(name, prompt, tokens, delay):
            await asyncio.sleep(delay)
            params = SamplingParams(temperature=0.0, max_tokens=tokens)
            (group,) = await scheduler.submit([prompt], params, None)
            finished.append((name, scheduler.steps, group[0].completion_tokens))

        await asyncio.gather(ask("long", ids[0], 400, 0), ask("short", ids[1], 4, 0.05))
        await scheduler.close()
        return finished

    finished = asyncio.run(scenario())
    assert [name for name, _, _ in finished] == ["short", "long"]
    (_, short_done, _), (_, long_done, long_tokens) = finished
    assert long_tokens == 400 and short_done < long_done  # it joined the running batch and left it


@pytest.mark.parametrize("max_wait_ms", [0, 200])
def test_requests_that_find_the_model_idle_wait_to_share_one_prefill(engine, max_wait_ms):
    # four one-token requests arriving 20 ms apart (lm-eval's loglikelihood requests at
    # num_concurrent=4): with a gather window they share one prefill, without it they do not
    async def scenario():
        admitted = []
        scheduler = GenerationScheduler(engine, max_rows=8, on_admit=admitted.append, max_wait_ms=max_wait_ms)
        ids = engine.token_ids(PROMPTS[:4])

        async def ask(prompt, delay):
            await asyncio.sleep(delay)
            return await scheduler.submit([prompt], SamplingParams(temperature=0.0, max_tokens=1), None)

        answers = await asyncio.gather(*(ask(p, 0.02 * i) for i, p in enumerate(ids)))
        await scheduler.close()
        return admitted, answers

    admitted, answers = asyncio.run(scenario())
    assert all(group[0].completion_tokens == 1 for (group,) in answers)
    assert admitted == ([4] if max_wait_ms else [1, 1, 1, 1])
