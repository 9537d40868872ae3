"""The policy model in process: decoding (``ppo_server.decoding``) and a compact PPO update on LoRA.

PPO here is the clipped-surrogate update on given samples (the search loop that produced them
computed their advantages): for each response token,

    ratio   = exp(logp_new - logp_old)
    policy  = -min(ratio * A, clip(ratio, 1 - clip_range, 1 + clip_range) * A)
    kl      = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1     (k3 estimator, >= 0)
    loss    = mean over response tokens of (policy + kl_coef * kl)

``logp_old`` is the policy before this training (computed once), ``logp_ref`` the base model,
obtained by disabling the adapter: no second copy of the weights is held.

``PolicyEngine`` is the in-process API (``forward``, ``direct_forward``, training); the HTTP app
and ``PolicyClient`` have the same methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from core.models.loading import build_causal_lm
from ppo_server.decoding import STRATEGIES, DecodeSpec, decode
from ppo_server.samples import Sample
from ppo_server.training import AdapterModel, TrainingEngine


class PolicyModel(AdapterModel):
    """A causal LM with a LoRA adapter that decodes batches and trains with PPO (arguments: ``AdapterModel``)."""

    task_type = "CAUSAL_LM"
    # Batched decode calls so far (the server's /health reports them).
    generate_calls = 0

    def build(self, model_cfg: Mapping):
        return build_causal_lm(model_cfg, self.tokenizer, self.device)

    def generate(self, questions: Sequence[str], spec: DecodeSpec):
        """``spec.num_samples`` ``Decoded`` sequences per question, each put in the prompt format
        training uses (one batched decode per ``max_batch_size``)."""
        prompts = [self.prompt([("user", q)]) for q in questions]
        out = []
        for start in range(0, len(prompts), self.max_batch_size):
            with self.lock:
                out.extend(decode(self.model, self.tokenizer, prompts[start : start + self.max_batch_size], spec))
                self.generate_calls += 1
        return out

    def _logprobs(self, rows: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of each next token and the mask of response tokens, both [batch, len-1]."""
        ids, mask = self.pad([r for r, _ in rows])
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        response = torch.zeros_like(logp)
        for i, (tokens, start) in enumerate(rows):
            response[i, max(start, 1) - 1 : len(tokens) - 1] = 1.0
        return logp, response

    @torch.no_grad()
    def prepare(self, samples: Sequence[Sample]) -> list:
        encoded = [self.encode(s) for s in samples]
        extras = []
        step = self.settings.micro_batch_size
        for start in range(0, len(encoded), step):
            rows = encoded[start : start + step]
            with self.lock:
                old, _ = self._logprobs(rows)
                with self.model.disable_adapter():
                    ref, _ = self._logprobs(rows)
            extras.extend((row, old[i, : len(row[0]) - 1], ref[i, : len(row[0]) - 1]) for i, row in enumerate(rows))
        return extras

    def loss(self, samples: Sequence[Sample], extras: Sequence) -> tuple[torch.Tensor, dict]:
        rows = [e[0] for e in extras]
        logp, response = self._logprobs(rows)
        old = torch.nn.utils.rnn.pad_sequence([e[1] for e in extras], batch_first=True)
        ref = torch.nn.utils.rnn.pad_sequence([e[2] for e in extras], batch_first=True)
        advantages = torch.tensor([s.advantage for s in samples], device=logp.device)[:, None]
        ratio = torch.exp(logp - old)
        clip = self.settings.clip_range
        policy = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        tokens = response.sum().clamp(min=1)
        loss = ((policy + self.settings.kl_coef * kl) * response).sum() / tokens
        clipped = ((ratio - 1).abs() > clip).float()
        stats = {
            "policy_loss": float((policy * response).sum() / tokens),
            "kl": float((kl * response).sum() / tokens),
            "clip_fraction": float((clipped * response).sum() / tokens),
        }
        return loss, stats


class PolicyEngine(TrainingEngine):
    """The policy server's API in process (the HTTP app and ``PolicyClient`` mirror it).

    Args:
        adapter: the ``PolicyModel``.
        queue: ``DecodeSpec`` fields for ``forward`` tasks (samples per task, temperature, lengths).
        final_stop_strings: stop strings that end the whole answer (``is_final_step``); the other
            default stop strings end one reasoning step. ``full_simulation`` decodes to a final one.
        max_num_samples / max_output_length: largest values a request may ask for (400 beyond).
        Remaining arguments: see ``TrainingEngine``.
    """

    def __init__(
        self,
        adapter: PolicyModel,
        queue: Mapping | None = None,
        final_stop_strings: Sequence[str] = ("<|eot_id|>",),
        max_num_samples: int = 16,
        max_output_length: int = 8192,
        **training,
    ):
        super().__init__(adapter, **training)
        queue = dict(queue or {})
        queue["stop_strings"] = tuple(queue.get("stop_strings") or DecodeSpec.stop_strings)
        self.queue_spec = DecodeSpec(**queue)
        self.final_stop_strings = tuple(final_stop_strings)
        self.max_num_samples, self.max_output_length = max_num_samples, max_output_length

    def task_spec(self, decoding_strategy: str = "temperature", full_simulation: bool = False) -> DecodeSpec:
        """The decoding of a queued task: the server's queue settings with the task's strategy."""
        check_strategy(decoding_strategy)
        stops = self.final_stop_strings if full_simulation else self.queue_spec.stop_strings
        return replace(self.queue_spec, decoding_strategy=decoding_strategy, stop_strings=tuple(stops))

    def forward_batch(self, questions: Sequence[str], spec: DecodeSpec) -> list[dict]:
        """``GET /forward/<id>`` bodies for tasks that share ``spec``, decoded in one batch."""
        self.check_inference()
        results = []
        for question, samples in zip(questions, self.adapter.generate(list(questions), spec), strict=True):
            results.append(
                {
                    "result": [s.text for s in samples],
                    "prompt": [question] * len(samples),
                    "stop_string_found": [s.stop_string_found for s in samples],
                    "is_final_step": [s.eos or s.stop_string_found in self.final_stop_strings for s in samples],
                }
            )
        return results

    def forward(self, question: str, decoding_strategy: str = "temperature", full_simulation: bool = False) -> dict:
        """Decode one task now (the server queues it and batches it with others)."""
        return self.forward_batch([question], self.task_spec(decoding_strategy, full_simulation))[0]

    def direct_spec(self, **fields) -> DecodeSpec:
        """``/direct_forward``'s fields with the reference defaults, checked (400/501 with the reason)."""
        fields = {k: v for k, v in fields.items() if v is not None}
        check_strategy(fields.get("decoding_strategy", "temperature"))
        max_input = int(fields.get("max_input_length", DecodeSpec.max_input_length))
        fields.setdefault("max_output_length", max_input + 256)
        if "stop_strings" in fields:
            fields["stop_strings"] = tuple(fields["stop_strings"])
        spec = replace(DecodeSpec(), **fields)
        if not 1 <= spec.num_samples <= self.max_num_samples:
            raise ValueError(f"num_samples must be between 1 and {self.max_num_samples}, got {spec.num_samples}")
        if spec.max_input_length < 1 or not 1 <= spec.max_output_length <= self.max_output_length:
            raise ValueError(
                f"need max_input_length >= 1 and 1 <= max_output_length <= {self.max_output_length} "
                f"(prompt + generated tokens), got {spec.max_input_length} and {spec.max_output_length}",
            )
        if spec.decoding_strategy == "temperature" and not spec.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {spec.temperature}")
        return spec

    def direct_forward(self, input_string: str, **fields) -> dict:
        """Decode ``input_string`` now with ``fields`` (the reference policy server's ``/direct_forward``)."""
        if not isinstance(input_string, str) or not input_string:
            raise ValueError("'input_string' is required")
        spec = self.direct_spec(**fields)
        self.check_inference()
        samples = self.adapter.generate([input_string], spec)[0]
        return {"result": [s.text for s in samples], "stop_strings": [s.stop_string_found for s in samples]}


def check_strategy(name: str) -> None:
    """501 for a decoding strategy this server does not implement (the reference policy server's status)."""
    if name not in STRATEGIES:
        raise NotImplementedError(f"decoding_strategy {name!r} is not implemented; use one of {', '.join(STRATEGIES)}")
