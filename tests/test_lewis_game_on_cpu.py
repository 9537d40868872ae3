"""The Lewis game for real: easy-VQA's games, the players' warm-ups and their checkpoints, and the
whole game (warm-ups, then speaker GRPO) as experiment=lewis_cpu runs it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from core.serving.local_server import ROOT
from lewis.easy_vqa import COLOURS, SHAPES, easy_vqa, image_labels, make_games
from lewis.engines import ListenerEngine, SpeakerEngine
from lewis.rewards import QUESTION
from lewis.warmup import ChatCollator, answer_loss, as_sentence, listener_examples, omit_attributes, speaker_reply


def test_image_labels_follow_from_the_question_answer_pairs():
    questions = [
        ["what shape is in the image?", "circle", 1],
        ["is there a red shape?", "no", 1],
        ["is there not a blue shape?", "no", 1],  # so blue
        ["what color is the shape?", "teal", 2],
        ["is there a triangle?", "no", 2],
        ["is there not a circle?", "yes", 2],  # rectangle is all that is left
        ["is there a circle?", "no", 3],  # shape open: circle ruled out only
        ["what color is the shape?", "green", 3],
    ]
    assert image_labels(questions) == {1: ("circle", "blue"), 2: ("rectangle", "teal")}


def test_easy_vqa_games_use_its_own_split_and_are_deterministic(tmp_path):
    train = easy_vqa(str(tmp_path / "a"), games=40, test_games=12, seed=1)
    test = easy_vqa(str(tmp_path / "a"), games=40, test_games=12, seed=1, split="test")
    again = easy_vqa(str(tmp_path / "b"), games=40, test_games=12, seed=1)
    assert len(train) == 40 and len(test) == 12
    assert [g["description"] for g in train] == [g["description"] for g in again]
    for split, games in (("train", train), ("test", test)):
        for g in games:
            assert len(g["candidates"]) == 4 and all(f"/images/{split}_" in c for c in g["candidates"])
            attrs = g["attributes"]
            assert attrs["shape"] in SHAPES and attrs["colour"] in COLOURS
            assert g["description"] == f"a {attrs['colour']} {attrs['shape']}"
    with pytest.raises(ValueError, match="splits"):
        easy_vqa(str(tmp_path / "a"), games=40, test_games=12, seed=1, split="val")


def test_distractors_differ_from_the_target_and_from_each_other():
    labels = {i: (SHAPES[i % 3], COLOURS[(i // 3) % 8]) for i in range(240)}
    for game in make_games(labels, 50, 3, random.Random(0)):
        seen = [labels[int(c)] for c in game["candidates"]]
        assert len(set(seen)) == 4 and seen[game["target_index"]] == (
            game["attributes"]["shape"],
            game["attributes"]["colour"],
        )


def test_warmup_examples_balance_the_listener_and_leave_the_speaker_room(tmp_path):
    games = easy_vqa(str(tmp_path), games=40, test_games=4, seed=0)
    examples = listener_examples(games)
    answers = [e["answer"] for e in examples]
    assert answers.count("yes") == answers.count("no") == 3 * len(games)
    heard = QUESTION.format(description=as_sentence(games[0]["description"]))  # as the speaker says it
    assert heard.endswith(".? Answer yes or no.") and all(e["prompt"] == heard for e in examples[:6])
    rng = random.Random(0)
    said = [omit_attributes(g, {"colour": 0.5}, rng) for g in games]
    left_out = [s == f"a {g['attributes']['shape']}" for s, g in zip(said, games, strict=True)]
    assert 0.2 < sum(left_out) / len(games) < 0.8
    assert all(s == g["description"] for s, g, out in zip(said, games, left_out, strict=True) if not out)  # never wrong
    assert omit_attributes(games[0], {"shape": 1.0, "colour": 1.0}, rng) == "a"  # the last word too
    assert speaker_reply("a red circle") == (
        "<thinking>a red circle</thinking><coarse>a red circle</coarse><detailed>A red circle.</detailed>"
    )


def test_the_collator_labels_the_answer_alone_and_the_loss_reads_it(tmp_path):
    from lewis.vlm import build_vlm, load_processor

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vlm/tiny_vl.yaml"))
    games = easy_vqa(str(tmp_path), games=4, test_games=4, seed=0)
    processor = load_processor(cfg)
    examples = listener_examples(games[:1]) + [
        {"image": games[0]["candidates"][0], "prompt": "Describe.", "answer": speaker_reply("a red circle")}
    ]
    batch = ChatCollator(processor)(examples)
    tok = processor.tokenizer
    for row, example in zip(batch["labels"], examples, strict=True):
        said = tok.convert_ids_to_tokens(row[row != -100])
        assert said == [*tok.tokenize(example["answer"]), "<|im_end|>"]
        assert (row[-len(said) :] != -100).all()  # left padding: every answer ends in the last column
    model = build_vlm(cfg, processor, torch.device("cpu"))
    with torch.no_grad():
        loss = answer_loss(model, dict(batch))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert loss == pytest.approx(expected.item(), rel=1e-4)


def test_the_vision_warmup_teaches_the_tower_the_attributes(tmp_path):
    """The probe's heads read what the tower learns: a few steps on 32 targets take the loss down
    and the colours (which a tower from scratch learns first) well above chance."""
    from lewis.vision_warmup import AttributeProbe, ImageCollator, attribute_classes, target_examples
    from lewis.vlm import build_vlm, load_processor

    games = easy_vqa(str(tmp_path), games=32, test_games=4, seed=0)
    classes = attribute_classes(games)
    assert set(classes) == {"shape", "colour"} and set(classes["shape"]) <= set(SHAPES)
    odd = {**games[0], "attributes": {"shape": "hexagon", "colour": "red"}}
    examples = target_examples([*games, odd], classes)
    assert len(examples) == 32  # a value the classes lack is left out
    assert attribute_classes([*games, {**games[0], "attributes": {}}]) == {}  # shared by every game only

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vlm/small_vl.yaml"))
    processor = load_processor(cfg)
    torch.manual_seed(0)
    probe = AttributeProbe(build_vlm(cfg, processor, torch.device("cpu")).train(), classes)
    batch = ImageCollator(processor.image_processor)(examples)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = probe(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    accuracy = probe.eval().accuracy([batch])
    assert losses[-1] < 0.5 * losses[0] and accuracy["colour"] >= 0.75, (losses[::10], accuracy)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in probe.vlm.model.visual.parameters())


def test_players_load_a_warmup_checkpoint_and_a_grpo_adapter_trained_on_it(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from lewis.vlm import build_vlm, load_processor

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vlm/tiny_vl.yaml"))
    games = easy_vqa(str(tmp_path / "games"), games=2, test_games=2, seed=0)
    images, roots = games[0]["candidates"], [str(tmp_path / "games")]
    question = "Does this image match the description: A red circle.? Answer yes or no."
    processor = load_processor(cfg)
    trained = build_vlm(cfg, processor, torch.device("cpu"))
    with torch.no_grad():  # what a warm-up changes: here, the answer the model reads out
        trained.lm_head.weight.add_(torch.randn_like(trained.lm_head.weight))
    trained.save_pretrained(tmp_path / "checkpoint")

    def p_yes(listener_or_model):
        listener = ListenerEngine(cfg, image_roots=roots, checkpoint=str(tmp_path / "checkpoint"))
        if not isinstance(listener_or_model, ListenerEngine):
            listener.model = listener_or_model.eval()
        else:
            listener = listener_or_model
        return listener.batch_score([{"candidate_paths": images, "question": question}])["results"][0][
            "yes_probabilities"
        ]

    loaded = ListenerEngine(cfg, image_roots=roots, checkpoint=str(tmp_path / "checkpoint"))
    untrained = ListenerEngine(cfg, image_roots=roots)
    assert untrained.random_weights and not loaded.random_weights  # the loud warning stays for random players
    assert p_yes(loaded) == pytest.approx(p_yes(trained), abs=1e-6)
    assert p_yes(untrained) != pytest.approx(p_yes(loaded), abs=1e-3)

    # GRPO trains a LoRA adapter on the warm-up's model and saves the adapter alone
    base = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "checkpoint"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(base, lora)
    tuned.save_pretrained(tmp_path / "adapter")
    adapted = ListenerEngine(cfg, image_roots=roots, checkpoint=str(tmp_path / "adapter"))
    assert p_yes(adapted) == pytest.approx(p_yes(tuned.merge_and_unload()), abs=1e-5)
    assert p_yes(adapted) != pytest.approx(p_yes(loaded), abs=1e-4)
    speaker = SpeakerEngine(
        cfg, image_roots=roots, checkpoint=str(tmp_path / "adapter"), max_new_tokens=4, temperature=0
    )
    assert not speaker.random_weights and isinstance(speaker.describe(images[0])["text"], str)
    with pytest.raises(FileNotFoundError, match="warm-up"):
        ListenerEngine(cfg, image_roots=roots, checkpoint=str(tmp_path / "missing"))


@pytest.mark.slow
def test_the_whole_game_runs_and_the_warmed_up_listener_sees(tmp_path):
    """experiment=lewis_cpu, sized down: the listener's warm-up beats chance on held-out test
    images, the speaker's warm-up and GRPO against the served listener run from the warm-ups'
    checkpoints, the predictions log shows what was said and chosen, and the served listener
    chooses as the embedded one does."""
    from conftest import run_cli
    from core.serving.local_server import LocalServer
    from lewis.clients import ListenerClient

    root, run_dir = tmp_path / "easy_vqa", tmp_path / "run"
    run = run_cli(
        "experiment=lewis_cpu",
        f"lewis.easy_vqa_root={root}",
        "dataset.games=300",
        "dataset.test_games=60",
        "game.listener=remote",
        "game.eval_games=16",
        'game.listener_warmup=["warmup.vision.max_steps=600","warmup.trainer.max_steps=200","warmup.eval_games=60"]',
        'game.speaker_warmup=["warmup.trainer.max_steps=10","warmup.eval_games=8"]',
        'game.speaker=["trainer.max_steps=2","trainer.per_device_train_batch_size=8","trainer.num_generations=4","trainer.max_completion_length=48"]',
        f"hydra.run.dir={run_dir}",
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    summary = json.loads((run_dir / "game.json").read_text())
    listener = summary["listener"]
    assert listener["test_games"] == 60 and listener["test_accuracy"] >= listener["chance"] + 0.2, listener
    assert summary["speaker_grpo"]["steps"] == 2 and set(summary["speaker_after_grpo"]["names"]) == {"shape", "colour"}
    predictions = [
        json.loads(line) for line in (run_dir / "speaker" / "lewis_predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 16 and all(r["error"] is None for r in predictions)
    assert all(r["description"] and r["predicted_index"] in range(4) for r in predictions)
    assert (run_dir / "speaker" / "adapter" / "adapter_config.json").is_file()

    checkpoint = run_dir / "listener_warmup" / "checkpoint"
    test = easy_vqa(str(root), games=300, test_games=60, split="test")[:24]
    batch = [
        {"candidate_paths": g["candidates"], "question": QUESTION.format(description=as_sentence(g["description"]))}
        for g in test
    ]
    embedded = ListenerEngine(
        OmegaConf.load(ROOT / "conf/vlm/small_vl.yaml"), image_roots=[str(root)], checkpoint=str(checkpoint)
    )
    overrides = (
        "service=listener",
        "vlm=small_vl",
        f"lewis.easy_vqa_root={root}",
        f"lewis.listener_checkpoint={checkpoint}",
    )
    with LocalServer(tmp_path, *overrides) as served:
        remote = ListenerClient(url=f"{served.url}/batch_score", chunk_delay=0).batch_score(batch)["results"]
    local = embedded.batch_score(batch)["results"]
    assert [r["predicted_index"] for r in remote] == [r["predicted_index"] for r in local]
    for a, b in zip(remote, local, strict=True):
        assert a["yes_probabilities"] == pytest.approx(b["yes_probabilities"], abs=1e-5)
