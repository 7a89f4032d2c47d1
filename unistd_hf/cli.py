"""Command-line parsing shared by the training script: dataclass flags plus `--config file.json|yaml`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .training import NonFiniteLossError, TrainingArguments, train

__all__ = ["parse_training_arguments", "read_config_file", "main", "USER_ERRORS"]

# What a user's input can cause (bad values, missing or unreadable files): one `error:` line and exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML mapping of TrainingArguments fields; unknown keys are an error, not silently ignored."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {str(path)!r} is not a text file (expected UTF-8 JSON or YAML): {error}") from error
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of argument names to values")
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {str(path)!r} has unknown key(s) {unknown}; known keys: {sorted(known)}")
    return values


def parse_training_arguments(argv: list[str] | None = None) -> TrainingArguments:
    parser = HfArgumentParser(TrainingArguments)
    parser.add_argument("--config", default=None, help="JSON or YAML file of arguments (flags override it)")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config))
    args, _ = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and train; bad arguments print one `error:` line and return 2 before any training."""
    try:
        train(parse_training_arguments(argv))
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
