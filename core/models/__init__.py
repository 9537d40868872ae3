"""Models and text generation.

``loading``: a model config node (``conf/model/*.yaml``) becomes a tokenizer and model (packaged
weights, the hub, or a tiny random model for tests), on the device ``gpus`` names.
``generation``: the ``TextGenerator`` protocol and its in-process engine; ``generation_client``:
the same protocol over any OpenAI-compatible server; ``generation_app``: that server.
"""

from core.models.generation import Completion, SamplingParams, TokenLogprob
from core.models.generation_client import GenerationClient
from core.models.generation_engine import GenerationEngine
from core.models.loading import build_causal_lm, device_for, load_tokenizer, model_label, resolve_path
from core.models.protocols import TextGenerator

__all__ = [
    "Completion",
    "GenerationClient",
    "GenerationEngine",
    "SamplingParams",
    "TextGenerator",
    "TokenLogprob",
    "build_causal_lm",
    "device_for",
    "load_tokenizer",
    "model_label",
    "resolve_path",
]
