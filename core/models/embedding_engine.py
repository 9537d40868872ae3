"""In-process sentence embeddings with sentence-transformers (the model behind ``service=embedding``)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from core.models.embedding_backends import check_backend, exported_forward
from core.models.loading import device_for, load_kwargs, model_label, model_path
from core.serving.cancel import check_abandoned


class InputTooLong(ValueError):
    """An input exceeds the model's maximum length and truncation was not allowed."""


def finish_vectors(vectors: np.ndarray, normalize: bool, dimensions: int | None) -> np.ndarray:
    """Keep the first ``dimensions`` components (Matryoshka-style), then L2-normalise if asked."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(vectors)


class EmbeddingEngine:
    """Embeds texts with a sentence-transformers model.

    Args:
        model: a model config node; ``name_or_path`` is a hub id or path
            (``sentence-transformers/all-MiniLM-L6-v2`` resolves to the packaged copy).
        gpus: 0 for the CPU, otherwise ``cuda``.
        max_batch_size: texts per forward pass.
        backend: ``torch``, or a faster CPU runtime of the same model (``onnx``, ``onnx-int8``,
            ``openvino``: ``core/models/embedding_backends.py``), exported once into the model's cache folder.
    """

    def __init__(self, model: Mapping, gpus: int = 0, max_batch_size: int = 32, backend: str = "torch"):
        from sentence_transformers import SentenceTransformer

        self.device = device_for(gpus)
        if not model.get("name_or_path"):
            raise ValueError("an embedding model needs `name_or_path` (e.g. sentence-transformers/all-MiniLM-L6-v2)")
        check_backend(backend, self.device)
        self.name = model_label(model)
        source = model_path(model)
        self.model = SentenceTransformer(
            source,
            device=str(self.device),
            model_kwargs=load_kwargs(model, self.device),
        )
        # TEI's normalize=false returns the pooled vectors as they are, so the model's own trailing
        # Normalize module goes; normalisation is then only ever finish_vectors' (normalize=true).
        last = list(self.model._modules)[-1]
        if type(self.model._modules[last]).__name__ == "Normalize":
            del self.model._modules[last]
        self.tokenizer = self.model.tokenizer
        self.max_input_length = int(self.model.max_seq_length)
        self.dimension = int(self.model.get_embedding_dimension())
        # Named instruction prefixes from the model's own config (e.g. Qwen3-Embedding's "query").
        self.prompts = dict(getattr(self.model, "prompts", None) or {})
        self.max_batch_size = max_batch_size
        self.backend = backend
        self._exported = (
            None
            if backend == "torch"
            else exported_forward(self.model, source, self.name, backend, model.get("cache_dir"))
        )
        self.forward_calls = 0
        self._lock = threading.Lock()

    def texts_of(self, inputs: str | list[str] | list[int] | list[list[int]]) -> list[str]:
        """The texts of a request's ``inputs``: a text, texts, or token ids (one input as a list of
        ids, several as a list of such lists), which are decoded with the model's tokenizer."""
        if isinstance(inputs, str):
            return [inputs]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        if not inputs or isinstance(inputs[0], str):
            return list(inputs)
        vocab = len(self.tokenizer)
        bad = [t for ids in inputs for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary (0 to {vocab - 1})")
        return self.tokenizer.batch_decode(inputs, skip_special_tokens=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included (what the model's length limit counts)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def check_lengths(self, texts: Sequence[str]) -> None:
        """Raise ``InputTooLong`` for the first text longer than the model accepts."""
        for i, n in enumerate(self.count_tokens(texts)):
            if n > self.max_input_length:
                raise InputTooLong(
                    f"input {i} has {n} tokens, more than the maximum {self.max_input_length}; "
                    "send truncate=true to cut it"
                )

    def _truncate_left(self, texts: Sequence[str], lengths: list[int]) -> list[str]:
        keep = self.max_input_length - 2  # room for [CLS] and [SEP]
        out = []
        for text, n in zip(texts, lengths, strict=True):
            if n <= self.max_input_length:
                out.append(text)
            else:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-keep:]
                out.append(self.tokenizer.decode(ids))
        return out

    def embed(
        self,
        texts: Sequence[str],
        normalize: bool = True,
        truncate: bool = True,
        truncation_direction: str = "right",
        dimensions: int | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """A ``(len(texts), dim)`` float32 array of embeddings.

        Raises ``InputTooLong`` when ``truncate`` is false and a text exceeds the model's limit,
        ``ValueError`` for a ``prompt_name`` the model does not define.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, dimensions or self.dimension), dtype=np.float32)
        if dimensions is not None and not 0 < dimensions <= self.dimension:
            raise ValueError(f"dimensions must be in [1, {self.dimension}], got {dimensions}")
        if prompt_name is not None and prompt_name not in self.prompts:
            raise ValueError(
                f"prompt_name {prompt_name!r} is not defined for model {self.name} "
                f"(it defines {sorted(self.prompts) or 'none'})"
            )
        if not truncate:
            self.check_lengths(texts)
        elif truncation_direction.lower() == "left":
            texts = self._truncate_left(texts, self.count_tokens(texts))
        # Longest first, max_batch_size at a time (as sentence-transformers orders them), so a
        # request whose client left stops between model calls (core.serving.cancel).
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        with self._lock:
            for start in range(0, len(order), self.max_batch_size):
                check_abandoned("embedding")
                part = order[start : start + self.max_batch_size]
                vectors[part] = self._forward([texts[i] for i in part], prompt_name)
            self.forward_calls += 1
        return finish_vectors(vectors, normalize, dimensions)

    def _forward(self, texts: list[str], prompt_name: str | None) -> np.ndarray:
        if self._exported is None:
            return self.model.encode(
                texts,
                batch_size=self.max_batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
                prompt_name=prompt_name,
            )
        # The prompt is prefixed and the texts cut to the model's length as encode() does.
        prefix = self.prompts[prompt_name] if prompt_name else ""
        return self._exported(self.model.preprocess([prefix + t for t in texts]))

    def info(self) -> dict:
        """Model facts in the shape of TEI's ``GET /info``."""
        return {
            "model_id": self.name,
            "model_sha": None,
            "model_dtype": "int8"
            if self.backend == "onnx-int8"
            else str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_input_length": self.max_input_length,
            "max_batch_tokens": self.max_input_length * self.max_batch_size,
            "max_client_batch_size": self.max_batch_size,
            "dimension": self.dimension,
        }
