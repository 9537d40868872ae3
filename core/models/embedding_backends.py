"""Faster CPU forwards for sentence-transformers models: ONNX Runtime and OpenVINO.

On a CPU the embedding model's forward is the whole cost of serving it, and these runtimes run the
same graph 2-4x faster than eager PyTorch (``docs/performance.md#embedding``). The model is exported
once with PyTorch's own ONNX exporter, whole (transformer and pooling, so every sentence-transformers
pooling is kept), into ``<cache_dir>/exports/``; both runtimes then load that file.

sentence-transformers' own ``backend="onnx" | "openvino"`` goes through optimum, whose releases pin
transformers below 5 (optimum-onnx) or pull a CUDA torch with torchvision (optimum-intel), so it cannot
install beside this kit; the export and the two runtimes are the same parts optimum itself uses.

Backends (``embedder.backend=`` / the embedding service's ``engine.backend=``):

- ``torch``: the model as loaded (the default; GPUs use it);
- ``onnx``: ONNX Runtime, float32;
- ``onnx-int8``: ONNX Runtime with ONNX Runtime's dynamic int8 quantisation of the matrix products,
  per output channel; the feed-forward output projections (BERT-family names: ``.../output/dense``)
  stay float32, because their inputs (after GELU) have the outliers that cost int8 the most accuracy
  (lowest cosine to torch's vectors 0.993 with them in float32, 0.985 with them in int8);
- ``openvino``: OpenVINO on the CPU, compiled from the same ONNX file; it computes in bfloat16 where
  the CPU has it (AVX512-BF16, AMX) and in float32 elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from core.models.loading import DEFAULT_CACHE, build_once

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
# The packages each backend needs (the `cpu-backends` extra of the install).
PACKAGES = {"onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
OUTPUT = "sentence_embedding"


class _WholeModel(torch.nn.Module):
    """A sentence-transformers model as one graph: named token inputs in, pooled vectors out."""

    def __init__(self, model, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs):
        return self.model(dict(zip(self.input_names, inputs, strict=True)))[OUTPUT]


def export_folder(source: str, label: str, backend: str, cache_dir: str | None) -> Path:
    """Where the export of model ``label`` (loaded from ``source``) for ``backend`` lives, keyed by
    the weights' path and modification time, so an edited or retrained model is exported anew."""
    weights = Path(source)
    stamp = max((f.stat().st_mtime_ns for f in weights.glob("*.safetensors")), default=0) if weights.is_dir() else 0
    key = hashlib.sha256(f"{weights.resolve() if weights.exists() else source}:{stamp}".encode()).hexdigest()[:12]
    name = f"{label.rstrip('/').split('/')[-1]}-{key}-{'onnx-int8' if backend == 'onnx-int8' else 'onnx'}"
    return Path(cache_dir or DEFAULT_CACHE).expanduser() / "exports" / name


def export_onnx(model, input_names: list[str], folder: Path, int8: bool) -> None:
    """Write ``model.onnx`` into ``folder``: ``model`` (a sentence-transformers model on the CPU) whole,
    with dynamic batch and sequence axes; with ``int8``, ONNX Runtime's dynamic quantisation of it."""
    sample = model.preprocess(["a short sentence to trace the graph", "two"])
    dynamic = {name: {0: "batch", 1: "sequence"} for name in input_names}
    plain = folder / ("float32.onnx" if int8 else "model.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape checks it records as constants (attention-mask padding,
        # index ops); the exported graph's vectors match torch's (tests/test_embedding_backends_on_cpu.py).
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: the dynamo one cannot trace the module dict a
        # sentence-transformers model takes.
        torch.onnx.export(
            _WholeModel(model, input_names).eval(),
            tuple(sample[name] for name in input_names),
            str(plain),
            input_names=input_names,
            output_names=[OUTPUT],
            dynamic_axes={**dynamic, OUTPUT: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    if int8:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        keep = [
            node.name
            for node in onnx.load(str(plain)).graph.node
            if node.op_type == "MatMul" and "/output/dense/" in node.name and "/attention/" not in node.name
        ]
        quantize_dynamic(
            str(plain),
            str(folder / "model.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep,
        )
        plain.unlink()


class ExportedForward:
    """The exported model run by ONNX Runtime or OpenVINO: ``__call__(features)`` maps the tokenizer's
    arrays to a ``(batch, dim)`` float32 array, as the torch model's ``sentence_embedding`` would be."""

    def __init__(self, path: Path, backend: str, input_names: list[str]):
        self.input_names = input_names
        if backend == "openvino":
            import openvino

            self._compiled = openvino.Core().compile_model(str(path), "CPU")
            self._run = lambda feed: self._compiled(feed)[0]
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._run = lambda feed: session.run(None, feed)[0]

    def __call__(self, features: Mapping[str, torch.Tensor]) -> np.ndarray:
        feed = {name: features[name].numpy().astype(np.int64, copy=False) for name in self.input_names}
        return np.asarray(self._run(feed), dtype=np.float32)


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse an unknown backend, a CPU runtime on a GPU, or a runtime whose packages are missing."""
    if backend not in BACKENDS:
        raise ValueError(f"embedding backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return
    if device.type != "cpu":
        raise ValueError(f"embedding backend {backend!r} runs on the CPU; use backend=torch with gpus > 0")
    missing = [p for p in PACKAGES[backend] if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(
            f"embedding backend {backend!r} needs {', '.join(missing)}: pip install 'rewardkit[cpu-backends]'"
        )


def exported_forward(model, source: str, label: str, backend: str, cache_dir: str | None = None) -> ExportedForward:
    """``model`` (``label``, loaded from ``source``) as ``backend`` runs it, exported on first use."""
    input_names = [
        name for name in model.preprocess(["a"]) if name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    folder = export_folder(source, label, backend, cache_dir)
    if not (folder / "model.onnx").exists():
        log.warning("exporting %s for the %s backend once into %s", label, backend, folder)
    build_once(folder, "model.onnx", lambda target: export_onnx(model, input_names, target, backend == "onnx-int8"))
    return ExportedForward(folder / "model.onnx", backend, input_names)
