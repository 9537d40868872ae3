"""Request fields that name a file on the server: resolved, confined to allowed roots, and
refused with a 4xx (never a 500) when no file system would take them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def real_roots(roots: Sequence[str | Path]) -> list[Path]:
    """The folders ``roots`` name, resolved (``~`` and symlinks), for ``resolve_under``."""
    return [Path(root).expanduser().resolve() for root in roots]


def resolve_under(ref: str, roots: Sequence[Path], what: str, kind: str = "", hint: str = "") -> Path:
    """The real path of ``ref`` (``~``, ``..`` and symlinks resolved) when it lies under one of
    ``roots`` (already resolved: ``real_roots``): 400 for a NUL byte or a name the file system
    refuses, 403 outside the roots (``kind`` names the roots in the message, ``hint`` follows it).

    >>> resolve_under("/tmp/../etc/passwd", real_roots(["/tmp"]), "dataset_path", "dataset")
    Traceback (most recent call last):
    PermissionError: dataset_path '/tmp/../etc/passwd' is outside the allowed dataset roots
    """
    if "\x00" in ref:
        raise ValueError(f"{what} contains a NUL byte")
    try:
        real = Path(ref).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        raise ValueError(f"{what} {ref[:200]!r} is not a usable path: {exc}") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise PermissionError(f"{what} {ref[:200]!r} is outside the allowed {kind + ' ' if kind else ''}roots{hint}")
    return real


def is_file(path: Path, what: str) -> bool:
    """Whether ``path`` is a file; 400 (not a 500) when the file system refuses the name (too long)."""
    try:
        return path.is_file()
    except OSError as exc:
        raise ValueError(f"{what} is not a usable path: {exc.strerror or exc}") from None
