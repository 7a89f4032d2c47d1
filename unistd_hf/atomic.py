"""The one atomic writer: every file or folder the library writes for keeps (adapters, reports, checkpoints)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["write_atomically", "write_text_atomically"]


def write_atomically(target: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call `write(tmp)` for a temporary sibling path, then rename it to `target` (a file or a folder; an older
    `target` is replaced). A crash leaves either the old `target` or the new one, never a half-written one."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    _remove(tmp)
    write(str(tmp))
    if target.is_dir() and tmp.is_dir():  # os.replace cannot replace a non-empty folder: move the old one aside
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
