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
from collections.abc import Mapping

import torch

from core.models.loading import load_kwargs, model_path, packaged_tokenizer
from core.rewards.cache import LRUCache

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

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
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = copy.deepcopy(packaged_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS + ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = "[PAD]"
    tok.padding_side = "left"
    tok.chat_template = VL_CHAT_TEMPLATE
    pixels = {
        "min_pixels": int(model_cfg.get("min_pixels", 3136)),
        "max_pixels": int(model_cfg.get("max_pixels", 3136)),
    }
    images = Qwen2VLImageProcessorPil(**pixels)
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


def build_vlm(model_cfg: Mapping, processor, device: torch.device):
    """Qwen2-VL from ``name_or_path``, or a tiny random one whose vocabulary matches ``processor``."""
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if model_cfg.get("name_or_path"):
        model = AutoModelForImageTextToText.from_pretrained(model_path(model_cfg), **load_kwargs(model_cfg, device))
        return model.to(device).eval()
    from omegaconf import OmegaConf

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
    return model.to(device).eval()
