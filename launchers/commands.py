"""Commands that serve a configured model with the real GPU servers: vLLM (judge) and TEI (embeddings).

Both are built from the same ``model:`` node the in-process engines use, so ``model=qwen3-32b
gpus=4`` means the same model and layout whichever server runs it. Secrets are never printed:
the API key appears as a reference to its environment variable.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence

HF_CACHE_MOUNT = "$HOME/.cache/huggingface:/root/.cache/huggingface"


def _join(parts: Sequence[str]) -> str:
    # Parts with $VAR references go in double quotes so the shell still expands them.
    return " ".join(f'"{p}"' if "$" in p else shlex.quote(p) for p in parts)


def _model_id(model: Mapping) -> str:
    name = model.get("name_or_path")
    if not name:
        raise ValueError(
            "vLLM and TEI load real models: pick one with model=... (e.g. model=qwen3-32b), not the tiny random model"
        )
    return str(name)


def vllm_commands(
    model: Mapping,
    gpus: int,
    host: str,
    port: int,
    api_key_env: str | None,
    image: str = "vllm/vllm-openai:latest",
    extra_args: Sequence[str] = (),
) -> dict[str, str]:
    """The vLLM OpenAI-server command as ``python`` and ``docker`` forms; tensor parallel = ``gpus``."""
    args = ["--tensor-parallel-size", str(max(1, gpus)), "--dtype", str(model.get("dtype") or "auto")]
    if model.get("max_model_len"):
        args += ["--max-model-len", str(model["max_model_len"])]
    if model.get("served_name"):
        args += ["--served-model-name", str(model["served_name"])]
    if api_key_env:
        args += ["--api-key", f"${api_key_env}"]
    args += list(extra_args)
    model_id = _model_id(model)
    python = [
        "python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_id,
        "--host",
        host,
        "--port",
        str(port),
        *args,
    ]
    docker = [
        "docker",
        "run",
        "--rm",
        "--gpus",
        "all",
        "--ipc=host",
        "-p",
        f"{port}:8000",
        "-v",
        HF_CACHE_MOUNT,
        "-e",
        "HF_TOKEN",
        image,
        "--model",
        model_id,
        *args,
    ]
    return {"python": _join(python), "docker": _join(docker)}


def tei_commands(
    model: Mapping,
    gpus: int,
    port: int,
    api_key_env: str | None,
    image: str = "ghcr.io/huggingface/text-embeddings-inference:latest",
    max_client_batch_size: int = 32,
    extra_args: Sequence[str] = (),
) -> dict[str, str]:
    """The TEI router command as a local binary and a docker form; ``gpus=0`` picks TEI's CPU image."""
    args = ["--model-id", _model_id(model), "--max-client-batch-size", str(max_client_batch_size), "--auto-truncate"]
    if gpus > 0 and model.get("dtype") in ("bfloat16", "float16"):
        args += ["--dtype", "float16"]  # TEI's half-precision option
    if api_key_env:
        args += ["--api-key", f"${api_key_env}"]
    args += list(extra_args)
    gpu_flags = ["--gpus", "all"] if gpus > 0 else []
    if gpus == 0 and image.endswith(":latest"):
        image = image.replace(":latest", ":cpu-latest")
    binary = ["text-embeddings-router", *args, "--port", str(port)]
    docker = ["docker", "run", "--rm", *gpu_flags, "-p", f"{port}:80", "-v", "$PWD/tei-data:/data", image, *args]
    return {"binary": _join(binary), "docker": _join(docker)}


def _env_if_set(name: str) -> str | None:
    return name if os.environ.get(name) else None


def run(cfg) -> dict[str, str]:
    """Entry point of ``python run.py launch=vllm|tei``: print the commands."""
    launch = cfg.launch
    if launch.kind == "vllm":
        commands = vllm_commands(
            cfg.model,
            cfg.gpus,
            cfg.host,
            launch.port,
            _env_if_set("LLM_JUDGE_SERVER_API_KEY"),
            launch.image,
            launch.extra_args,
        )
        client_env = f"export LLM_JUDGE_SERVER_URL=http://{cfg.host}:{launch.port}"
    else:
        commands = tei_commands(
            cfg.model,
            cfg.gpus,
            launch.port,
            _env_if_set("EMBEDDING_SERVER_API_KEY"),
            launch.image,
            extra_args=launch.extra_args,
        )
        client_env = f"export EMBEDDING_SERVER_URL=http://{cfg.host}:{launch.port}"
    for form, command in commands.items():
        print(f"# {launch.kind} ({form})\n{command}\n")
    print(f"# then point the rewards at it\n{client_env}")
    return commands
