"""Configuration that cannot work, found before any model loads: ``run.py`` prints the message
(which names the key and what it may be) and exits with status 2, without a traceback."""

from __future__ import annotations

import os
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A setting that cannot work here; the message names the key and the values it may take."""


class JobFailed(RuntimeError):
    """A job that stopped for a reason its message says in full (a training rank died, say):
    ``run.py`` prints it and exits with status 1, without a traceback."""


def config_error_in(exc: BaseException) -> ConfigError | JobFailed | None:
    """The ``ConfigError`` or ``JobFailed`` behind ``exc`` (Hydra's ``instantiate`` wraps what a constructor raises)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError | JobFailed):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def check_writable_dir(path: str | Path, key: str) -> Path:
    """Create ``path`` if needed and prove a file can be written in it (a full disk, a read-only
    mount or a file in the way fail here, at start, not at the first checkpoint)."""
    folder = Path(path)
    probe = folder / f".write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as out:
                out.write(b"\0" * 4096)
                out.flush()
                os.fsync(out.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{key}={folder} cannot be written ({exc.strerror or exc}): choose a writable folder"
        ) from None
    return folder


# Keys read as numbers outside any dataclass, and the type their value must have.
KEY_TYPES = {"seed": int, "gpus": int, "lora.r": int, "lora.alpha": int, "lora.dropout": float}


def _expected(hint) -> tuple[type, ...] | None:
    """The plain types a dataclass field hint allows (``int | None`` → int), or None when the
    hint is anything richer (lists, unions of several kinds), which is left to its consumer."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    if len(args) != 1 or args[0] not in (int, float, bool, str):
        return None
    return (int, float) if args[0] is float else (args[0],)


def _wrong(value, kinds: tuple[type, ...]) -> bool:
    if value is None:
        return False
    if isinstance(value, bool) and bool not in kinds:
        return True
    return not isinstance(value, kinds)


def check_types(cfg, consumers: dict[str, type]) -> None:
    """Refuse values of the wrong type before anything runs: the ``KEY_TYPES`` numbers, and each
    ``node`` of ``consumers`` against the fields of the dataclass that reads it (``server`` →
    ``ServerSettings``, ``trainer`` → TRL's ``GRPOConfig``)."""
    from omegaconf import OmegaConf

    problems = []
    for key, kind in KEY_TYPES.items():
        value = OmegaConf.select(cfg, key)
        if _wrong(value, (int, float) if kind is float else (kind,)):
            problems.append(f"{key}={value!r} (must be {kind.__name__})")
    for node, cls in consumers.items():
        if cfg.get(node) is None:
            continue
        hints = typing.get_type_hints(cls)
        for key, value in cfg[node].items():
            kinds = _expected(hints[key]) if key in hints else None
            if kinds and _wrong(value, kinds):
                problems.append(f"{node}.{key}={value!r} (must be {' or '.join(k.__name__ for k in kinds)})")
    if problems:
        raise ConfigError("wrong type: " + "; ".join(problems))
