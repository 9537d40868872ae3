"""The Lewis game: data, listener and speaker services, rewards, and GRPO on either player."""

from __future__ import annotations

import filecmp
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import run_cli, run_in_process
from core.rewards.base import RewardSample
from core.serving.local_server import LocalServer, free_port
from lewis.clients import ListenerClient
from lewis.data import ATTRIBUTES, load_games, make_shapes
from lewis.engines import ListenerEngine, parse_description
from lewis.images import ImageStore, read_image, to_data_uri
from lewis.rewards import QUESTION, ListenerAccuracy, OneSentence, TagFormat


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "shapes", games=16, seed=3)


@pytest.fixture(scope="module")
def games(shapes_root):
    return load_games(shapes_root, "train")


@pytest.fixture(scope="module")
def tiny_vl_cfg() -> dict:
    from omegaconf import OmegaConf

    from core.serving.local_server import ROOT

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vlm/tiny_vl.yaml"))


@pytest.fixture(scope="module")
def listener(tmp_path_factory, shapes_root):
    server = LocalServer(
        tmp_path_factory.mktemp("listener"), "service=listener", f"lewis.shapes_root={shapes_root}"
    ).start()
    yield server
    server.stop()


def question(game: dict) -> str:
    return QUESTION.format(description=game["description"])


def test_shapes_are_deterministic_and_distractors_differ(tmp_path, shapes_root, games):
    again = make_shapes(tmp_path / "again", games=16, seed=3)
    for split in ("train", "val", "test"):
        assert filecmp.cmp(shapes_root / f"games_{split}.jsonl", again / f"games_{split}.jsonl", shallow=False)
    assert len(games) == 14 and len(load_games(shapes_root, "val")) == 1
    for game in games:
        # Image names encode all five attributes: four distinct names = each distractor differs somewhere.
        assert len(game["candidates"]) == 4 and len(set(game["candidates"])) == 4
        target = game["candidates"][game["target_index"]]
        assert filecmp.cmp(target, again / "images" / target.split("/")[-1], shallow=False)
        fields = target.split("/")[-1][:-4].split("-")
        key = dict(zip(("count", "size", "colour", "shape", "position"), fields, strict=True))
        for attribute in ATTRIBUTES:
            assert str(game["attributes"][attribute]) == key[attribute]
    folder = tmp_path / "mine"
    shutil.copytree(shapes_root, folder)
    assert [g["description"] for g in load_games(folder)] == [g["description"] for g in games]
    (folder / "games_train.jsonl").write_text(json.dumps({"candidates": ["images/none.png"], "target_index": 0}))
    with pytest.raises(ValueError, match="description"):
        load_games(folder)


def test_yes_probabilities_come_from_the_models_yes_no_logits(tiny_vl_cfg, shapes_root, games):
    engine = ListenerEngine(tiny_vl_cfg, image_roots=[shapes_root], batch_size=3)
    game = games[0]
    result = engine.score(game["candidates"], question(game), topk=2)
    image = engine.images.load(game["candidates"][1])
    enc = engine._inputs([engine._chat(1, question(game))], [image])
    with torch.no_grad():
        logits = engine.model(**enc).logits[0, -1]
    yes, no = logits[engine.yes_id], logits[engine.no_id]
    expected = float(torch.exp(yes) / (torch.exp(yes) + torch.exp(no)))
    assert result["yes_probabilities"][1] == pytest.approx(expected, abs=1e-5)
    probs = result["yes_probabilities"]
    assert all(0.0 < p < 1.0 for p in probs) and result["predicted_index"] == max(range(4), key=probs.__getitem__)
    assert result["topk_indices"] == sorted(range(4), key=lambda i: -probs[i])[:2]
    assert engine.yes_id != engine.no_id


def test_image_patches_are_computed_once_per_image(tiny_vl_cfg, shapes_root, games):
    engine = ListenerEngine(tiny_vl_cfg, image_roots=[shapes_root], batch_size=4)
    patches = engine.processor.image_processor
    first, second = ([engine.images.load(p) for p in g["candidates"]] for g in games[:2])
    patches(first[:2], return_tensors="pt")
    mixed = first[1:] + second  # one image seen, six new
    cached = patches(mixed, return_tensors="pt")
    fresh = patches.inner(mixed, return_tensors="pt")
    assert torch.equal(cached["pixel_values"], fresh["pixel_values"])
    assert torch.equal(cached["image_grid_thw"], fresh["image_grid_thw"])
    assert (patches.cache.misses, patches.cache.hits) == (2 + 6, 1)
    # The same game scored again reads only cached patches and gives the same answer.
    before = engine.score(games[0]["candidates"], question(games[0]))
    misses = patches.cache.misses
    assert engine.score(games[0]["candidates"], question(games[0])) == before and patches.cache.misses == misses


def test_the_image_cache_stays_under_its_byte_bound(shapes_root, games):
    paths = list(dict.fromkeys(p for g in games[:3] for p in g["candidates"]))
    largest = max(read_image(p).width * read_image(p).height * 3 + len(p) for p in paths)
    store = ImageStore([shapes_root], cache_bytes=3 * largest)
    for path in paths:
        store.load(path)
    assert 1 <= len(store.cache) <= 3 < len(paths) and store.cache.bytes <= 3 * largest
    misses = store.cache.misses
    assert store.load(paths[-1]) is store.load(paths[-1]) and store.cache.misses == misses
    store.load(paths[0])  # evicted long ago: read again
    assert store.cache.misses == misses + 1


def test_batch_score_equals_a_loop_of_score(listener, games):
    batch = [{"candidate_paths": g["candidates"], "question": question(g), "topk": 1} for g in games[:5]]
    together = httpx.post(f"{listener.url}/batch_score", json={"batch": batch}, timeout=60).json()
    assert set(together) == {"results", "took"} and together["took"] > 0
    for item, result in zip(batch, together["results"], strict=True):
        alone = httpx.post(f"{listener.url}/score", json=item, timeout=60).json()
        assert alone["predicted_index"] == result["predicted_index"]
        assert alone["yes_probabilities"] == pytest.approx(result["yes_probabilities"], abs=1e-5)


def test_image_roots_and_bad_input(listener, games, tmp_path):
    url, game = listener.url, games[0]
    outside = tmp_path / "outside.png"
    shutil.copy(game["candidates"][0], outside)
    for paths in ([str(outside)], [f"{game['candidates'][0]}/../../../../etc/passwd"], ["/etc/hosts"]):
        refused = httpx.post(f"{url}/score", json={"candidate_paths": paths, "question": "q"})
        assert refused.status_code == 403 and "outside the allowed image roots" in refused.json()["error"]
    inline = httpx.post(f"{url}/score", json={"candidate_paths": [to_data_uri(outside)], "question": question(game)})
    by_path = httpx.post(f"{url}/score", json={"candidate_paths": game["candidates"][:1], "question": question(game)})
    assert inline.json()["yes_probabilities"] == pytest.approx(by_path.json()["yes_probabilities"])
    bad = [
        ({"candidate_paths": game["candidates"], "question": "q", "topk": 9}, 400, "topk"),
        ({"candidate_paths": [], "question": "q"}, 400, "candidate_paths"),
        ({"candidate_paths": game["candidates"]}, 400, "question"),
        ({"candidate_paths": ["data:image/png;base64,!!!"], "question": "q"}, 400, "base64"),
        ({"candidate_paths": ["x.png"] * 10_000, "question": "q"}, 400, "more than the 64 allowed"),
        ({"candidate_paths": game["candidates"], "question": "q" * 1_000_000}, 400, "4000 characters"),
    ]
    for body, status, word in bad:
        answer = httpx.post(f"{url}/score", json=body)
        assert answer.status_code == status and word in answer.json()["error"], body
    broken = httpx.post(f"{url}/batch_score", content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "error" in broken.json()
    assert httpx.post(f"{url}/batch_score", json={"batch": []}).status_code == 422
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_format_and_length_rewards_on_hand_written_examples():
    good = (
        "<thinking>It is red.</thinking><coarse>A red circle</coarse>"
        "<detailed>One small red circle on the left.</detailed>"
    )
    two = "<thinking>x</thinking><coarse>y</coarse><detailed>A red circle. It is small.</detailed>"
    unclosed = "<thinking>x</thinking><coarse>y</coarse><detailed>A red circle."
    samples = [RewardSample(t) for t in (good, two, unclosed, "A red circle on the left.")]
    assert TagFormat()(samples) == [1.0, 1.0, 0.0, 0.0]
    assert OneSentence()(samples) == [0.1, 0.0, 0.0, 0.1]
    assert parse_description(good) == {
        "thinking": "It is red.",
        "coarse": "A red circle",
        "detailed": "One small red circle on the left.",
    }


def test_accuracy_reward_caches_listener_calls(listener, games, tmp_path):
    client = ListenerClient(f"{listener.url}/batch_score", chunk_size=2, chunk_delay=0.0)
    log_path = tmp_path / "predictions.jsonl"
    reward = ListenerAccuracy(client, log_path=str(log_path))
    samples = [
        RewardSample(
            f"<detailed>{g['description']}</detailed>",
            extra_info={"candidates": g["candidates"], "target_index": g["target_index"]},
        )
        for g in games[:4]
    ]
    calls_before = httpx.get(f"{listener.url}/health").json()["model_calls"]
    first = reward(samples + samples[:2])  # duplicates inside one call are asked once
    assert reward.stats["listener_items"] == 4 and client.stats["requests"] == 2
    calls_after_first = httpx.get(f"{listener.url}/health").json()["model_calls"]
    second = reward(samples)
    assert second == first[:4]
    assert reward.stats["listener_items"] == 4 and reward.stats["cache_hits"] == 4
    assert httpx.get(f"{listener.url}/health").json()["model_calls"] == calls_after_first > calls_before
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 10 and {r["call"] for r in records} == {1, 2}
    assert all(r["accuracy"] == float(r["predicted_index"] == r["target_index"]) for r in records)


def test_speaker_service_returns_parsed_fields(tmp_path, shapes_root, games):
    with LocalServer(tmp_path, "service=speaker", f"lewis.shapes_root={shapes_root}", "engine.max_new_tokens=12") as s:
        one = httpx.post(f"{s.url}/describe", json={"image_path": games[0]["candidates"][0]}, timeout=60)
        assert one.status_code == 200 and set(one.json()) == {"text", "thinking", "coarse", "detailed"}
        batch = [{"image_path": g["candidates"][0]} for g in games[:3]]
        many = httpx.post(f"{s.url}/batch_describe", json={"batch": batch}, timeout=60).json()
        assert len(many["results"]) == 3 and many["took"] > 0
        assert all(r["text"] and r["detailed"] is None for r in many["results"])  # a random model writes no tags
        assert httpx.post(f"{s.url}/describe", json={"image_path": "/etc/hosts"}).status_code == 403
        inside = games[0]["candidates"][0]
        for path, status in ((f"{inside}/../../../../etc/passwd", 403), ("a\x00b.png", 400), ("", 400)):
            refused = httpx.post(f"{s.url}/describe", json={"image_path": path})
            assert refused.status_code == status, (path, refused.text)
        long_prompt = httpx.post(f"{s.url}/describe", json={"image_path": inside, "prompt": "x" * 5000})
        assert long_prompt.status_code == 400 and "4000 characters" in long_prompt.json()["error"]


def _predictions(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "lewis_predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_speaker_training_with_remote_listener_matches_local(listener, shapes_root, tmp_path):
    common = [f"lewis.shapes_root={shapes_root}", "logger=none", "trainer.max_steps=2"]
    remote_dir, local_dir = tmp_path / "remote", tmp_path / "local"
    run_in_process(remote_dir, "train=speaker", "listener=remote", f"listener.port={listener.port}", *common)
    run_in_process(local_dir, "train=speaker", "listener=local", *common)
    for run_dir in (remote_dir, local_dir):
        assert (run_dir / "adapter" / "adapter_config.json").exists()
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert not list((run_dir / "checkpoints").glob("checkpoint-*"))  # The Lewis reference scripts' cleanup
    served, embedded = _predictions(remote_dir), _predictions(local_dir)
    assert len(served) == 8 and [r["completion"] for r in served] == [r["completion"] for r in embedded]
    assert [r["accuracy"] for r in served] == [r["accuracy"] for r in embedded]
    for a, b in zip(served, embedded, strict=True):
        assert a["yes_probabilities"] == pytest.approx(b["yes_probabilities"], abs=1e-5)


@pytest.mark.slow
def test_listener_down_scores_zero_and_training_continues(shapes_root, tmp_path):
    dead = free_port()
    env = {"LISTENER_MAX_RETRIES": "1", "LISTENER_BACKOFF_FACTOR": "0.01"}
    run = run_cli(
        "train=speaker",
        "listener=remote",
        f"listener.port={dead}",
        f"lewis.shapes_root={shapes_root}",
        "logger=none",
        "trainer.max_steps=2",
        f"hydra.run.dir={tmp_path}",
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward/accuracy"] == 0.0 for r in rows)
    assert rows[-1]["failures/accuracy/requests_failed"] == 8
    assert all(r["error"] and r["accuracy"] == 0.0 for r in _predictions(tmp_path))
    assert "listener could not score" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_listener_training_on_ground_truth_descriptions(shapes_root, tmp_path):
    run_in_process(tmp_path, "train=listener", f"lewis.shapes_root={shapes_root}", "logger=none", "trainer.max_steps=2")
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<image><image><image><image>Description: ")
    assert set(sample["rewards"]) == {"accuracy", "format"}
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_inference_variables_set_the_gate_and_a_waiting_request_gets_503(monkeypatch, tiny_vl_cfg, shapes_root, games):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import ThreadServer
    from core.serving.app import ServerSettings
    from core.serving.local_server import ROOT
    from lewis.apps import listener_app

    monkeypatch.setenv("INFERENCE_CONCURRENCY", "3")
    monkeypatch.setenv("INFERENCE_ACQUIRE_TIMEOUT", "7")
    monkeypatch.setenv("LISTENER_BATCH_SIZE", "9")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["service=listener", f"paths.output_dir={shapes_root}"])
    OmegaConf.resolve(cfg)
    assert (cfg.server.max_concurrency, cfg.server.acquire_timeout_s, cfg.engine.batch_size) == (3, 7, 9)

    engine = ListenerEngine(tiny_vl_cfg, image_roots=[shapes_root], batch_size=8)
    settings = ServerSettings(max_concurrency=1, acquire_timeout_s=0.05)
    slow = [{"candidate_paths": g["candidates"], "question": question(g)} for g in games] * 6
    with ThreadServer(listener_app(engine, settings)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(http.post, "/batch_score", json={"batch": slow})
            time.sleep(0.1)
            second = http.post("/score", json=slow[0])
            assert first.result().status_code == 200
        assert second.status_code == 503 and "retry" in second.json()["error"]


@pytest.mark.parametrize(
    ("name", "phrase"), [("a\x00b.png", "NUL byte"), ("x" * 300 + ".png", "not a usable path")], ids=["nul", "long"]
)
def test_unusable_image_paths_get_400_and_the_server_lives(listener, shapes_root, name, phrase):
    path = f"{shapes_root}/{name}"
    refused = httpx.post(f"{listener.url}/score", json={"candidate_paths": [path], "question": "q"})
    assert refused.status_code == 400 and phrase in refused.json()["error"], refused.text
    assert httpx.get(f"{listener.url}/health").status_code == 200


def test_speaker_7b_experiment_has_the_reference_run_settings():
    from hydra import compose, initialize_config_dir
    from trl import GRPOConfig

    from core.serving.local_server import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["train=speaker", "experiment=lewis_speaker_qwen2vl7b"])
    reference = {
        "learning_rate": 5e-7,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 16,
        "num_train_epochs": 4,
        "max_steps": -1,
        "num_generations": 4,
        "save_only_model": True,
        "gradient_checkpointing": True,
    }
    assert {k: cfg.trainer[k] for k in reference} == reference
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.seed, cfg.gpus) == (64, 128, 0.001, 23, 2)
    assert cfg.deepspeed.config.optimizer.params.lr == "auto"  # filled in from trainer.learning_rate
    assert (cfg.vlm.max_pixels, cfg.vlm.attn_implementation) == (401408, "flash_attention_2")
    GRPOConfig(output_dir="/tmp/x", use_cpu=True, **reference)  # every name is one TRL accepts


def test_an_abandoned_batch_frees_the_listener_for_the_next_client(listener, games):
    # One inference slot: a client that gives up on a large batch must not make the next one wait
    # for it (without cancellation this 1024-pair batch, the most one request may ask, holds the
    # slot for about 7 s here).
    items = [
        {"candidate_paths": games[i % len(games)]["candidates"] * 8, "question": question(games[i % len(games)])}
        for i in range(32)
    ]
    big = {"batch": items}
    gone_before = listener.metric('listener_requests_total{route="/batch_score",status="499"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{listener.url}/batch_score", json=big, timeout=1.0)
    started = time.monotonic()
    small = httpx.post(
        f"{listener.url}/score",
        json={"candidate_paths": games[0]["candidates"], "question": question(games[0]), "topk": 1},
        timeout=60,
    )
    waited = time.monotonic() - started
    assert small.status_code == 200 and len(small.json()["yes_probabilities"]) == 4
    assert waited < 4.0, waited
    assert listener.metric('listener_requests_total{route="/batch_score",status="499"}') == gone_before + 1


def test_bad_requests_are_refused_at_once_while_the_model_is_busy(listener, games):
    # One inference slot, held by a 1024-pair batch for seconds: requests that fail validation
    # (bad topk, too many pairs) are answered without waiting for it.
    items = [{"candidate_paths": g["candidates"] * 8, "question": question(g)} for g in games] * 3
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{listener.url}/batch_score", json={"batch": items[:32]}, timeout=120)
        time.sleep(0.5)
        started = time.monotonic()
        topk = httpx.post(f"{listener.url}/score", json={**items[0], "topk": 0}, timeout=30)
        pairs = httpx.post(f"{listener.url}/batch_score", json={"batch": items}, timeout=30)
        waited = time.monotonic() - started
        assert not busy.done(), "the busy batch finished too soon to show anything"
        assert topk.status_code == 400 and "topk" in topk.json()["error"]
        assert pairs.status_code == 400 and "more than the 1024 allowed" in pairs.json()["error"]
        assert waited < 1.0, waited
        assert busy.result().status_code == 200
