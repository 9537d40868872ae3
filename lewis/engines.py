"""The two players in process: ``ListenerEngine`` (p(yes) per candidate image) and ``SpeakerEngine``
(a tagged description of a target image). The HTTP apps (``lewis.apps``) and clients
(``lewis.clients``) have the same ``score``/``batch_score`` and ``describe``/``batch_describe``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping, Sequence

import torch

from core.models.loading import device_for, has_random_weights
from core.serving.cancel import check_abandoned
from lewis.images import ImageStore
from lewis.vlm import ImagePatchCache, build_vlm, load_processor

SPEAKER_PROMPT = (
    "Describe this image so that a listener can pick it out among similar images. Answer as "
    "<thinking>your reasoning</thinking><coarse>a short caption</coarse><detailed>one sentence</detailed>."
)
TAGS = ("thinking", "coarse", "detailed")


def parse_description(text: str) -> dict:
    """The speaker's tags: ``{thinking, coarse, detailed}`` (``None`` for a missing or unclosed tag)."""
    out = {}
    for tag in TAGS:
        match = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
        out[tag] = match.group(1).strip() if match else None
    return out


class _VLMPlayer:
    """A VLM with its processor, behind one lock (one model call at a time)."""

    def __init__(self, model: Mapping, gpus: int, image_roots: Sequence[str], checkpoint: str | None = None):
        self.device = device_for(gpus)
        role = type(self).__name__.removesuffix("Engine").lower()
        self.random_weights = not checkpoint and has_random_weights(model, role)
        self.processor = load_processor(model)
        self.processor.image_processor = ImagePatchCache(self.processor.image_processor)
        self.model = build_vlm(model, self.processor, self.device, checkpoint)
        self.images = ImageStore(image_roots)
        self.model_calls = 0
        self._lock = threading.Lock()

    def _inputs(self, texts: list[str], images: list) -> dict:
        enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        # Only what the model's forward takes (the BERT-based tiny tokenizer adds token_type_ids).
        enc.pop("token_type_ids", None)
        return enc.to(self.device)

    def _chat(self, n_images: int, text: str) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )


class ListenerEngine(_VLMPlayer):
    """Scores each candidate image with p(yes) for a yes/no question about it.

    p(yes) = softmax over the logits of the ``yes`` and ``no`` tokens at the answer position, so
    p(yes) + p(no) = 1 for every candidate; ``predicted_index`` is the argmax.

    Args:
        model: a VLM config node (``conf/vlm``).
        batch_size: (image, question) pairs per model call (``LISTENER_BATCH_SIZE``).
        image_roots: folders candidate paths may point into.
        yes_token / no_token: the answer words whose logits are compared.
        max_candidates, max_question_chars: per-item limits, refused (400) before any image is read.
        max_pairs: (image, question) pairs one request may ask for, over all its items.
        checkpoint: a warm-up's checkpoint folder (``lewis.listener_checkpoint``) loaded over ``model``.
    """

    def __init__(
        self,
        model: Mapping,
        gpus: int = 0,
        batch_size: int = 5,
        image_roots: Sequence[str] = (),
        yes_token: str = "yes",
        no_token: str = "no",
        max_candidates: int = 64,
        max_question_chars: int = 4000,
        max_pairs: int = 1024,
        checkpoint: str | None = None,
    ):
        super().__init__(model, gpus, image_roots, checkpoint)
        self.batch_size = max(1, int(batch_size))
        self.limits = (int(max_candidates), int(max_question_chars))
        self.max_pairs = int(max_pairs)
        tok = self.processor.tokenizer
        self.yes_id, self.no_id = (tok.encode(w, add_special_tokens=False)[0] for w in (yes_token, no_token))

    @torch.inference_mode()
    def yes_probabilities(self, images: list, questions: list[str]) -> list[float]:
        """p(yes) for each (image, question) pair, ``batch_size`` pairs per model call."""
        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            check_abandoned("listener scoring")
            rendered = {q: self._chat(1, q) for q in set(questions[start : start + self.batch_size])}
            texts = [rendered[q] for q in questions[start : start + self.batch_size]]
            enc = self._inputs(texts, images[start : start + self.batch_size])
            with self._lock:
                # Only the answer position's logits: the vocabulary projection of every position
                # would cost more than the rest of the model.
                logits = self.model(**enc, logits_to_keep=1).logits[:, -1].float()
                self.model_calls += 1
            pair = torch.stack([logits[:, self.yes_id], logits[:, self.no_id]], dim=-1)
            out.extend(torch.softmax(pair, dim=-1)[:, 0].tolist())
        return out

    def validate(self, batch: Sequence[Mapping]) -> list[tuple[list[str], str, int]]:
        """The items as ``(paths, question, topk)``; ``ValueError`` naming the first bad field or
        a request over ``max_pairs`` (cheap: no image is read)."""
        items = [_score_item(i, item, *self.limits) for i, item in enumerate(batch)]
        pairs = sum(len(paths) for paths, _, _ in items)
        if pairs > self.max_pairs:
            raise ValueError(f"{pairs} (image, question) pairs in one request, more than the {self.max_pairs} allowed")
        return items

    def batch_score(self, batch: Sequence[Mapping]) -> dict:
        """``{results: [{yes_probabilities, predicted_index, topk_indices}], took}`` for the reference batch items."""
        started = time.perf_counter()
        items = self.validate(batch)
        images, questions = [], []
        for paths, question, _topk in items:
            images.extend(self.images.load(p) for p in paths)
            questions.extend([question] * len(paths))
        probs = self.yes_probabilities(images, questions)
        results, start = [], 0
        for paths, _question, topk in items:
            p = probs[start : start + len(paths)]
            start += len(paths)
            order = sorted(range(len(p)), key=lambda i: -p[i])
            results.append({"yes_probabilities": p, "predicted_index": order[0], "topk_indices": order[:topk]})
        return {"results": results, "took": round(time.perf_counter() - started, 4)}

    def score(self, candidate_paths: Sequence[str], question: str, topk: int = 1) -> dict:
        """One item: ``{yes_probabilities, predicted_index, topk_indices}``."""
        item = {"candidate_paths": list(candidate_paths), "question": question, "topk": topk}
        return self.batch_score([item])["results"][0]


def _score_item(index: int, item: Mapping, max_candidates: int, max_question_chars: int) -> tuple[list[str], str, int]:
    paths, question, topk = item.get("candidate_paths"), item.get("question"), item.get("topk", 1)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"item {index}: candidate_paths must be a non-empty list of strings")
    if len(paths) > max_candidates:
        raise ValueError(f"item {index}: {len(paths)} candidate_paths, more than the {max_candidates} allowed")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"item {index}: question must be a non-empty string")
    if len(question) > max_question_chars:
        raise ValueError(f"item {index}: question longer than the {max_question_chars} characters allowed")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= len(paths):
        raise ValueError(f"item {index}: topk must be an integer between 1 and {len(paths)}")
    return paths, question, topk


class SpeakerEngine(_VLMPlayer):
    """Writes ``<thinking>…</thinking><coarse>…</coarse><detailed>…</detailed>`` for a target image.

    Args:
        model: a VLM config node; prompt: the instruction; max_new_tokens, temperature (0 = greedy);
        checkpoint: a warm-up's checkpoint folder (``lewis.speaker_checkpoint``) loaded over ``model``.
    """

    def __init__(
        self,
        model: Mapping,
        gpus: int = 0,
        image_roots: Sequence[str] = (),
        prompt: str = SPEAKER_PROMPT,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        batch_size: int = 8,
        max_prompt_chars: int = 4000,
        checkpoint: str | None = None,
    ):
        super().__init__(model, gpus, image_roots, checkpoint)
        self.prompt, self.max_new_tokens, self.temperature = prompt, max_new_tokens, temperature
        self.max_prompt_chars = int(max_prompt_chars)
        self.batch_size = max(1, int(batch_size))

    @torch.inference_mode()
    def _generate(self, images: list, prompts: list[str]) -> list[str]:
        texts = []
        for start in range(0, len(images), self.batch_size):
            enc = self._inputs(
                [self._chat(1, p) for p in prompts[start : start + self.batch_size]],
                images[start : start + self.batch_size],
            )
            sampling = self.temperature > 0
            kwargs = {"do_sample": sampling, "max_new_tokens": self.max_new_tokens}
            if sampling:
                kwargs.update(temperature=self.temperature, top_k=0, top_p=1.0)
            with self._lock:
                out = self.model.generate(**enc, **kwargs)
                self.model_calls += 1
            texts.extend(self.processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        return texts

    def validate(self, batch: Sequence[Mapping]) -> list[tuple[str, str]]:
        """The items as ``(image ref, prompt)``; ``ValueError`` naming the first bad field (no image is read)."""
        items = []
        for i, item in enumerate(batch):
            ref, prompt = item.get("image_path"), item.get("prompt") or self.prompt
            if not isinstance(ref, str) or not ref or not isinstance(prompt, str):
                raise ValueError(f"item {i}: image_path (a path or data URI) and prompt must be strings")
            if len(prompt) > self.max_prompt_chars:
                raise ValueError(f"item {i}: prompt longer than the {self.max_prompt_chars} characters allowed")
            items.append((ref, prompt))
        return items

    def batch_describe(self, batch: Sequence[Mapping]) -> dict:
        """``{results: [{text, thinking, coarse, detailed}], took}`` for items ``{image_path, prompt?}``."""
        started = time.perf_counter()
        items = self.validate(batch)
        images = [self.images.load(ref) for ref, _ in items]
        prompts = [prompt for _, prompt in items]
        texts = self._generate(images, prompts)
        results = [{"text": t, **parse_description(t)} for t in texts]
        return {"results": results, "took": round(time.perf_counter() - started, 4)}

    def describe(self, image_path: str, prompt: str | None = None) -> dict:
        """One image: ``{text, thinking, coarse, detailed}``."""
        return self.batch_describe([{"image_path": image_path, "prompt": prompt}])["results"][0]
