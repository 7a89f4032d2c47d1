"""Writing for keeps, in one place: the atomic writer (files and folders: adapters, reports, backbones) and the
checkpoint folders of the training and pretraining loops, which appear complete or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["write_atomically", "write_text_atomically", "check_writable", "latest_checkpoint", "write_checkpoint",
           "CHECKPOINT_PREFIX", "TRAINER_STATE"]

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete


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


def check_writable(folder: Path) -> None:
    """The folder, or the nearest existing folder above it, must be a writable folder. Checked without writing, so
    that nothing appears before the arguments are validated and parallel processes cannot race on a probe file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a file" if existing.exists() and not existing.is_dir() else "not writable"
        raise ValueError(f"output_dir {str(folder)!r} is not writable: {str(existing)!r} is {what}")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `output_dir/checkpoints`."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).exists()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def write_checkpoint(accelerator: Any, output_dir: str | os.PathLike, step: int, keep: int,
                     write_main: Callable[[Path], None]) -> Path:
    """`output_dir/checkpoints/step-NNNNNNNN`: all processes write Accelerate's state (model weights as safetensors;
    optimizer and RNG states with torch.save) into one temporary folder, the main process adds its files with
    `write_main(tmp)` (which must write TRAINER_STATE), renames the folder and keeps the newest `keep`."""
    folder = Path(output_dir) / "checkpoints"
    target = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        write_main(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target
