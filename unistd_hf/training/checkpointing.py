"""Everything a run writes that must survive a crash: one atomic writer, and the training checkpoints.

A checkpoint folder `checkpoints/step-NNNNNNNN/` holds Accelerate's state (model weights as safetensors, optimizer
and RNG states), the rank search (`rank_search.safetensors` + `.json`), the scheduler (`scheduler.json`) and
`trainer_state.json`. It is written under a temporary name and renamed, so it exists complete or not at all.
The search and the scheduler are saved here rather than registered with Accelerate, whose loader unpickles
registered objects (`weights_only=False`); these files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "CHECKPOINT_PREFIX"]

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
SCHEDULER_STATE = "scheduler.json"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (a folder only exists once fully written)."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).exists()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, keep: int, state: dict[str, Any], search, scheduler) -> None:
    """All processes call this (Accelerate gathers their RNG states); the main process renames and prunes."""
    folder = Path(output_dir) / "checkpoints"
    target = folder / f"{CHECKPOINT_PREFIX}{state['global_step']:08d}"
    tmp = folder / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if search is not None:
            search.save(tmp)
        (tmp / SCHEDULER_STATE).write_text(json.dumps(scheduler.state_dict()))
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, folder: str | Path, search, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, RNG, rank search and scheduler; returns the trainer state (step counters, logs)."""
    folder = Path(folder)
    accelerator.load_state(str(folder))
    if search is not None:
        search.load(folder)
    scheduler.load_state_dict(json.loads((folder / SCHEDULER_STATE).read_text()))
    return json.loads((folder / TRAINER_STATE).read_text())
