"""Shared by the benchmark scripts: the machine description and writing one section of docs/RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
HEADER = "# Measured results\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({cpu})"
    return (
        f"{device}; {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()} on {platform.system()}"
    )


def write_section(name: str, body: str, command: str | None = None) -> Path:
    """Replace (or append) the section `name` of docs/RESULTS.md, stamped with command, machine and date."""
    command = command or "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = (
        f"Command: `{command}`  \nMachine: {machine_description()}  \n"
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
    )
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{stamp}{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)
    return RESULTS
