"""Vision-language models for the Lewis game: a real Qwen2-VL from ``name_or_path``, or a tiny random
Qwen2-VL built from the config (no download) around the packaged MiniLM tokenizer.

A model config node (``conf/vlm/*.yaml``)::

    name_or_path: Qwen/Qwen2-VL-7B-Instruct   # or null: the tiny random model from ``tiny``
    dtype: bfloat16
    min_pixels / max_pixels                    # the image processor's resize bounds (seed: 401408)
    tiny: {text: {...}, vision: {...}}         # Qwen2VLConfig sub-configs of the tiny model
    seed: 0
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from core.models.loading import load_kwargs, model_path, packaged_tokenizer
from core.rewards.cache import LRUCache

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The speaker's tags, one token each in the tiny vocabulary: WordPiece would split "<coarse>" into
# three pieces and decode them with spaces between ("< coarse >"), which no tag parser reads.
TAG_TOKENS = [f"<{slash}{tag}>" for tag in ("thinking", "coarse", "detailed") for slash in ("", "/")]

# Qwen2-VL's chat layout for the tiny tokenizer: an image content item becomes the vision block
# the processor expands to one pad token per merged patch.
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImagePatchCache:
    """A processor's image processor that resizes and patches each image once.

    The game scores the same candidate images again and again (every game draws from one pool,
    every epoch repeats it), and resizing them is a third of a listener call on a small model.
    Images are known by identity: ``ImageStore`` hands out one ``PIL`` object per path, and each
    entry holds its image so that no other object can take its ``id`` while it is cached.
    Patches of several images concatenate, so a batch is the cached pieces joined.
    """

    def __init__(self, image_processor, cache_size: int = 1024, cache_bytes: int = 1 << 30):
        self.inner = image_processor
        # Bounded in bytes too: one image at Qwen2-VL's default 401,408 pixels is about 10 MB of patches.
        self.cache = LRUCache(cache_size, cache_bytes, lambda entry: entry[1].nbytes)

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy and pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, images, **kwargs):
        from PIL import Image
        from transformers import BatchFeature

        flat = images if isinstance(images, list) else [images]
        if not all(isinstance(image, Image.Image) for image in flat):
            return self.inner(images, **kwargs)
        options = repr(sorted((k, v) for k, v in kwargs.items() if k != "return_tensors"))
        pieces = []
        for image in flat:
            key = (id(image), options)
            entry = self.cache.get(key)
            if entry is None:
                out = self.inner([image], **{**kwargs, "return_tensors": "pt"})
                entry = (image, out["pixel_values"], out["image_grid_thw"])
                self.cache.put(key, entry)
            pieces.append(entry[1:])
        pixels, grids = zip(*pieces, strict=True)
        return BatchFeature(
            {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)},
            tensor_type=kwargs.get("return_tensors"),
        )


def _image_only_processor_class():
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without the video part, whose module needs torchvision (not on CPU
        installs here); the game has no videos. Attributes come from this ``__init__``'s signature."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def _tiny_processor(model_cfg: Mapping):
    from tokenizers import processors
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = copy.deepcopy(packaged_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS + ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(TAG_TOKENS)  # not special: a decoded reply keeps them
    tok.pad_token = "[PAD]"
    tok.eos_token = "<|im_end|>"  # a reply ends with its turn, as Qwen2-VL's do
    # No [CLS] ... [SEP] around the text, as Qwen2-VL's tokenizer adds none: the chat template
    # lays the turns out, and the listener's answer position stays the generation prompt's end.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok.padding_side = "left"
    tok.chat_template = VL_CHAT_TEMPLATE
    vision = (model_cfg.get("tiny") or {}).get("vision") or {}
    images = Qwen2VLImageProcessorPil(
        min_pixels=int(model_cfg.get("min_pixels", 3136)),
        max_pixels=int(model_cfg.get("max_pixels", 3136)),
        # the vision tower's own patching (a smaller patch sees the shapes in small images)
        **{k: int(vision[k]) for k in ("patch_size", "temporal_patch_size") if k in vision},
        **({"merge_size": int(vision["spatial_merge_size"])} if "spatial_merge_size" in vision else {}),
    )
    return _image_only_processor_class()(image_processor=images, tokenizer=tok, chat_template=VL_CHAT_TEMPLATE)


def load_processor(model_cfg: Mapping):
    """The model's processor (tokenizer + image processor); left padding for generation."""
    if not model_cfg.get("name_or_path"):
        return _tiny_processor(model_cfg)
    from transformers import AutoProcessor

    extra = {k: int(model_cfg[k]) for k in ("min_pixels", "max_pixels") if model_cfg.get(k)}
    processor = AutoProcessor.from_pretrained(model_path(model_cfg), **extra)
    processor.tokenizer.padding_side = "left"
    return processor


def build_vlm(model_cfg: Mapping, processor, device: torch.device, checkpoint: str | None = None):
    """Qwen2-VL from ``name_or_path``, or a tiny random one whose vocabulary matches ``processor``;
    with ``checkpoint``, what a warm-up (``lewis.warmup``) or GRPO saved there instead: the whole
    model (a tiny one trained from scratch), or a LoRA adapter merged into its base: the local
    model folder the adapter was trained on when it names one (GRPO on a warmed-up tiny model),
    else the configured model."""
    from transformers import AutoModelForImageTextToText

    folder = Path(checkpoint).expanduser() if checkpoint else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} not found (a warm-up's <run dir>/checkpoint)")
    adapter = folder is not None and (folder / "adapter_config.json").is_file()
    base = _adapter_base(folder) if adapter else folder
    if base is not None:
        model = AutoModelForImageTextToText.from_pretrained(str(base), **load_kwargs(model_cfg, device))
    elif model_cfg.get("name_or_path"):
        model = AutoModelForImageTextToText.from_pretrained(model_path(model_cfg), **load_kwargs(model_cfg, device))
    else:
        model = _tiny_vlm(model_cfg, processor)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model.to(device).eval()


def _adapter_base(folder: Path) -> Path | None:
    """The local model folder a PEFT adapter names as its base (``base_model_name_or_path``), if any;
    a hub id is left to the model config, which maps it to local weights."""
    named = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = Path(named).expanduser() if named else None
    return base if base is not None and (base / "config.json").is_file() else None


def _tiny_vlm(model_cfg: Mapping, processor):
    from omegaconf import OmegaConf
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    tiny = model_cfg.get("tiny") or {}
    # transformers' strict config dataclasses take plain dicts only.
    tiny = OmegaConf.to_container(tiny, resolve=True) if OmegaConf.is_config(tiny) else dict(tiny)
    torch.manual_seed(int(model_cfg.get("seed", 0)))
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            **dict(tiny.get("text") or {}),
        },
        vision_config=dict(tiny.get("vision") or {}),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model
