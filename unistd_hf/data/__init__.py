"""Forecasting tasks as `datasets.DatasetDict`s: synthetic ones generated locally, OpenSTL's files, any array.

`load_task(name, data_dir=None, seed=0, **options)` is the entry point; `list_tasks()` names what is
registered and `get_task(name)` describes a task. See docs/DATA.md for every task, option and file format.
"""

from __future__ import annotations

from . import generic, published, real, synthetic  # noqa: F401  (importing a loader module registers its tasks)
from .paper_tasks import PAPER_TASKS
from .registry import TaskInfo, get_task, list_tasks, load_task, register_task, spec_for

__all__ = ["PAPER_TASKS", "TaskInfo", "get_task", "list_tasks", "load_task", "register_task", "spec_for"]
