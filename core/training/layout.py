"""The one place where ``gpus``, ``processes`` (and ``deepspeed``) become a device layout for training.

``gpus=0``: one CPU process, in bf16 autocast where the CPU computes bf16 natively (as TRL's
default ``bf16=True`` does), else fp32. ``gpus=1``: one CUDA process in bf16. ``gpus=N>1``: N
ranks, one per GPU (NCCL). ``processes=N`` with ``gpus=0``: N CPU ranks (gloo), through the very
same relaunch, so the multi-rank code runs on any machine. Several ranks start through
``torch.distributed.run`` (torchrun), which starts N processes on the CPU as on GPUs
(``accelerate launch`` starts only one CPU process unless mpirun is used); TRL's ``GRPOConfig``
carries the rest (DeepSpeed JSON, bf16), which accelerate reads in each rank. ``nodes>1`` (a SLURM
allocation) adds torchrun's multi-node settings from SLURM's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.config_errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Ranks, device and precision for a training run (``num_processes`` ranks on each of ``nodes``)."""

    gpus: int
    num_processes: int
    device: str
    mixed_precision: str
    deepspeed: dict | None
    nodes: int = 1

    @property
    def world_size(self) -> int:
        """Ranks in all."""
        return self.num_processes * self.nodes

    @property
    def backend(self) -> str:
        """The process-group backend: NCCL between GPUs, gloo between CPU ranks."""
        return "nccl" if self.device == "cuda" else "gloo"


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


def plain(node: Mapping) -> dict:
    """A config node as plain, JSON-ready data (a DeepSpeed config from ``deepspeed=``, resolved)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else json.loads(json.dumps(node))


def layout_for(gpus: int, deepspeed: Mapping | None = None, processes: int | None = None, nodes: int = 1) -> Layout:
    """The layout for ``gpus`` GPUs (0 = CPU) per node, ``processes`` ranks per node (``None``:
    one per GPU, or one on the CPU) on ``nodes`` nodes, with an optional DeepSpeed config."""
    if gpus < 0:
        raise ConfigError(f"gpus must be >= 0, got {gpus}")
    ranks = max(gpus, 1) if processes is None else int(processes)
    if ranks < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    if nodes < 1:
        raise ConfigError(f"nodes must be >= 1, got {nodes}")
    if gpus and ranks != gpus:
        raise ConfigError(f"processes={processes} with gpus={gpus}: one rank per GPU, so leave processes unset")
    if gpus == 0 and deepspeed and ranks * nodes < 2:
        raise ConfigError("DeepSpeed on the CPU runs on several ranks: add processes=2 (or use gpus=N)")
    ds = plain(deepspeed) if deepspeed else None
    if gpus == 0:
        return Layout(0, ranks, "cpu", cpu_mixed_precision(), ds, nodes)
    return Layout(gpus, ranks, "cuda", "bf16", ds, nodes)


def needs_launcher(layout: Layout) -> bool:
    """True when this process must start the ranks (several of them, and not yet inside a launch)."""
    return layout.world_size > 1 and "LOCAL_RANK" not in os.environ


def is_main_rank() -> bool:
    """Whether this process writes the run's artefacts: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def write_deepspeed_file(layout: Layout, run_dir: Path) -> Path | None:
    """Write ``deepspeed.json`` into ``run_dir`` for a DeepSpeed layout; return its path."""
    if not layout.deepspeed:
        return None
    path = run_dir / "deepspeed.json"
    # whole or not at all: every rank writes it and reads it at once (same content), so a reader
    # must never see another rank's half-written file
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    part.write_text(json.dumps(layout.deepspeed, indent=2))
    os.replace(part, path)
    return path


def slurm_restarts(env: Mapping[str, str] = os.environ) -> int:
    """How often SLURM has requeued this job (``SLURM_RESTART_COUNT``: preemption, ``scontrol
    requeue``, or submitit's requeue on its time-out signal); 0 outside SLURM."""
    return int(env.get("SLURM_RESTART_COUNT") or 0)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[03-04]``: ``node03``), as ``scontrol`` expands it."""
    try:
        return subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        if "[" in nodelist:
            raise ConfigError(
                f"cannot expand SLURM's node list {nodelist!r} without scontrol: set MASTER_ADDR"
            ) from None
        return nodelist.split(",")[0]


def rendezvous(layout: Layout, env: Mapping[str, str]) -> list[str]:
    """torchrun's settings for where the ranks meet: one node by itself (``--standalone``, a free
    port), or several nodes of a SLURM allocation (``SLURM_NNODES``, ``SLURM_NODEID``, the first
    host of ``SLURM_JOB_NODELIST``; ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` win when set)."""
    if layout.nodes == 1:
        return ["--standalone"]
    slurm_nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if slurm_nodes is not None and int(slurm_nodes) != layout.nodes:
        raise ConfigError(f"nodes={layout.nodes} but SLURM allocated {slurm_nodes}: set hydra.launcher.nodes to match")
    node_rank = env.get("NODE_RANK") or env.get("SLURM_NODEID")
    master = env.get("MASTER_ADDR") or (first_host(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env else None)
    if node_rank is None or master is None:
        raise ConfigError(
            f"nodes={layout.nodes} needs SLURM's environment (SLURM_NODEID, SLURM_JOB_NODELIST) or "
            "NODE_RANK and MASTER_ADDR: run it under hydra/launcher=submitit_slurm"
        )
    # the same port on every node: from MASTER_PORT, else from the job id
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 10000)
    return [
        f"--nnodes={layout.nodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={master}",
        f"--master_port={port}",
    ]


def launch_command(
    layout: Layout, argv: Sequence[str], run_dir: Path, env: Mapping[str, str] = os.environ
) -> list[str]:
    """torchrun of this same ``run.py`` command: ``num_processes`` ranks on this node, all in one run dir."""
    script, *overrides = argv
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={layout.num_processes}",
        *rendezvous(layout, env),
        script,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launching process dies, even by SIGKILL (Linux), so no
    rank trains on after its launcher is gone (a resumed run would race it)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_ranks(layout: Layout, argv: Sequence[str], run_dir: Path) -> None:
    """Start the ranks (``launch_command``) and wait for them. torchrun ends every rank when one
    fails; that failure is raised as ``JobFailed`` with the exit status and where the logs are."""
    from core.config_errors import JobFailed

    command = launch_command(layout, argv, run_dir)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    status = subprocess.run(command, preexec_fn=preexec).returncode
    if status != 0:
        raise JobFailed(
            f"training ranks failed (torchrun exit status {status}); every rank was stopped. The rank's "
            f"error is above; the run dir is {run_dir}: resume=latest continues from its last complete checkpoint"
        )
