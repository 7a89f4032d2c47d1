"""One run per output folder: what defines a run, and the checks that keep two runs from mixing.

`output_dir/run.json` records the run's identity: every argument that shapes the model, the data or the
optimisation, and the backbone's checksum. A new run into a folder that holds anything stops with the
differences, unless `--overwrite_output_dir` (the old folder is then moved aside, never mixed); a resume checks
the checkpoint's identity against the current arguments. Only the main process touches the folder; the
outcome (an error message or the checkpoint to resume) is broadcast, so every process stops or goes on alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..atomic import TRAINER_STATE, latest_checkpoint, write_text_atomically
from .arguments import TrainingArguments

__all__ = ["RUN_FILE", "MAY_CHANGE_ON_RESUME", "run_identity", "prepare_run_folder"]

RUN_FILE = "run.json"
# How long, how often and where to report may change between a run and its resume; what is trained may not.
MAY_CHANGE_ON_RESUME = (
    "output_dir", "data_dir", "cache_dir", "epochs", "max_steps", "checkpoint_every", "keep_checkpoints",
    "resume_from_checkpoint", "overwrite_output_dir", "log_every", "report_to", "push_to_hub", "hub_model_id",
    "eval_batch_size", "eval_every", "cpu", "fail_at_step",
)


def run_identity(args: TrainingArguments, backbone_sha256: str | None) -> dict[str, Any]:
    """The arguments that define the run, the backbone checksum, and a hash of both."""
    arguments = {k: v for k, v in dataclasses.asdict(args).items() if k not in MAY_CHANGE_ON_RESUME}
    identity = {"arguments": arguments, "backbone_sha256": backbone_sha256}
    identity["hash"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return identity


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = recorded.get("arguments", {}), current["arguments"]
    found = [f"--{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if recorded.get("backbone_sha256") != current["backbone_sha256"]:
        found.append(f"backbone weights: sha256 {recorded.get('backbone_sha256')} there, {current['backbone_sha256']} now")
    return found


def _describe(differences: list[str]) -> str:
    return "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")


def _checkpoint_to_resume(args: TrainingArguments, output: Path) -> Path | None:
    if args.resume_from_checkpoint in ("latest", "auto"):
        found = latest_checkpoint(output)
        if found is None and args.resume_from_checkpoint == "latest":
            raise ValueError(
                f"--resume_from_checkpoint latest: {str(output / 'checkpoints')!r} holds no complete checkpoint; "
                "start a new run without the flag, or use --resume_from_checkpoint auto (resume if possible)"
            )
        return found
    folder = Path(args.resume_from_checkpoint)
    if not (folder / TRAINER_STATE).is_file():
        raise ValueError(f"--resume_from_checkpoint {str(folder)!r} is not a complete checkpoint (no {TRAINER_STATE})")
    return folder


def _check(args: TrainingArguments, identity: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from (None: a new run); ValueError when the folder holds something else."""
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {str(output)!r} is a file, not a folder")
    recorded = json.loads((output / RUN_FILE).read_text()) if (output / RUN_FILE).is_file() else None
    resume = _checkpoint_to_resume(args, output) if args.resume_from_checkpoint else None
    if resume is not None:
        for source, record in ((f"checkpoint {str(resume)!r}", json.loads((resume / TRAINER_STATE).read_text()).get("identity", {})),
                               (f"output_dir {str(output)!r}", recorded or identity)):
            differences = _differences(record, identity)
            if differences:
                raise ValueError(
                    f"{source} belongs to another run: {_describe(differences)} (settings that may change on resume: "
                    f"{', '.join(MAY_CHANGE_ON_RESUME)})"
                )
        return resume
    restart = args.resume_from_checkpoint == "auto" and recorded is not None and not _differences(recorded, identity)
    if output.is_dir() and any(output.iterdir()) and not (args.overwrite_output_dir or restart):
        if recorded is None:
            raise ValueError(f"output_dir {str(output)!r} is not empty and holds no run; choose an empty folder or "
                             "pass --overwrite_output_dir")
        differences = _differences(recorded, identity)
        if differences:
            raise ValueError(f"output_dir {str(output)!r} holds another run: {_describe(differences)}; choose another "
                             "folder or pass --overwrite_output_dir")
        raise ValueError(f"output_dir {str(output)!r} holds a run with these settings already; continue it with "
                         "--resume_from_checkpoint latest, or start it again with --overwrite_output_dir")
    return None


def _start(args: TrainingArguments, identity: dict[str, Any], move_aside: bool) -> None:
    """Create the folder for a new run (moving an older one aside) and record its identity."""
    output = Path(args.output_dir)
    if move_aside and output.is_dir() and any(output.iterdir()):
        aside = output.with_name(f"{output.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        output.rename(aside)
        print(f"--overwrite_output_dir: moved the previous contents of {str(output)!r} to {str(aside)!r}")
    try:
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output / RUN_FILE, json.dumps(identity, indent=1))
    except OSError as error:
        raise ValueError(f"output_dir {str(output)!r} is not writable: {error}") from error


def prepare_run_folder(args: TrainingArguments, identity: dict[str, Any], accelerator: Accelerator) -> Path | None:
    """Check (and for a new run create) the run folder on the main process; every process gets the outcome.
    Returns the checkpoint to resume from, or None for a new run."""
    outcome: list[Any] = [None, None]  # [error message, checkpoint]
    if accelerator.is_main_process:
        try:
            resume = _check(args, identity)
            if resume is None or not (Path(args.output_dir) / RUN_FILE).is_file():
                _start(args, identity, move_aside=resume is None)
            outcome = [None, str(resume) if resume else None]
        except (ValueError, OSError) as error:
            outcome = [str(error), None]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[0] is not None:
        raise ValueError(outcome[0])
    return Path(outcome[1]) if outcome[1] else None
