"""Test-split metrics of a model and of the copy-last-frame forecast, sharded over processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..metrics import MetricAccumulator, copy_last_frame_baseline
from .schedule import TaskData

__all__ = ["evaluate_task"]


@torch.no_grad()
def evaluate_task(
    model: torch.nn.Module, task: TaskData, batch_size: int, accelerator: Accelerator | None = None,
    max_clips: int | None = None, split: str = "test",
) -> tuple[dict[str, float], dict[str, float]]:
    """(model metrics, copy-last-frame metrics) on the task's `split` ("test" or "validation"). Each process
    evaluates every world-th clip; the exact metric sums are combined by one all-reduce."""
    clips = getattr(task, split)
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    count = len(clips) if max_clips is None else min(max_clips, len(clips))
    mine = list(range(rank, count, world))
    metrics, thresholds = task.info.metrics, task.info.csi_thresholds
    accumulators = {k: MetricAccumulator(metrics, thresholds, device=device) for k in ("model", "baseline")}
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), batch_size):
        batch = clips[mine[start : start + batch_size]]
        inputs, targets = batch["inputs"].to(device).float(), batch["targets"].to(device).float()
        predictions = model(pixel_values=inputs, task=task.name).predictions.float()
        accumulators["model"].update(predictions, targets)
        accumulators["baseline"].update(copy_last_frame_baseline(inputs, task.spec.out_frames), targets)
    model.train(was_training)
    reduce_fn = (lambda t: accelerator.reduce(t, "sum")) if accelerator and world > 1 else None
    return accumulators["model"].compute(reduce_fn), accumulators["baseline"].compute(reduce_fn)
