"""EleutherAI's lm-evaluation-harness against ``service=llm_judge`` (the real SmolLM2): a
loglikelihood (multiple-choice) task through ``local-completions`` and a generate_until task through
``local-chat-completions``, each compared item by item with our engine in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.models.generation import SamplingParams
from core.models.generation_engine import GenerationEngine
from core.models.loading import SMOLLM2_ID, resolve_path

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"], 0),
    ("What is the capital of Japan?", ["Seoul", "Tokyo", "Beijing", "Bangkok"], 1),
    ("What is the capital of Italy?", ["Vienna", "Athens", "Rome", "Lisbon"], 2),
    ("What is two plus two?", ["three", "five", "six", "four"], 3),
]
MC_TASK = """task: rk_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: rk_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer in one word."
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "rk_mc.yaml").write_text(MC_TASK.format(data=data))
    (folder / "rk_gen.yaml").write_text(GEN_TASK.format(data=data))
    return folder


@pytest.fixture(scope="module")
def engine(smollm2_cfg) -> GenerationEngine:
    return GenerationEngine(smollm2_cfg)


def lm_eval(tasks: Path, model: str, model_args: str, task: str, chat: bool = False) -> list[dict]:
    """lm-eval's own evaluation loop (``simple_evaluate``, as its command line runs it) on ``task``;
    its logged samples, in document order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        # our two tasks only: indexing lm-eval's thousands of built-in ones takes half a minute
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        apply_chat_template=chat,
    )
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def continuation_logprob(engine: GenerationEngine, context: str, continuation: str) -> float:
    """log P(continuation | context) as lm-eval asks it (context and whole tokenised apart), in process."""
    context_ids = engine.token_ids([context])[0]
    whole = engine.token_ids([context + continuation])[0]
    scored = engine.complete([whole], SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0))[0][0]
    return sum(t.logprob for t in scored.prompt_logprobs[len(context_ids) :])


@pytest.mark.slow
def test_loglikelihood_task_scores_as_our_engine_does(tasks, smollm2_server, engine):
    url = f"{smollm2_server.url}/v1/completions"
    args = f"model={SMOLLM2_ID},base_url={url},tokenizer_backend=huggingface,tokenizer={resolve_path(SMOLLM2_ID)}"
    samples = lm_eval(tasks, "local-completions", args + ",num_concurrent=4", "rk_mc")
    assert len(samples) == len(QUESTIONS)
    for (question, choices, _), sample in zip(QUESTIONS, samples, strict=True):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        # lm-eval puts its target delimiter, a space, between context and choice
        ours = [continuation_logprob(engine, f"Question: {question}\nAnswer:", " " + c) for c in choices]
        assert theirs == pytest.approx(ours, abs=2e-3), question
        assert theirs.index(max(theirs)) == ours.index(max(ours))
    # the real model knows most of these: well above chance (1 in 4)
    assert sum(s["acc"] for s in samples) >= 3, [s["filtered_resps"] for s in samples]


@pytest.mark.slow
def test_generate_until_task_through_chat_completions_replies_as_our_engine(tasks, smollm2_server, engine):
    url = f"{smollm2_server.url}/v1/chat/completions"
    samples = lm_eval(tasks, "local-chat-completions", f"model={SMOLLM2_ID},base_url={url}", "rk_gen", chat=True)
    prompts = [[{"role": "user", "content": f"{q} Answer in one word."}] for q, _, _ in QUESTIONS]
    ours = engine.chat(prompts, SamplingParams(temperature=0.0, max_tokens=12), stop=["\n"])
    replies = [s["resps"][0][0] for s in samples]
    assert replies == [group[0].text for group in ours]
    named = sum(
        choices[answer].split()[-1].lower() in reply.lower()
        for (_, choices, answer), reply in zip(QUESTIONS, replies, strict=True)
    )
    assert named >= 2, replies  # real answers, not noise
