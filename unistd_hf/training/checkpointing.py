"""The training loop's checkpoints: what it adds to the shared checkpoint writer (`unistd_hf/atomic.py`), and the restore.

A checkpoint folder `checkpoints/step-NNNNNNNN/` holds Accelerate's state (model weights as safetensors, optimizer
and RNG states), the rank search (`rank_search.safetensors` + `.json`), the scheduler (`scheduler.json`) and
`trainer_state.json`. It is written under a temporary name and renamed, so it exists complete or not at all.
The search and the scheduler are saved here rather than registered with Accelerate, whose loader unpickles
registered objects (`weights_only=False`); these files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..atomic import TRAINER_STATE, latest_checkpoint, write_checkpoint

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint"]

SCHEDULER_STATE = "scheduler.json"


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, keep: int, state: dict[str, Any], search, scheduler) -> None:
    """All processes call this (Accelerate gathers their RNG states); the main process adds the search, the
    scheduler and the trainer state."""

    def write_main(tmp: Path) -> None:
        if search is not None:
            search.save(tmp)
        (tmp / SCHEDULER_STATE).write_text(json.dumps(scheduler.state_dict()))
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))

    write_checkpoint(accelerator, output_dir, state["global_step"], keep, write_main)


def load_checkpoint(accelerator: Accelerator, folder: str | Path, search, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, RNG, rank search and scheduler; returns the trainer state (step counters, logs)."""
    folder = Path(folder)
    accelerator.load_state(str(folder))
    if search is not None:
        search.load(folder)
    scheduler.load_state_dict(json.loads((folder / SCHEDULER_STATE).read_text()))
    return json.loads((folder / TRAINER_STATE).read_text())
