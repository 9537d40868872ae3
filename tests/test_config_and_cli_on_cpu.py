"""conf/ composes in every combination users reach for, and run.py does what the README says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import JUDGE_KEY, ROOT, free_port, run_cli
from core.rewards.mix_engine import RewardMix

CONF = ROOT / "conf"
# entailment is a sub-group, composed inside ig/ options (reward/component is a folder of reward/).
SUB_GROUPS = ("entailment",)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in SUB_GROUPS)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    """The real config, composed in code (no Hydra job: the run dir is set, as a caller from Python would)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=outputs/composed", *overrides])


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = composed(f"{group}={option}")
    OmegaConf.resolve(cfg)  # every interpolation (env defaults included) resolves
    assert cfg.task._target_
    assert cfg.server.host == "127.0.0.1"


def test_real_model_configs_keep_the_hub_loading_path():
    for name, hub_id in [
        ("qwen3-32b", "Qwen/Qwen3-32B"),
        ("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct"),
        ("qwen3-embedding-8b", "Qwen/Qwen3-Embedding-8B"),
    ]:
        assert composed(f"model={name}").model.name_or_path == hub_id


def test_remote_reward_mix_instantiates_with_env_urls(monkeypatch):
    monkeypatch.setenv("LLM_JUDGE_SERVER_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LLM_JUDGE_SERVER_TIMEOUT", "7")
    monkeypatch.setenv("EMBEDDING_SERVER_URL", "http://127.0.0.1:10")
    cfg = composed("experiment=remote_rewards", "reward.components.embedding.weight=0.25")
    mix = instantiate(cfg.reward)
    assert isinstance(mix, RewardMix) and list(mix.components) == ["exact_match", "embedding", "llm_judge"]
    judge, _ = mix.components["llm_judge"]
    embedding, weight = mix.components["embedding"]
    assert judge.generator.url == "http://127.0.0.1:9" and judge.generator.http.timeout == 7.0
    assert embedding.embedder.url == "http://127.0.0.1:10" and weight == 0.25


def test_local_reward_mix_and_service_engines_instantiate():
    cfg = composed("reward=default")
    mix = instantiate(cfg.reward)
    assert type(mix.components["llm_judge"][0].generator).__name__ == "GenerationEngine"
    assert type(mix.components["embedding"][0].embedder).__name__ == "EmbeddingEngine"
    engine = instantiate(composed("service=llm_judge").engine)
    assert engine.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and engine.device.type == "cpu"
    assert not engine.random_weights


def test_exactly_one_task_runs_and_services_compose_no_training_settings():
    from core.tasks import check_one_task

    for task in ("service=embedding", "service=policy", "eval=rewards", "check=judge", "launch=vllm"):
        cfg = composed(task)
        assert "trainer" not in cfg and "lora" not in cfg, task
        check_one_task(cfg)
    check_one_task(composed())  # the quickstart: train=grpo
    with pytest.raises(ValueError, match="got train=speaker, service=listener"):
        check_one_task(composed("train=speaker", "service=listener"))


def test_a_task_runs_in_process_from_a_composed_config(tmp_path):
    from core.tasks import run_task

    cfg = composed("eval=rewards", "reward=exact_match", "logger=none", f"paths.output_dir={tmp_path}")
    summary = run_task(cfg)
    assert summary["by_kind"]["exact"]["exact_match"] == 1.0
    assert json.loads((tmp_path / "final.json").read_text())["overrides"] == []  # no Hydra job
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == summary["n"]


def test_judge_defaults_fit_real_judges():
    local, remote = composed("reward=llm_judge"), composed("reward=llm_judge", "judge=remote")
    assert (local.judging.mode, local.judging.prompt_template) == ("logprobs", "yes_no")  # one token, any model size
    assert (remote.judging.mode, remote.judging.prompt_template) == ("text", "default")
    for cfg in (local, remote):  # a text-mode judge gets room to reason before `REWARD:`
        assert cfg.reward.components.llm_judge.fn.max_new_tokens == 512
    assert local.judge.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_help_lists_the_groups():
    out = run_cli("--help", timeout=120).stdout
    for group in ("service", "model", "judge", "embedder", "reward", "logger", "check", "launch", "experiment"):
        assert f"{group}:" in out
    assert "service: embedding, infogain, listener, llm_judge, policy, reward, speaker, value" in out
    assert "train: grpo, lewis_game, listener, listener_warmup, speaker, speaker_warmup" in out
    assert "vlm: qwen2-vl-2b, qwen2-vl-7b, small_vl, tiny_vl" in out
    assert "Examples" in out and "python run.py experiment=smoke" in out  # what to run, not the raw config
    assert "trainer:" not in out


def test_cfg_job_prints_the_resolved_service_config():
    result = run_cli(
        "--cfg", "job", "--resolve", "service=embedding", env={"EMBEDDING_SERVER_PORT": "9123"}, timeout=120
    )
    cfg = OmegaConf.create(result.stdout)
    assert (
        cfg.task._target_ == "core.serving.run_service"
        and cfg.app._target_ == "core.models.embedding_app.embedding_app"
    )
    assert cfg.server.port == 9123 and cfg.server.host == "127.0.0.1"
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.slow
def test_default_run_writes_scores_and_summary(tmp_path):
    result = run_cli(
        "eval=rewards", "logger=none", f"hydra.run.dir={tmp_path}", "judging.max_new_tokens=8", timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Mean reward by kind" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == summary["n"] == 15
    kinds = summary["by_kind"]
    assert kinds["exact"]["exact_match"] == 1.0 and kinds["paraphrase"]["exact_match"] == 0.0
    assert kinds["exact"]["embedding"] > kinds["paraphrase"]["embedding"] > kinds["unrelated"]["embedding"] + 0.15
    assert all(r["total"] == pytest.approx(r["exact_match"] + r["embedding"] + r["llm_judge"]) for r in rows)
    assert (tmp_path / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_default_run_logs_to_offline_wandb(tmp_path):
    result = run_cli("eval=rewards", f"hydra.run.dir={tmp_path}", "evaluation.limit=2", "reward=embedding", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_variables_win_over_the_config_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = composed().logger
    assert (logger.project, logger.mode, logger.dir) == ("my-project", "disabled", str(tmp_path))
    monkeypatch.delenv("WANDB_PROJECT")
    assert composed().logger.project == "rewardkit"


def test_check_reports_a_healthy_judge(judge_server):
    result = run_cli(
        "check=judge",
        f"judge.url={judge_server.url}",
        "reward.components.llm_judge.fn.max_new_tokens=8",
        env={"LLM_JUDGE_SERVER_API_KEY": JUDGE_KEY},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "OK" in result.stdout and "tiny-qwen2" in result.stdout and "test_score" in result.stdout


def test_check_reports_a_healthy_embedding_server(embedding_server):
    result = run_cli("check=embedding", f"embedder.url={embedding_server.url}", timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "all-MiniLM-L6-v2" in result.stdout and "score_ms" in result.stdout


def test_check_explains_unreachable_and_bad_key(judge_server):
    down = run_cli("check=judge", f"judge.url=http://127.0.0.1:{free_port()}", timeout=120)
    assert down.returncode == 1 and "cannot reach" in down.stdout and "LLM_JUDGE_SERVER_URL" in down.stdout
    wrong = run_cli("check=judge", f"judge.url={judge_server.url}", "judge.api_key=wrong", timeout=120)
    assert wrong.returncode == 1 and "refused the API key" in wrong.stdout


def test_launch_commands_come_from_the_model_config():
    from launchers.commands import tei_commands, vllm_commands

    vllm = vllm_commands(
        {"name_or_path": "Qwen/Qwen3-32B", "dtype": "bfloat16", "max_model_len": 32768},
        gpus=4,
        host="0.0.0.0",
        port=8000,
        api_key_env="LLM_JUDGE_SERVER_API_KEY",
    )
    assert vllm["python"].startswith("python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-32B")
    assert "--tensor-parallel-size 4" in vllm["python"] and "--tensor-parallel-size 4" in vllm["docker"]
    assert '--api-key "$LLM_JUDGE_SERVER_API_KEY"' in vllm["docker"] and "--gpus all" in vllm["docker"]
    tei = tei_commands(
        {"name_or_path": "Qwen/Qwen3-Embedding-8B", "dtype": "bfloat16"}, gpus=0, port=8080, api_key_env=None
    )
    assert "text-embeddings-inference:cpu-latest" in tei["docker"] and "--gpus" not in tei["docker"]
    assert "--model-id Qwen/Qwen3-Embedding-8B" in tei["binary"] and "--api-key" not in tei["binary"]
    with pytest.raises(ValueError, match="real models"):
        vllm_commands({"name_or_path": None}, gpus=1, host="h", port=1, api_key_env=None)


def test_launch_cli_prints_both_forms():
    out = run_cli("launch=vllm", "model=qwen3-32b", "gpus=2", timeout=120).stdout
    assert "# vllm (python)" in out and "# vllm (docker)" in out and "--tensor-parallel-size 2" in out
    assert "export LLM_JUDGE_SERVER_URL=http://127.0.0.1:8000" in out


def test_outputs_dir_is_ignored_except_its_readme():
    ignore = (ROOT / ".gitignore").read_text()
    assert "/outputs/*" in ignore and Path(ROOT / "outputs" / "README.md").exists()


@pytest.mark.parametrize("launcher", ["basic", "submitit_local", "submitit_slurm"])
def test_hydra_launchers_compose(launcher):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target.endswith(
        {"basic": "BasicLauncher", "submitit_local": "LocalLauncher", "submitit_slurm": "SlurmLauncher"}[launcher]
    )


@pytest.mark.parametrize(
    ("option", "cls"), [("nli", "NLIEntailment"), ("embedding", "EmbeddingEntailment"), ("exact", "ExactEntailment")]
)
def test_entailment_options_instantiate_inside_ig(option, cls):
    engine = instantiate(composed(f"entailment@ig.entailment={option}").ig)
    assert type(engine).__name__ == "InfoGainEngine" and type(engine.entailment).__name__ == cls


def test_ig_remote_is_a_client_with_the_seed_env(monkeypatch):
    monkeypatch.setenv("IG_SERVICE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("IG_BATCH_SIZE", "64")
    client = instantiate(composed("ig=remote", "reward=qa_em_ig").reward).components["qa_em_ig"][0].scorer
    assert type(client).__name__ == "InfoGainClient" and client.http.base_url == "http://127.0.0.1:9"
    assert client.batch_size == 64 and client.http.timeout == 120.0


def test_each_rank_takes_its_own_gpu_and_flash_attention_falls_back(caplog):
    import torch

    from core.models.loading import attention_implementation, device_name, load_kwargs

    assert device_name(0, "3") == "cpu"
    assert [device_name(4, rank) for rank in (None, "0", "1", "3")] == ["cuda", "cuda:0", "cuda:1", "cuda:3"]
    vlm = OmegaConf.to_container(OmegaConf.load(CONF / "vlm/qwen2-vl-7b.yaml"))
    assert vlm["attn_implementation"] == "flash_attention_2"
    with caplog.at_level("WARNING"):
        assert load_kwargs(vlm, torch.device("cpu")) == {"dtype": torch.float32, "attn_implementation": "sdpa"}
    assert "using sdpa" in caplog.text
    assert attention_implementation("eager", torch.device("cpu")) == "eager"
    assert attention_implementation(None, torch.device("cpu")) is None


@pytest.mark.slow
def test_packaged_smollm2_is_converted_once_by_concurrent_processes(tmp_path):
    import subprocess
    import sys

    from core.models.loading import SMOLLM2_ID, resolve_path

    assert resolve_path(SMOLLM2_ID, source="hub") == SMOLLM2_ID  # GPU users keep the hub id
    with pytest.raises(ValueError, match="auto, package or hub"):
        resolve_path(SMOLLM2_ID, source="somewhere")
    with pytest.raises(ValueError, match="unresolved interpolation"):
        resolve_path(SMOLLM2_ID, "package", "${oc.env:REWARDKIT_CACHE,null}")
    code = (
        "from core.models.loading import resolve_path; "
        f"print(resolve_path({SMOLLM2_ID!r}, 'package', {str(tmp_path)!r}))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert all(o.strip().endswith(str(folder)) for o in outputs), outputs
    assert sum(o.count("converting SmolLM2") for o in outputs) == 1  # the second process waited for the first
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct.lock",
    ]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(folder).architectures == ["LlamaForCausalLM"]


# The reference systems' documented settings, value for value (their READMEs' tables and commands).
INFOGAIN_REFERENCE = {
    "model_path": "Qwen/Qwen2.5-3B",
    "device": "cuda:0",
    "num_generations": 10,
    "sub_batch_size": 10,
    "temperature": 1.0,
    "max_new_tokens": 128,
    "max_context_words": 4096,
    "prompt_type": "default",
    "computation_chunk_size": 8,
    "max_concurrent_requests": 4,
    "num_gpus": 1,
    "port": 8000,
    "entailment": "microsoft/deberta-v2-xlarge-mnli",
}


def test_infogain_reference_experiment_matches_the_reference_service(monkeypatch):
    for name in [v for v in os.environ if v.startswith("IG_")]:
        monkeypatch.delenv(name)
    cfg = composed("experiment=infogain_reference")
    OmegaConf.resolve(cfg)
    ig = cfg.engine.engine
    assert {
        "model_path": ig.generator.model.name_or_path,
        "device": cfg.engine.device,
        "num_generations": ig.num_generations,
        "sub_batch_size": ig.sub_batch_size,
        "temperature": ig.temperature,
        "max_new_tokens": ig.max_new_tokens,
        "max_context_words": ig.max_context_words,
        "prompt_type": ig.prompt_type,
        "computation_chunk_size": ig.computation_chunk_size,
        "max_concurrent_requests": cfg.server.max_concurrency,
        "num_gpus": cfg.gpus,
        "port": cfg.server.port,
        "entailment": ig.entailment.model.name_or_path,
    } == INFOGAIN_REFERENCE
    assert (
        ig.entailment._target_ == "infogain.entailment.NLIEntailment"
        and cfg.task._target_ == "core.serving.run_service"
    )
    # the reference's variables still win, and the entailment model has one too
    monkeypatch.setenv("IG_NUM_GPUS", "4")
    monkeypatch.setenv("IG_ENTAILMENT_MODEL", "my-org/my-mnli")
    cfg = composed("experiment=infogain_reference")
    assert cfg.gpus == 4 and cfg.engine.engine.entailment.model.name_or_path == "my-org/my-mnli"


def test_llm_judge_and_embedding_reference_experiments_match_the_reference_deployments(monkeypatch):
    for name in (
        "LLM_JUDGE_SERVER_TIMEOUT",
        "EMBEDDING_SERVER_TIMEOUT",
        "LLM_JUDGE_SERVER_PORT",
        "EMBEDDING_SERVER_PORT",
    ):
        monkeypatch.delenv(name, raising=False)
    judge = composed("experiment=llm_judge_reference")
    fn = judge.reward.components.llm_judge.fn
    assert (judge.model.name_or_path, judge.server.port, judge.app.default_max_tokens) == ("Qwen/Qwen3-32B", 8000, 512)
    assert (fn.mode, fn.prompt_template, fn.temperature, fn.top_p, fn.max_new_tokens) == (
        "text",
        "default",
        0.7,
        0.8,
        512,
    )
    assert (fn.enable_thinking, fn.batch_size, judge.judge.timeout) == (False, 128, 60)
    embedding = composed("experiment=embedding_reference")
    fn = embedding.reward.components.embedding.fn
    assert (embedding.model.name_or_path, embedding.server.port, embedding.embedder.timeout) == (
        "Qwen/Qwen3-Embedding-8B",
        8080,
        30,
    )
    assert (fn.length_penalty, fn.length_threshold, fn.cache_enabled, fn.cache_size) == ("none", 1.5, True, 10000)


def test_a_port_in_use_fails_at_start_naming_the_setting():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("service=embedding", f"server.port={port}", timeout=120)
    assert result.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stdout and "server.port=" in result.stdout
    assert "Loading SentenceTransformer" not in result.stdout  # refused before the model loads
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' (must be int)"),
        (["seed=1.5"], "seed=1.5 (must be int)"),
        (["lora.r=x"], "lora.r='x' (must be int)"),
        (["trainer.learning_rate=fast"], "trainer.learning_rate='fast' (must be int or float)"),
        (["gpus=3"], "gpus=3 but 0 CUDA devices are visible"),
        (["dataset=files", "dataset.path=/nowhere/train.jsonl"], "dataset file /nowhere/train.jsonl does not exist"),
        (["resume=/nowhere"], "resume=/nowhere: no complete checkpoint"),
    ],
    ids=["int", "seed", "lora", "float", "gpus", "dataset", "resume"],
)
def test_bad_settings_fail_at_start_naming_the_key(tmp_path, overrides, phrase):
    from conftest import run_in_process
    from core.config_errors import ConfigError, config_error_in

    with pytest.raises(Exception) as raised:  # noqa: PT011 - Hydra's instantiate may wrap it
        run_in_process(tmp_path, "experiment=smoke", "logger=none", *overrides)
    error = config_error_in(raised.value)
    assert isinstance(error, ConfigError) and phrase in str(error), raised.value
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.slow
def test_an_unwritable_run_dir_fails_at_start_with_status_2(tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    result = run_cli(
        "experiment=smoke", "logger=none", f"hydra.run.dir={tmp_path}/run", f"paths.output_dir={in_the_way}/run"
    )
    assert result.returncode == 2, result.stdout[-2000:]
    assert f"error: paths.output_dir={in_the_way}/run cannot be written (Not a directory)" in result.stdout
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize("service", ["infogain", "embedding", "reward"])
def test_a_service_asking_for_gpus_that_are_not_there_fails_at_once(tmp_path, service):
    # InfoGain's gpus=4 used to start a local Ray that waited forever for GPUs it could not get.
    from conftest import run_in_process
    from core.config_errors import ConfigError, config_error_in

    with pytest.raises(Exception) as raised:  # noqa: PT011 - Hydra's instantiate may wrap it
        run_in_process(tmp_path, f"service={service}", "gpus=4")
    error = config_error_in(raised.value)
    assert isinstance(error, ConfigError) and "gpus=4 but 0 CUDA devices are visible" in str(error)
    assert "use gpus=0" in str(error)
