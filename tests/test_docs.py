"""The docs reproduce: every ```python block of README.md and docs/*.md runs offline, and prints what it quotes.

Convention (stated in the README): a `print(...)` whose line ends in `# -> text` must print exactly `text` as one
line (lines of one block are matched in order; other output may come between them). A comment on a print line that
does not start with `->` may describe the output but must not quote a value (it may hold no digit), so every
printed value the docs show is checked here. Each block runs in a fresh process in an empty folder, offline, with
a timeout; blocks are written small enough to run as they stand.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
EXPECT = re.compile(r"#\s*->\s?(.*?)\s*$")
TIMEOUT_S = 240


def python_blocks() -> list[tuple[str, str]]:
    """(id "file:line", code) of every python block in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def print_comment(line: str) -> str | None:
    """The trailing comment of a line that calls print, or None (a `#` inside a string literal is not a comment)."""
    if "print(" not in line:
        return None
    code, quote = line, None
    for i, char in enumerate(code):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            return code[i:]
    return None


def expected_lines(code: str, where: str) -> list[str]:
    """The lines the block says it prints (`# -> text`), in order; a value quoted any other way fails here."""
    expected = []
    for number, line in enumerate(code.splitlines(), 1):
        comment = print_comment(line)
        if comment is None:
            continue
        match = EXPECT.match(comment)
        if match:
            expected.append(match.group(1))
        elif re.search(r"\d", comment):
            raise AssertionError(f"{where}, block line {number}: a print comment quotes a value without '# ->', so "
                                 f"it would go unchecked: {line.strip()!r}")
    return expected


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks():
    names = {where.split(":")[0] for where, _ in BLOCKS}
    assert "README.md" in names and "docs/DATA.md" in names, names
    assert sum(where.startswith("README.md") for where, _ in BLOCKS) >= 4


def test_the_convention_catches_unchecked_values():
    with pytest.raises(AssertionError, match="without '# ->'"):
        expected_lines("print(x.shape)  # (2, 3)\n", "example")
    assert expected_lines('print("#", x)  # -> # 1\nprint(y)  # a description\n', "example") == ["# 1"]


@pytest.mark.parametrize("where,code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_doc_block_runs_and_prints_what_it_quotes(where, code, tmp_path):
    expected = expected_lines(code, where)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf-home"), "MPLBACKEND": "Agg"}
    (tmp_path / "block.py").write_text(code)
    done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{where} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    printed = [line.strip() for line in done.stdout.splitlines()]
    position = 0
    for want in expected:
        while position < len(printed) and printed[position] != want:
            position += 1
        assert position < len(printed), (f"{where}: the docs say a print shows {want!r}, but the block printed "
                                         f"(in order, after the previous match):\n{done.stdout[-3000:]}")
        position += 1
