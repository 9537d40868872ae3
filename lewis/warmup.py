"""Supervised warm-up of the Lewis players (``train=listener_warmup`` | ``train=speaker_warmup``),
so that the game starts from players that see: no vision-language weights ship offline, and a
random listener makes the speaker's reward a coin toss.

- The listener learns the yes/no match of (image, description) on every candidate of the
  training games: "yes" for the target with its ground-truth description, "no" for each
  distractor with it. The loss is the cross-entropy of the answer token, read at the position
  where ``ListenerEngine`` reads p(yes) vs p(no). ``warmup.captions`` adds captioning of the
  targets, a denser signal for a model that starts from nothing.
- The speaker learns to write the three tagged fields for the target image. ``warmup.omit``
  (``{attribute: p}``) leaves room for GRPO: with probability p an example leaves that
  attribute out, so the warmed-up speaker often says less than the listener needs, and the
  listener's reward has something to teach.

Both are transformers' ``Trainer`` (accelerate, DeepSpeed, checkpoints and logging as in any
fine-tune) over the policy's chat template; the model is saved to ``<run dir>/checkpoint``,
which ``lewis.listener_checkpoint`` / ``lewis.speaker_checkpoint`` load. A tiny model from
``conf/vlm`` trains all its weights from scratch; a real one (``warmup.lora=true``) trains a LoRA
adapter, saved the same way and merged on load.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from core.config_errors import check_writable_dir
from core.models.loading import device_for
from lewis.engines import SPEAKER_PROMPT, ListenerEngine, SpeakerEngine, parse_description
from lewis.images import DecodedImages
from lewis.rewards import QUESTION, spoken_description
from lewis.vision_warmup import AttributeProbe, ImageCollator, attribute_classes, target_examples
from lewis.vlm import build_vlm, load_processor

log = logging.getLogger(__name__)

CAPTION_PROMPT = "Describe this image."


def as_sentence(description: str) -> str:
    """``description`` as one sentence ("a blue circle" -> "A blue circle."): what the speaker's
    ``<detailed>`` field says and so what the listener hears in the game."""
    return description[:1].upper() + description[1:].rstrip(".") + "."


def speaker_reply(description: str) -> str:
    """The tagged reply the speaker is taught for ``description``."""
    sentence = as_sentence(description)
    return f"<thinking>{description}</thinking><coarse>{description}</coarse><detailed>{sentence}</detailed>"


def omit_attributes(game: Mapping, omit: Mapping[str, float], rng: random.Random) -> str:
    """The game's description without, for each attribute in ``omit``, its value (with that
    probability): "a teal rectangle" -> "a rectangle" (colour) or "a teal" (shape). What is left
    is never wrong, so the speaker still learns to see the value from the other examples, and
    learns to leave it out as often."""
    text = game["description"]
    for name, p in omit.items():
        value = (game.get("attributes") or {}).get(name)
        if isinstance(value, str) and rng.random() < float(p):
            text = re.sub(rf"\s*\b{re.escape(value)}\b", "", text, count=1, flags=re.IGNORECASE).strip()
    return text


def listener_examples(games: Sequence[Mapping], question: str = QUESTION) -> list[dict]:
    """Every candidate of every game with the game's description (as the speaker says it): ``no`` for each distractor,
    ``yes`` for the target, repeated as often (the classes balanced: the "no" prior alone would
    otherwise fit three quarters of the pairs)."""
    out = []
    for g in games:
        asked = question.format(description=as_sentence(g["description"]))
        for i, path in enumerate(g["candidates"]):
            if i == g["target_index"]:
                out += [{"image": path, "prompt": asked, "answer": "yes"}] * (len(g["candidates"]) - 1)
            else:
                out.append({"image": path, "prompt": asked, "answer": "no"})
    return out


def caption_examples(games: Sequence[Mapping], repeats: int, prompt: str = CAPTION_PROMPT) -> list[dict]:
    """Each game's target captioned with its description, ``repeats`` times: the listener's
    auxiliary task. A yes/no answer carries one bit about the pairing, so a model that starts
    from nothing learns from it alone to see only slowly; naming the colour and shape is a denser
    signal that trains the same vision tower and the same word embeddings."""
    return [
        {"image": g["candidates"][g["target_index"]], "prompt": prompt, "answer": g["description"]} for g in games
    ] * repeats


def speaker_examples(games: Sequence[Mapping], omit: Mapping[str, float], seed: int, prompt: str = SPEAKER_PROMPT):
    """Each game's target with the tagged reply for its description (attributes left out as ``omit`` says)."""
    rng = random.Random(seed)
    return [
        {
            "image": g["candidates"][g["target_index"]],
            "prompt": prompt,
            "answer": speaker_reply(omit_attributes(g, omit, rng)),
        }
        for g in games
    ]


class ChatCollator:
    """Batches ``{image, prompt, answer}`` examples for the model: the chat-templated user turn
    (one image and the prompt) and the assistant's answer, left-padded (as the players run), with
    labels on the answer's tokens only; every row's answer thus ends in the last column."""

    def __init__(self, processor):
        self.processor = processor
        self.images = DecodedImages()

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        images = [self.images[e["image"]] for e in examples]
        users = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e["prompt"]}]}] for e in examples
        ]
        template = self.processor.apply_chat_template
        prompts = [template(u, add_generation_prompt=True, tokenize=False) for u in users]
        full = [
            template([*u, {"role": "assistant", "content": e["answer"]}], tokenize=False)
            for u, e in zip(users, examples, strict=True)
        ]
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = self.processor(text=full, images=images, return_tensors="pt", padding=True)
            # the answer is what the whole turn has beyond the prompt (each image's patch tokens,
            # which the processor adds, are in both)
            answer_tokens = tok(full, padding=True, return_tensors="pt")["attention_mask"].sum(1) - tok(
                prompts, padding=True, return_tensors="pt"
            )["attention_mask"].sum(1)
        finally:
            tok.padding_side = side
        enc.pop("token_type_ids", None)
        labels = enc["input_ids"].clone()
        columns = torch.arange(labels.shape[1])[None]
        labels[columns < labels.shape[1] - answer_tokens[:, None]] = -100
        enc["labels"] = labels
        return dict(enc)


def answer_loss(model, inputs: dict) -> torch.Tensor:
    """The mean cross-entropy of the answer tokens, with logits for the last columns only (where
    left padding puts every answer): the vocabulary projection of every position would cost more
    than the rest of a small model's step."""
    labels = inputs.pop("labels")
    width = labels.shape[1] - int((labels != -100).any(0).nonzero()[0])
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels[:, -width:].flatten(), ignore_index=-100
    )


def _trainer_args(cfg, run_dir: Path, **overrides):
    from transformers import TrainingArguments

    node = {**OmegaConf.to_container(cfg.warmup.trainer, resolve=True), **overrides}
    return TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        **node,
        seed=int(cfg.seed),
        report_to=[],
        remove_unused_columns=False,
        save_strategy="no",
        use_cpu=not (torch.cuda.is_available() and int(cfg.gpus) > 0),
    )


def _losses(trainer) -> list[dict]:
    return [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]


def warm_up_vision(cfg, model, processor, games: Sequence[Mapping], run_dir: Path) -> dict | None:
    """``lewis.vision_warmup`` on ``model`` in place, for ``warmup.vision.max_steps`` steps (the
    rest of ``warmup.vision`` overrides ``warmup.trainer``), when the model starts from nothing
    (no ``vlm.name_or_path``, no ``warmup.start_from``: a pretrained tower is left as it is) and
    the games name attributes. Returns the losses and each attribute's accuracy on the targets
    of the test games, or None when skipped."""
    from transformers import Trainer

    node = OmegaConf.to_container(cfg.warmup.get("vision") or OmegaConf.create({}), resolve=True)
    classes = attribute_classes(games)
    if int(node.get("max_steps", 0)) <= 0 or not classes or cfg.vlm.get("name_or_path") or cfg.warmup.get("start_from"):
        return None
    started = time.perf_counter()
    probe = AttributeProbe(model, classes)
    collator = ImageCollator(processor.image_processor)
    trainer = Trainer(
        model=probe,
        args=_trainer_args(cfg, run_dir / "vision", **node),
        train_dataset=target_examples(games, classes),
        data_collator=collator,
    )
    trainer.train()
    test = target_examples(held_out_games(cfg.dataset, cfg.warmup.eval_games), classes)
    accuracy = probe.eval().accuracy(collator(test[i : i + 64]) for i in range(0, len(test), 64))
    log.info("vision warm-up: test accuracy %s", accuracy)
    model.train()
    return {"test_accuracy": accuracy, "seconds": round(time.perf_counter() - started, 1), "losses": _losses(trainer)}


def train_player(cfg, examples: list[dict], run_dir: Path, games: Sequence[Mapping] = ()) -> tuple[Path, dict]:
    """Fine-tune ``cfg.vlm`` (or the checkpoint ``warmup.start_from``) on ``examples``, after the
    vision warm-up on ``games`` (``warm_up_vision``); the model (or LoRA adapter) is saved to
    ``run_dir/checkpoint``. Returns that folder and the training log (losses, vision warm-up)."""
    from transformers import Trainer

    from core.training.grpo import lora_config

    class AnswerTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return answer_loss(model, inputs)

    processor = load_processor(cfg.vlm)
    model = build_vlm(cfg.vlm, processor, device_for(int(cfg.gpus)), cfg.warmup.get("start_from")).train()
    vision = warm_up_vision(cfg, model, processor, games, run_dir)
    if cfg.warmup.get("lora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg.lora))
    trainer = AnswerTrainer(
        model=model,
        args=_trainer_args(cfg, run_dir),
        train_dataset=examples,
        data_collator=ChatCollator(processor),
    )
    trainer.train()
    checkpoint = run_dir / "checkpoint"
    trainer.save_model(str(checkpoint))
    return checkpoint, {"losses": _losses(trainer), "vision_warmup": vision}


def listener_accuracy(listener, games: Sequence[Mapping], question: str = QUESTION) -> float:
    """The share of ``games`` in which ``listener`` (any ``Listener``) picks the target from the
    ground-truth description."""
    batch = [
        {"candidate_paths": g["candidates"], "question": question.format(description=as_sentence(g["description"]))}
        for g in games
    ]
    results = listener.batch_score(batch)["results"]
    return sum(r.get("predicted_index") == g["target_index"] for r, g in zip(results, games, strict=True)) / len(games)


def naming_rates(descriptions: Sequence[str], games: Sequence[Mapping]) -> dict[str, float]:
    """For each text attribute, the share of ``descriptions`` that name the target's value."""
    names = sorted({n for g in games for n, v in (g.get("attributes") or {}).items() if isinstance(v, str)})
    rates = {}
    for name in names:
        hits = [
            bool(re.search(rf"\b{re.escape(g['attributes'][name])}", d.lower()))
            for d, g in zip(descriptions, games, strict=True)
            if isinstance((g.get("attributes") or {}).get(name), str)
        ]
        rates[name] = sum(hits) / max(1, len(hits))
    return rates


def held_out_games(dataset, count: int) -> list[dict]:
    """The first ``count`` test games of ``dataset`` (a ``conf/dataset`` node)."""
    return instantiate(OmegaConf.merge(dataset, {"split": "test"}))[: int(count)]


def run_listener_warmup(cfg) -> dict:
    """Entry point of ``python run.py train=listener_warmup``: the listener's yes/no warm-up,
    then its accuracy on the dataset's test games (``listener_warmup.json``)."""
    run_dir = check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    started = time.perf_counter()
    games = instantiate(cfg.dataset)
    examples = listener_examples(games) + caption_examples(games, int(cfg.warmup.get("captions") or 0))
    checkpoint, training = train_player(cfg, examples, run_dir, games)
    seconds = time.perf_counter() - started
    listener = _listener(cfg, str(checkpoint))
    test = held_out_games(cfg.dataset, cfg.warmup.eval_games)
    result = {
        "checkpoint": str(checkpoint),
        "test_games": len(test),
        "test_accuracy": listener_accuracy(listener, test),
        "chance": sum(1 / len(g["candidates"]) for g in test) / len(test),
        "train_accuracy": listener_accuracy(listener, games[: len(test)]),
        "train_seconds": round(seconds, 1),
        **training,
    }
    (run_dir / "listener_warmup.json").write_text(json.dumps(result, indent=2))
    log.info("listener warm-up: %.1f%% of %d test games in %.0f s", 100 * result["test_accuracy"], len(test), seconds)
    return result


def speaker_report(speaker, games: Sequence[Mapping], listener=None) -> dict:
    """The speaker's descriptions of the test targets: the share with all three tags, the share
    naming each attribute, and (with a listener) the listener's accuracy from them."""
    results = speaker.batch_describe([{"image_path": g["candidates"][g["target_index"]]} for g in games])["results"]
    spoken = [spoken_description(r["text"]) for r in results]
    report = {
        "format": sum(all(v is not None for v in parse_description(r["text"]).values()) for r in results) / len(games),
        "names": naming_rates(spoken, games),
        "examples": [{"target": g["description"], "said": r["text"]} for g, r in zip(games[:5], results, strict=False)],
    }
    if listener is not None:
        played = [{**g, "description": d} for g, d in zip(games, spoken, strict=True)]
        report["listener_accuracy"] = listener_accuracy(listener, played)
    return report


def _listener(cfg, checkpoint: str) -> ListenerEngine:
    return ListenerEngine(
        cfg.vlm, int(cfg.gpus), batch_size=32, image_roots=cfg.lewis.image_roots, checkpoint=checkpoint
    )


def evaluate_speaker(cfg, checkpoint: str, listener_checkpoint: str | None, games: int, temperature: float) -> dict:
    """``speaker_report`` of the speaker at ``checkpoint`` (a warm-up's model or a GRPO adapter) on
    the first ``games`` test games, sampled at ``temperature``, with the listener at
    ``listener_checkpoint`` when one is given."""
    speaker = SpeakerEngine(
        cfg.vlm,
        int(cfg.gpus),
        cfg.lewis.image_roots,
        max_new_tokens=48,
        temperature=temperature,
        batch_size=32,
        checkpoint=checkpoint,
    )
    listener = _listener(cfg, listener_checkpoint) if listener_checkpoint else None
    return speaker_report(speaker, held_out_games(cfg.dataset, games), listener)


def run_speaker_warmup(cfg) -> dict:
    """Entry point of ``python run.py train=speaker_warmup``: the speaker's tagged-description
    warm-up, then its descriptions of the test targets (``speaker_warmup.json``; the listener's
    accuracy from them when ``lewis.listener_checkpoint`` is set)."""
    run_dir = check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    started = time.perf_counter()
    games = instantiate(cfg.dataset)
    examples = speaker_examples(games, cfg.warmup.get("omit") or {}, int(cfg.seed))
    checkpoint, training = train_player(cfg, examples, run_dir, games)
    seconds = time.perf_counter() - started
    temperature = float(cfg.warmup.get("temperature", 1.0))
    test = evaluate_speaker(
        cfg, str(checkpoint), cfg.lewis.get("listener_checkpoint"), cfg.warmup.eval_games, temperature
    )
    result = {"checkpoint": str(checkpoint), "train_seconds": round(seconds, 1), "test": test, **training}
    (run_dir / "speaker_warmup.json").write_text(json.dumps(result, indent=2))
    log.info("speaker warm-up in %.0f s: %s", seconds, {k: v for k, v in result["test"].items() if k != "examples"})
    return result
