"""What each process trains on: the tasks' data, per-process shards, and the order of tasks within an epoch.

One batch is one task (shapes differ between tasks). A batch is fully determined by (seed, epoch, task, index):
the task order is drawn from a generator seeded with (seed, epoch), so every process runs the same task at the
same step, and each process reads its own equal shard of every task. That is what makes a resumed run end where
an uninterrupted one does, and lets a resume skip done batches by index without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from accelerate import Accelerator

from ..configuration_unistd import TaskSpec
from ..data import TaskInfo, get_task, load_task, spec_for
from .arguments import SCHEDULES, TrainingArguments, parse_clip_counts, parse_task_options

__all__ = ["TaskData", "task_data", "load_tasks", "batch_counts", "epoch_order", "task_schedule", "epoch_batches"]


@dataclass
class TaskData:
    """A loaded task: its shapes (`spec`, from the data), its registry entry (`info`: metrics, CSI thresholds)
    and the splits the loop reads (datasets in torch format; `validation` is None where the data has none)."""

    spec: TaskSpec
    info: TaskInfo
    train: Any
    test: Any
    validation: Any = None

    @property
    def name(self) -> str:
        return self.spec.name


def task_data(name: str, data: Any, cache_dir: str | None = None) -> TaskData:
    """`TaskData` of what `load_task(name, ...)` returned, a `DatasetDict` or (streaming=True) an `IterableDatasetDict`."""
    train, test = (random_access(data[split], cache_dir).with_format("torch") for split in ("train", "test"))
    validation = random_access(data["validation"], cache_dir).with_format("torch") if "validation" in data else None
    return TaskData(spec_for(name, train), get_task(name), train, test, validation)


def random_access(split: Any, cache_dir: str | None = None) -> datasets.Dataset:
    """The loop reads clips by index (per-process shards, a resume that skips done batches exactly), so a streamed
    split is written once into the `datasets` cache, one writer batch at a time: memory stays bounded, and a
    second run with the same stream reuses the cache."""
    if not isinstance(split, datasets.IterableDataset):
        return split
    return datasets.Dataset.from_generator(
        _rows, features=split.features, gen_kwargs={"stream": split.with_format(None)}, cache_dir=cache_dir
    )


def _rows(stream: datasets.IterableDataset) -> Iterator[dict[str, Any]]:
    yield from stream


def load_tasks(args: TrainingArguments, accelerator: Accelerator) -> dict[str, TaskData]:
    clip_counts = parse_clip_counts(args.num_train_per_task)
    task_options = parse_task_options(args.task_options, args.tasks)
    tasks = {}
    for name in args.tasks:
        options: dict[str, Any] = {"cache_dir": args.cache_dir} if args.cache_dir else {}
        if get_task(name).synthetic:
            options.update(num_train=clip_counts.get(name, args.num_train), num_validation=args.num_validation,
                           num_test=args.num_test)
        options.update(task_options.get(name, {}))
        with accelerator.main_process_first():  # one process generates, the others read the cache
            tasks[name] = task_data(name, load_task(name, data_dir=args.data_dir, seed=args.seed, **options), args.cache_dir)
    return tasks


def batch_counts(tasks: dict[str, TaskData], batch_size: int, world_size: int) -> dict[str, int]:
    """Full batches per epoch of each task on each process (every process gets the same number)."""
    return {name: (len(task.train) // world_size) // batch_size for name, task in tasks.items()}


def epoch_order(num_clips: int, seed: int, epoch: int, task_index: int, rank: int, world_size: int) -> np.ndarray:
    """This process's clip indices for one epoch: a seeded permutation, cut into equal per-process shards."""
    permutation = np.random.default_rng([seed, epoch, task_index]).permutation(num_clips)
    per_process = num_clips // world_size
    return permutation[rank * per_process : (rank + 1) * per_process]


def task_schedule(counts: dict[str, int], schedule: str, seed: int, epoch: int, temperature: float = 2.0) -> list[str]:
    """The task of each batch of an epoch; identical on every process for the same (seed, epoch).

    round_robin: tasks in turn until each has used its batches; proportional: every batch of every task once,
    in a seeded random order; temperature: sum(counts) draws with p(task) ~ count^(1/T) (a task may repeat
    batches or leave some unused; its batch index wraps around).
    """
    names = [n for n in counts if counts[n] > 0]
    rng = np.random.default_rng([seed, epoch, 7919])
    if schedule == "round_robin":
        order, remaining = [], dict(counts)
        while any(remaining[n] for n in names):
            for name in names:
                if remaining[name]:
                    order.append(name)
                    remaining[name] -= 1
        return order
    if schedule == "proportional":
        order = [name for name in names for _ in range(counts[name])]
        return [order[i] for i in rng.permutation(len(order))]
    if schedule == "temperature":
        weights = np.array([counts[n] ** (1.0 / temperature) for n in names], dtype=np.float64)
        picks = rng.choice(len(names), size=sum(counts.values()), p=weights / weights.sum())
        return [names[i] for i in picks]
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def epoch_batches(
    tasks: dict[str, TaskData], args: TrainingArguments, epoch: int, rank: int, world_size: int, skip: int = 0
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(task, batch) for every step of the epoch after the first `skip`, in schedule order; skipped batches are
    never read."""
    counts = batch_counts(tasks, args.batch_size, world_size)
    schedule = task_schedule(counts, args.schedule, args.seed, epoch, args.temperature)
    orders = {n: epoch_order(len(t.train), args.seed, epoch, i, rank, world_size) for i, (n, t) in enumerate(tasks.items())}
    used = dict.fromkeys(tasks, 0)
    for step, name in enumerate(schedule):
        index = used[name] % counts[name]
        used[name] += 1
        if step < skip:
            continue
        clip_ids = orders[name][index * args.batch_size : (index + 1) * args.batch_size]
        yield name, tasks[name].train[clip_ids.tolist()]
