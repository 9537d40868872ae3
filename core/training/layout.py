"""The one place where ``gpus`` (and ``deepspeed``) become a device layout for training.

``gpus=0``: one CPU process, in bf16 autocast where the CPU computes bf16 natively (as TRL's
default ``bf16=True`` does), else fp32. ``gpus=1``: one CUDA process in bf16. ``gpus=N>1``: N processes
launched by ``accelerate launch`` (data parallel), with DeepSpeed when a ``deepspeed=`` option
gives a config. The accelerate config file and the DeepSpeed JSON are written to the run dir.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.config_errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Processes, device and precision for a training run."""

    gpus: int
    num_processes: int
    device: str
    mixed_precision: str
    deepspeed: dict | None

    @property
    def distributed_type(self) -> str:
        """accelerate's name for the layout."""
        if self.deepspeed:
            return "DEEPSPEED"
        return "MULTI_GPU" if self.num_processes > 1 else "NO"


def cpu_mixed_precision() -> str:
    """``bf16`` where the CPU computes bf16 natively (AVX-512 BF16 or AMX, and oneDNN uses it),
    else ``no``: there TRL's default bf16 autocast makes the training forward and backward faster
    (a SmolLM2 GRPO step 1.1-1.2x); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "no"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to tell native from emulated, and fp32 is never slow
        return "no"
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no"


def layout_for(gpus: int, deepspeed: Mapping | None = None) -> Layout:
    """The layout for ``gpus`` GPUs (0 = CPU), with an optional DeepSpeed config."""
    if gpus < 0:
        raise ConfigError(f"gpus must be >= 0, got {gpus}")
    if gpus == 0 and deepspeed:
        raise ConfigError("DeepSpeed needs GPUs: use deepspeed=none with gpus=0")
    if gpus == 0:
        return Layout(0, 1, "cpu", cpu_mixed_precision(), None)
    return Layout(gpus, gpus, "cuda", "bf16", dict(deepspeed) if deepspeed else None)


def accelerate_config(layout: Layout, deepspeed_file: str | None = None) -> dict:
    """The contents of an ``accelerate launch --config_file`` YAML for this layout."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": layout.distributed_type,
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": layout.num_processes,
        "mixed_precision": layout.mixed_precision,
        "use_cpu": layout.device == "cpu",
        "gpu_ids": "all",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
    }
    if layout.deepspeed:
        if deepspeed_file is None:
            raise ValueError("a DeepSpeed layout needs the path of its JSON config")
        stage = int(layout.deepspeed.get("zero_optimization", {}).get("stage", 0))
        config["deepspeed_config"] = {"deepspeed_config_file": deepspeed_file, "zero3_init_flag": stage == 3}
    return config


def needs_launcher(layout: Layout) -> bool:
    """True when this process must start the others (several GPUs, not yet inside a launch)."""
    return layout.num_processes > 1 and "LOCAL_RANK" not in os.environ


def write_launch_files(layout: Layout, run_dir: Path) -> tuple[Path, Path | None]:
    """Write ``accelerate.yaml`` (and ``deepspeed.json``) into ``run_dir``; return their paths."""
    ds_file = None
    if layout.deepspeed:
        ds_file = run_dir / "deepspeed.json"
        ds_file.write_text(json.dumps(layout.deepspeed, indent=2))
    acc_file = run_dir / "accelerate.yaml"
    acc_file.write_text(yaml.safe_dump(accelerate_config(layout, str(ds_file) if ds_file else None)))
    return acc_file, ds_file


def launch_command(accelerate_file: Path, argv: Sequence[str], run_dir: Path) -> list[str]:
    """``accelerate launch`` of this same ``run.py`` command, every process in the same run dir."""
    script, *overrides = argv
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_file),
        script,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
