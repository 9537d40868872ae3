"""The value model in process: a scalar head on an LM (``score`` on the last token), LoRA-trained
with mean squared error towards the samples' values.

``ValueEngine`` is the in-process API (``forward`` plus training); the HTTP app and
``ValueClient`` have the same methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from core.models.loading import build_value_model
from ppo_server.samples import Sample
from ppo_server.training import AdapterModel, TrainingEngine


class ValueModel(AdapterModel):
    """An LM with a value head and a LoRA adapter; the head itself is trained and saved in full
    (arguments: ``AdapterModel``)."""

    task_type = "SEQ_CLS"

    def adapter_settings(self, lora: Mapping) -> Mapping:
        return {**dict(lora), "modules_to_save": list(lora.get("modules_to_save") or []) or ["score"]}

    def build(self, model_cfg: Mapping):
        return build_value_model(model_cfg, self.tokenizer, self.device)

    def _values(self, rows: Sequence[list[int]]) -> torch.Tensor:
        ids, mask = self.pad(rows)
        return self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()

    @torch.no_grad()
    def values(self, conversations: Sequence[Sequence[Mapping]]) -> list[float]:
        """The value of each conversation, encoded as in training: a final assistant turn is the
        response after the prompt, so served values and training targets mean the same thing."""
        rows = []
        for messages in conversations:
            turns = tuple((m["role"], m["content"]) for m in messages)
            last = turns[-1][1] if turns[-1][0] == "assistant" else ""
            prompt = turns[:-1] if last or turns[-1][0] == "assistant" else turns
            rows.append(self.encode(Sample(prompt, "", last, 0.0, 0.0))[0])
        out: list[float] = []
        for start in range(0, len(rows), self.max_batch_size):
            with self.lock:
                out.extend(self._values(rows[start : start + self.max_batch_size]).tolist())
        return out

    def loss(self, samples: Sequence[Sample], extras: Sequence) -> tuple[torch.Tensor, dict]:
        predicted = self._values([self.encode(s)[0] for s in samples])
        target = torch.tensor([s.value for s in samples], device=predicted.device)
        loss = torch.nn.functional.mse_loss(predicted, target)
        return loss, {"mse": float(loss)}


# The roles chat templates know; any other is a caller's mistake, refused rather than rendered.
ROLES = ("system", "user", "assistant", "tool")
MESSAGES_SHAPE = (
    f"'messages' must be a non-empty list of {{role, content}} objects (or a list of such lists); role is one of "
    f"{', '.join(ROLES)}, content a string"
)


def _conversations(messages) -> list[list[Mapping]]:
    """``messages`` as a list of conversations: one conversation (role/content objects) or a list of them."""

    def is_message(m) -> bool:
        return isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str)

    if not isinstance(messages, list) or not messages:
        raise ValueError(MESSAGES_SHAPE)
    if all(is_message(m) for m in messages):
        return [messages]
    if all(isinstance(c, list) and c and all(is_message(m) for m in c) for c in messages):
        return messages
    raise ValueError(MESSAGES_SHAPE)


class ValueEngine(TrainingEngine):
    """The value server's API in process (the HTTP app and ``ValueClient`` mirror it)."""

    def forward(self, messages) -> dict:
        """``{"result": [value, ...]}``: one value per conversation (a single conversation gives one)."""
        conversations = _conversations(messages)
        self.check_inference()
        return {"result": self.adapter.values(conversations)}
