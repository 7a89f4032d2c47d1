"""Joint multi-task training of UniSTD with Accelerate, split by concern:

    arguments.py      TrainingArguments (every flag of examples/train_unistd.py) and their validation
    schedule.py       the tasks' data, per-process shards, the task order of an epoch
    models.py         the model a run trains and its optimizer groups
    checkpointing.py  the one atomic writer, checkpoints and their restore
    evaluation.py     test metrics of the model and of copy-last-frame
    loop.py           train()
"""

from .arguments import ADAPTERS, SCHEDULES, TrainingArguments, parse_clip_counts, validate_arguments
from ..atomic import write_atomically, write_text_atomically
from .checkpointing import latest_checkpoint
from .evaluation import evaluate_task
from .loop import NonFiniteLossError, train
from .schedule import TaskData, epoch_order, task_data, task_schedule

__all__ = [
    "TrainingArguments",
    "validate_arguments",
    "parse_clip_counts",
    "SCHEDULES",
    "ADAPTERS",
    "train",
    "NonFiniteLossError",
    "TaskData",
    "task_data",
    "task_schedule",
    "epoch_order",
    "evaluate_task",
    "latest_checkpoint",
    "write_atomically",
    "write_text_atomically",
]
