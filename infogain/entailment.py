"""Entailment scorers: ``probs(pairs) -> (n, 3)`` arrays of (entail, neutral, contradict) for x ⇒ y.

* ``NLIEntailment``: an MNLI-style sequence classifier (DeBERTa-v2 for real runs; a tiny random
  one built from config offline), its label order read from the model's ``id2label``;
* ``EmbeddingEntailment``: cosine similarity mapped to [0, 1] as P(entail), the rest contradiction
  (meaningful offline with the packaged MiniLM);
* ``ExactEntailment``: 1.0 on a normalised exact match, else contradiction.

``PairCache`` wraps any of them for one item: identical pairs are scored once, missing ones in
chunks of ``chunk_size``, and ``checked`` counts the pairs that reached the model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from core.models.loading import device_for, has_random_weights, load_kwargs, model_path, packaged_tokenizer
from core.models.protocols import Embedder
from core.rewards.builtin import normalize_answer
from infogain.measure import CONTRADICT, ENTAIL

Pair = tuple[str, str]


def _label_index(id2label: Mapping) -> list[int]:
    """Model output column of each of (entail, neutral, contradict), from the config's labels."""
    by_name = {str(name).lower(): int(i) for i, name in id2label.items()}
    try:
        return [by_name["entailment"], by_name["neutral"], by_name["contradiction"]]
    except KeyError:
        raise ValueError(f"an NLI model needs entailment/neutral/contradiction labels, has {id2label}") from None


class NLIEntailment:
    """MNLI-style classifier; ``model.name_or_path`` null builds a tiny random DeBERTa-v2."""

    def __init__(self, model: Mapping, gpus: int = 0, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

        self.device = device_for(gpus)
        self.random_weights = has_random_weights(model, "entailment")
        if model.get("name_or_path"):
            self.tokenizer = AutoTokenizer.from_pretrained(model_path(model))
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path(model), **load_kwargs(model, self.device)
            )
        else:
            from transformers import DebertaV2ForSequenceClassification

            torch.manual_seed(int(model.get("seed", 0)))
            self.tokenizer = packaged_tokenizer()
            config = DebertaV2Config(
                vocab_size=len(self.tokenizer),
                num_labels=3,
                id2label=dict(model.get("id2label") or {}),
                label2id={v: k for k, v in dict(model.get("id2label") or {}).items()},
                **dict(model.get("tiny") or {}),
            )
            self.model = DebertaV2ForSequenceClassification(config)
        self.model.to(self.device).eval()
        self.columns = _label_index(self.model.config.id2label)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @torch.inference_mode()
    def probs(self, pairs: Sequence[Pair]) -> np.ndarray:
        """(entail, neutral, contradict) probabilities for each (premise, hypothesis)."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            part = pairs[start : start + self.batch_size]
            enc = self.tokenizer(
                [p for p, _ in part],
                [h for _, h in part],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=512,
            ).to(self.device)
            with self._lock:
                logits = self.model(**enc).logits.float()
            out.append(torch.softmax(logits, dim=-1)[:, self.columns].cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 3))


class EmbeddingEntailment:
    """P(x ⇒ y) = (cos(e(x), e(y)) + 1) / 2, the rest contradiction; symmetric by construction.

    Each text is embedded once: clustering asks about one pair at a time, each text against
    every cluster representative, so without the cache the same texts were embedded again for
    every pair (the last ``cache_size`` texts' vectors are kept).
    """

    def __init__(self, embedder: Embedder, cache_size: int = 8192):
        self.embedder = embedder
        self.cache_size = cache_size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def probs(self, pairs: Sequence[Pair]) -> np.ndarray:
        vectors = self._vectors_of(list(dict.fromkeys(t for pair in pairs for t in pair)))
        out = np.zeros((len(pairs), 3))
        for i, (x, y) in enumerate(pairs):
            p = (float(np.dot(vectors[x], vectors[y])) + 1.0) / 2.0
            out[i, ENTAIL], out[i, CONTRADICT] = p, 1.0 - p
        return out

    def warm(self, texts: Sequence[str]) -> None:
        """Embed the texts not cached yet, all in one call (the engine passes a whole batch's)."""
        self._vectors_of(list(dict.fromkeys(texts)))

    def _vectors_of(self, texts: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            found = {t: self._vectors[t] for t in texts if t in self._vectors}
        missing = [t for t in texts if t not in found]
        if missing:
            found.update(zip(missing, self.embedder.embed(missing, normalize=True), strict=True))
            with self._lock:
                self._vectors.update((t, found[t]) for t in missing)
                while len(self._vectors) > self.cache_size:
                    self._vectors.popitem(last=False)
        return found


class ExactEntailment:
    """Entailment exactly when the normalised texts are equal (SQuAD normalisation)."""

    def probs(self, pairs: Sequence[Pair]) -> np.ndarray:
        out = np.zeros((len(pairs), 3))
        for i, (x, y) in enumerate(pairs):
            out[i, ENTAIL if normalize_answer(x) == normalize_answer(y) else CONTRADICT] = 1.0
        return out


class PairCache:
    """One item's entailment lookups: deduplicated, cached, scored in chunks, counted."""

    def __init__(self, scorer, chunk_size: int = 8, prefix: str = ""):
        self.scorer, self.chunk_size, self.prefix = scorer, chunk_size, prefix
        self.cache: dict[Pair, np.ndarray] = {}
        self.checked = 0

    def prefetch(self, pairs: Sequence[Pair]) -> None:
        """Score every pair not seen yet, ``chunk_size`` at a time."""
        missing = [p for p in dict.fromkeys(pairs) if p not in self.cache]
        for start in range(0, len(missing), self.chunk_size):
            part = missing[start : start + self.chunk_size]
            # The question is prefixed to both texts (engine.entailment_prefix).
            scored = self.scorer.probs([(self.prefix + x, self.prefix + y) for x, y in part])
            self.cache.update(zip(part, scored, strict=True))
            self.checked += len(part)

    def __call__(self, x: str, y: str) -> np.ndarray:
        """The (entail, neutral, contradict) triple for x ⇒ y, scoring it now if needed."""
        if (x, y) not in self.cache:
            self.prefetch([(x, y)])
        return self.cache[(x, y)]

    def entail(self, xs: Sequence[str], ys: Sequence[str]) -> np.ndarray:
        """The (len(xs), len(ys)) matrix of P(x ⇒ y)."""
        self.prefetch([(x, y) for x in xs for y in ys])
        return np.array([[self.cache[(x, y)][ENTAIL] for y in ys] for x in xs]).reshape(len(xs), len(ys))
