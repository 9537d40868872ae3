"""What the policy and value servers share: a LoRA-adapted model that answers requests while a
background thread trains it, one training at a time, stoppable at a step boundary.

``AdapterModel.train`` is the loop (epochs, shuffled micro-batches, gradient accumulation,
clipping, a JSONL log, the adapter saved at the end or on stop); subclasses say what a batch's
loss is (PPO for the policy, MSE for the value). One lock serialises training steps and
inference calls, so inference waits at most one step while a training runs.

``TrainingEngine`` is the part of the in-process API both servers expose the same way:
``status``, ``train_from_dataset`` and ``stop_training`` with the reference policy server's fields and messages.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.models.loading import device_for, load_tokenizer
from core.training.grpo import lora_config
from ppo_server.samples import Sample, collect_samples, write_samples

log = logging.getLogger(__name__)

# chat: the model's chat template around the question (instruct models); raw: the text as sent.
PROMPT_FORMATS = ("chat", "raw")


@dataclass
class TrainSettings:
    """How the server trains (its ``training:`` config node); the request gives epochs, lr and data."""

    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # Prompt + response tokens per sample (the prompt is cut from the left beyond this).
    max_length: int = 1024
    # PPO only: clip range of the policy ratio and weight of the KL penalty to the reference.
    clip_range: float = 0.2
    kl_coef: float = 0.05
    seed: int = 0


class AdapterModel:
    """A model with a LoRA adapter, a lock shared by inference and training, and the training loop.

    Subclasses build ``self.model`` and implement ``prepare`` (per-sample data computed once before
    training) and ``loss`` (the loss of a micro-batch and its statistics).

    Args:
        model: a model config node (``conf/model/*.yaml``).
        lora: the ``lora:`` node (``adapter_path`` loads a saved adapter).
        gpus: 0 for the CPU.
        training: ``TrainSettings`` fields.
        max_batch_size: sequences per model call (larger inputs are split).
        prompt_format: ``chat`` (the chat template around each question, as training sees it) or ``raw``.
    """

    # PEFT task type of the adapter ("CAUSAL_LM", "SEQ_CLS").
    task_type: str = ""

    def __init__(
        self,
        model: Mapping,
        lora: Mapping,
        gpus: int = 0,
        training: Mapping | None = None,
        max_batch_size: int = 32,
        prompt_format: str = "chat",
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        self.max_batch_size = max_batch_size
        self.device = device_for(gpus)
        self.tokenizer = load_tokenizer(model)
        self.settings = TrainSettings(**dict(training or {}))
        self.lock = threading.Lock()
        self.model = self._wrap(self.build(model), self.adapter_settings(lora))

    def adapter_settings(self, lora: Mapping) -> Mapping:
        """The ``lora:`` node as this engine trains it (a subclass may add modules to save)."""
        return lora

    def build(self, model_cfg: Mapping):
        """The base model (without adapter), on ``self.device``, in eval mode."""
        raise NotImplementedError

    def prepare(self, samples: Sequence[Sample]) -> list:
        """Per-sample data the loss needs, computed once before the first step; model calls take
        ``self.lock`` one micro-batch at a time, so inference is not held up for the whole dataset."""
        return [None] * len(samples)

    def loss(self, samples: Sequence[Sample], extras: Sequence) -> tuple[torch.Tensor, dict]:
        """The micro-batch's loss (mean over the batch) and statistics to log."""
        raise NotImplementedError

    def save_adapter(self, target: Path) -> None:
        """Save the adapter to ``target`` atomically: written beside it, then renamed, so a crash
        leaves either the whole adapter or none (a ``*.partial`` folder is never loaded)."""
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with self.lock:
            self.model.save_pretrained(str(partial))
        os.replace(partial, target)

    def load_adapter(self, folder: Path) -> None:
        """Put a saved adapter's weights into the model (same LoRA settings)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(folder / "adapter_model.safetensors"), device=str(self.device))
        with self.lock:
            set_peft_model_state_dict(self.model, weights)

    def _wrap(self, base, lora: Mapping):
        from peft import PeftModel, get_peft_model

        adapter = lora.get("adapter_path")
        if adapter:  # continue from a saved adapter (the reference policy server's LoRA model path)
            return PeftModel.from_pretrained(base, adapter, is_trainable=True).eval()
        return get_peft_model(base, lora_config(lora, task_type=self.task_type)).eval()

    def prompt(self, messages: Sequence[tuple[str, str]], context: str = "") -> str:
        """The text the model continues, the same for inference and training: the chat template
        over ``messages`` (``prompt_format: chat``) or their contents as they are (``raw``),
        followed by ``context`` (the steps so far)."""
        if self.prompt_format == "raw":
            return "\n".join(content for _, content in messages) + context
        rendered = self.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
        )
        return rendered + context

    def encode(self, sample: Sample) -> tuple[list[int], int]:
        """Token ids of prompt + context + response and where the response starts."""
        prompt_ids = self.tokenizer(self.prompt(sample.messages, sample.context), add_special_tokens=False)["input_ids"]
        response_ids = self.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        response_ids = response_ids[: self.settings.max_length - 1]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - (self.settings.max_length - len(response_ids))) :]
        return prompt_ids + response_ids, len(prompt_ids)

    def pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask on the model's device."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return ids, mask

    def train(
        self, samples: Sequence[Sample], num_epochs: int, lr: float, should_stop: Callable[[], bool], out_dir: Path
    ) -> dict:
        """Train on ``samples``; stop early when ``should_stop()`` at a step boundary; save the adapter."""
        s = self.settings
        out_dir.mkdir(parents=True, exist_ok=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        extras = self.prepare(samples)
        order, rng = list(range(len(samples))), random.Random(s.seed)
        batches_per_epoch = -(-len(samples) // s.micro_batch_size)
        step, micro, stopped, losses = 0, 0, False, []
        with (out_dir / "train_log.jsonl").open("a") as log_file:
            for epoch in range(num_epochs):
                rng.shuffle(order)
                for b in range(batches_per_epoch):
                    if micro % s.gradient_accumulation_steps == 0 and should_stop():
                        stopped = True
                        break
                    idx = order[b * s.micro_batch_size : (b + 1) * s.micro_batch_size]
                    with self.lock:
                        self.model.train()
                        try:
                            loss, stats = self.loss([samples[i] for i in idx], [extras[i] for i in idx])
                            (loss / s.gradient_accumulation_steps).backward()
                            micro += 1
                            last = epoch == num_epochs - 1 and b == batches_per_epoch - 1
                            if micro % s.gradient_accumulation_steps == 0 or last:
                                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                                optimizer.step()
                                optimizer.zero_grad(set_to_none=True)
                                step += 1
                        finally:
                            self.model.eval()
                    losses.append(float(loss))
                    row = {"epoch": epoch, "micro_batch": micro, "step": step, "loss": float(loss), **stats}
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                if stopped:
                    break
        adapter = out_dir / "adapter"
        self.save_adapter(adapter)
        return {
            "steps": step,
            "micro_batches": micro,
            "stopped": stopped,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "adapter": str(adapter),
        }


class TrainingEngine:
    """``status``, ``train_from_dataset`` and ``stop_training`` over an ``AdapterModel``.

    Args:
        adapter: the LoRA-adapted model to train.
        allow_training / allow_inference: switches a server is started with (403 when off).
        dataset_roots: folders ``dataset_path`` may point into.
        scratch: where ``save_samples`` writes (``$SCRATCH``; samples go to ``<scratch>/datasets``).
        output_dir: each training writes ``train_log.jsonl`` and ``adapter/`` under ``<output_dir>/training-<n>``.
        resume_adapter: a server started on an ``output_dir`` that holds earlier trainings (a restart
            after a crash) serves the newest saved adapter, reports it in ``last_training``, and
            numbers its next training after them; false starts from the configured adapter.
    """

    def __init__(
        self,
        adapter: AdapterModel,
        allow_training: bool = True,
        allow_inference: bool = True,
        dataset_roots: Sequence[str] = (),
        scratch: str | None = None,
        output_dir: str = "outputs/ppo_server",
        stop_timeout_s: float = 600.0,
        resume_adapter: bool = True,
    ):
        self.adapter = adapter
        self.allow_training, self.allow_inference = bool(allow_training), bool(allow_inference)
        self.dataset_roots = [str(r) for r in dataset_roots]
        self.scratch = scratch or str(Path(output_dir) / "scratch")
        self.output_dir = Path(output_dir)
        self.stop_timeout_s = stop_timeout_s
        self.stop_flag = threading.Event()
        self.last_training: dict | None = None
        self._thread: threading.Thread | None = None
        self._runs = 0
        self._pick_up_earlier_trainings(resume_adapter)

    def _pick_up_earlier_trainings(self, load: bool) -> None:
        runs = {int(d.name.split("-")[-1]): d for d in self.output_dir.glob("training-*") if d.name[9:].isdigit()}
        self._runs = max(runs, default=0)
        for folder in runs.values():  # what a crash while saving left: never loaded
            for partial in folder.glob("*.partial"):
                log.warning("removing %s: an adapter the server was stopped while saving", partial)
                shutil.rmtree(partial)
        saved = [runs[n] / "adapter" for n in sorted(runs) if (runs[n] / "adapter" / "adapter_config.json").exists()]
        if saved and load:
            self.adapter.load_adapter(saved[-1])
            self.last_training = {"adapter": str(saved[-1]), "restored": True}
            log.info("serving the adapter saved by an earlier run: %s", saved[-1])

    @property
    def training(self) -> bool:
        """Whether a training is running now."""
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        """The reference policy server's ``GET /`` body, plus whether a training runs and how the last one ended."""
        flag = self.stop_flag.is_set()
        return {
            "status": f"Server is running, ALLOW_TRAINING: {self.allow_training}, STOP_TRAINING_FLAG: {flag}",
            "allow_training": self.allow_training,
            "stop_training_flag": flag,
            "allow_inference": self.allow_inference,
            "training": self.training,
            "last_training": self.last_training,
        }

    def check_inference(self) -> None:
        """403 when the server was started with inference off."""
        if not self.allow_inference:
            raise PermissionError("inference is disabled on this server (allow_inference=false)")

    def train_from_dataset(
        self,
        dataset: list | None = None,
        dataset_path: str | None = None,
        dataset_loader_class: str | None = None,
        num_epochs: int = 1,
        percent_of_data: float = 1.0,
        save_samples: bool = False,
        lr: float = 1e-5,
    ) -> dict:
        """Check the request, then train in a background thread; returns the reference policy server's message."""
        if not self.allow_training:
            raise PermissionError("training is disabled on this server (allow_training=false)")
        if self.training:
            raise PermissionError("a training is already running; POST /stop_training first")
        if num_epochs < 1 or not lr > 0:
            raise ValueError(f"num_epochs must be >= 1 and lr > 0, got {num_epochs} and {lr}")
        samples = collect_samples(
            dataset, dataset_path, dataset_loader_class, self.dataset_roots, percent_of_data, self.adapter.settings.seed
        )
        saved = str(write_samples(dataset, self.scratch)) if save_samples and dataset is not None else None
        self._runs += 1
        out_dir = self.output_dir / f"training-{self._runs}"
        self.stop_flag.clear()
        self.last_training = {"saved_samples": saved} if saved else None
        self._thread = threading.Thread(
            target=self._run, args=(samples, int(num_epochs), float(lr), out_dir), name="training", daemon=True
        )
        self._thread.start()
        gpus = torch.cuda.device_count() if self.adapter.device.type == "cuda" else 0
        return {"message": f"Training started with {os.cpu_count()} cores and {gpus} GPUs", "output_dir": str(out_dir)}

    def _run(self, samples: list[Sample], num_epochs: int, lr: float, out_dir: Path) -> None:
        started = time.time()
        try:
            result = self.adapter.train(samples, num_epochs, lr, self.stop_flag.is_set, out_dir)
            result.update(samples=len(samples), seconds=round(time.time() - started, 3), error=None)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the failure shows in GET /
            log.exception("training failed")
            result = {"error": f"{type(exc).__name__}: {exc}", "samples": len(samples)}
        self.last_training = {**(self.last_training or {}), **result}
        log.info("training finished: %s", result)

    def wait_for_training(self, timeout: float = 600.0) -> dict | None:
        """Block until no training runs; return ``last_training`` (steps, losses, adapter path)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self.training:
                raise TimeoutError(f"training still running after {timeout:g}s")
        return self.last_training

    def stop_training(self) -> dict:
        """Stop the running training at its next step boundary and wait until its adapter is saved."""
        if not self.training:
            return {"message": "No training is running", "last_training": self.last_training}
        self.stop_flag.set()
        self._thread.join(self.stop_timeout_s)
        if self.training:
            raise TimeoutError(f"training did not stop within {self.stop_timeout_s:g}s; try again")
        return {"message": "Training stopped and model saved", "last_training": self.last_training}
