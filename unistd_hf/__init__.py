"""UniSTD on Hugging Face: one model for many spatio-temporal forecasting tasks.

Public names are imported lazily, so `import unistd_hf` stays cheap and submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

import rankmoe_peft  # noqa: F401  (registers the "rankmoe" method with peft)

_EXPORTS = {
    "TaskSpec": "configuration_unistd",
    "UniSTDConfig": "configuration_unistd",
    "UniSTDModel": "modeling_unistd",
    "UniSTDOutput": "modeling_unistd",
    "get_unistd_peft_model": "peft_integration",
    "default_rankmoe_config": "peft_integration",
    "load_unistd_peft_model": "peft_integration",
    "save_unistd_peft_model": "peft_integration",
    "save_backbone": "peft_integration",
    "add_tasks_to_unistd_peft_model": "peft_integration",
    "expert_usage": "usage",
    "parameter_report": "report",
    "format_parameter_report": "report",
    "TrainingArguments": "training",
    "train": "training",
    "load_task": "data",
    "PACKAGED_BACKBONE": "pretrain",
    "resolve_backbone": "pretrain",
    "load_backbone": "pretrain",
    "list_tasks": "data",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
