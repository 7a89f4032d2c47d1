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


# --- the README's table of RankMoEConfig options, generated from the dataclass fields ---------------------------

TABLE_START, TABLE_END = "<!-- rankmoe-options:start -->", "<!-- rankmoe-options:end -->"


def rankmoe_options_table() -> str:
    """One row per field RankMoEConfig itself defines (peft's PeftConfig fields are peft's): name, default, help."""
    import dataclasses

    from rankmoe_peft import RankMoEConfig

    own = RankMoEConfig.__dict__.get("__annotations__", {})
    rows = ["| option | default | effect |", "|---|---|---|"]
    for field in dataclasses.fields(RankMoEConfig):
        if field.name not in own:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        text = " ".join(field.metadata["help"].split()).replace("|", "\\|").replace("<", "&lt;")  # not HTML
        rows.append(f"| `{field.name}` | `{default!r}` | {text} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[start:end].strip()


def test_readme_lists_every_rankmoe_option_with_its_default_and_effect():
    from rankmoe_peft import RankMoEConfig

    table = readme_table((ROOT / "README.md").read_text())
    assert table == rankmoe_options_table(), (
        "README.md's RankMoEConfig table disagrees with the dataclass fields; regenerate it with "
        "`.venv/bin/python tests/test_docs.py --write-rankmoe-table`")
    own = RankMoEConfig.__dict__["__annotations__"]
    assert len(table.splitlines()) == 2 + len(own) and "| `num_experts` | `6` |" in table


if __name__ == "__main__" and sys.argv[1:] == ["--write-rankmoe-table"]:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    readme.write_text(text[:start] + "\n" + rankmoe_options_table() + "\n" + text[end:])
    print(f"wrote the RankMoEConfig table into {readme}")


def test_citations_agree():
    """The README's BibTeX and CITATION.cff name the same paper, authors in the same order."""
    import yaml

    readme = (ROOT / "README.md").read_text()
    bibtex = re.search(r"```bibtex\n(.*?)```", readme, re.DOTALL).group(1)
    authors = re.search(r"author\s*=\s*\{(.*?)\},\s*\n\s*title", bibtex, re.DOTALL).group(1)
    bib_authors = " ".join(authors.split()).split(" and ")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    paper = cff["references"][0]
    assert cff["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]] == bib_authors
    assert f"title     = {{{paper['title']}}}" in bibtex and str(paper["year"]) in bibtex


def test_study_joint_writes_docs_only_when_asked(tmp_path):
    """Running the study as documented prints; only --write-docs touches docs/RESULTS.md."""
    results = ROOT / "docs" / "RESULTS.md"
    before = results.read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_joint.py"), "--from_json",
                           str(ROOT / "docs" / "study_joint.json")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "### Findings (computed)" in done.stdout and "wrote docs/RESULTS.md" not in done.stdout
    assert results.read_bytes() == before
    help_text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_joint.py"), "--help"], env=env,
                               capture_output=True, text=True, timeout=120).stdout
    assert "--write-docs" in help_text
