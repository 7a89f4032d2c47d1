"""A run folder is one run: real two-run sequences through the training command (in-process, tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_bad_inputs import TINY, snapshot

RUN = TINY + ["--max_steps", "4", "--checkpoint_every", "2", "--log_every", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets-cache"))


def run(output: Path, cache: str, *flags: str, capsys) -> tuple[int, str]:
    from unistd_hf.cli import main

    code = main(RUN + ["--cache_dir", cache, "--output_dir", str(output), *flags])
    return code, capsys.readouterr().err


def logged_steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "logs.jsonl").read_text().splitlines()]


def test_second_run_into_a_folder_is_refused_or_replaced(tmp_path, data_cache, capsys):
    output = tmp_path / "run"
    assert run(output, data_cache, capsys=capsys)[0] == 0
    report = json.loads((output / "report.json").read_text())
    assert sum(report["batches_per_task"].values()) == report["steps"] == 4
    first = snapshot(output)

    code, err = run(output, data_cache, "--learning_rate", "0.01", capsys=capsys)
    assert code == 2 and "holds another run" in err and "--learning_rate: 0.003 there, 0.01 now" in err
    code, err = run(output, data_cache, capsys=capsys)
    assert code == 2 and "--resume_from_checkpoint latest" in err
    assert snapshot(output) == first  # refused runs change nothing

    assert run(output, data_cache, "--learning_rate", "0.01", "--overwrite_output_dir", "true", capsys=capsys)[0] == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == first  # the old run is moved aside whole, not mixed
    assert json.loads((output / "run.json").read_text())["arguments"]["learning_rate"] == 0.01
    assert logged_steps(output) == [2, 4]  # one run's log, not two appended


def test_resume_checks_the_checkpoint_belongs_to_the_run(tmp_path, data_cache, capsys):
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert run(mine, data_cache, capsys=capsys)[0] == 0
    assert run(other, data_cache, "--seed", "2", capsys=capsys)[0] == 0
    foreign = sorted((other / "checkpoints").iterdir())[-1]
    before = snapshot(mine)
    code, err = run(mine, data_cache, "--resume_from_checkpoint", str(foreign), capsys=capsys)
    assert code == 2 and "belongs to another run" in err and "--seed: 2 there, 1 now" in err
    assert snapshot(mine) == before

    # a setting that may change on resume (the length of the run) continues the run's own checkpoint
    code, err = run(mine, data_cache, "--resume_from_checkpoint", "latest", "--max_steps", "6", capsys=capsys)
    assert code == 0, err
    assert json.loads((mine / "report.json").read_text())["steps"] == 6
    assert logged_steps(mine) == [2, 4, 6]
    code, err = run(mine, data_cache, "--resume_from_checkpoint", "latest", "--max_steps", "6", capsys=capsys)
    assert code == 2 and "the end of this run" in err


def test_auto_resume_starts_when_there_is_no_checkpoint(tmp_path, data_cache, capsys):
    output = tmp_path / "run"
    code, err = run(output, data_cache, "--resume_from_checkpoint", "latest", capsys=capsys)
    assert code == 2 and "holds no complete checkpoint" in err and not output.exists()
    code, err = run(output, data_cache, "--resume_from_checkpoint", "auto", capsys=capsys)
    assert code == 0, err
    assert (output / "run.json").is_file() and logged_steps(output) == [2, 4]


def test_task_options_reach_the_loaders(data_cache):
    from accelerate import Accelerator

    from unistd_hf.cli import parse_training_arguments
    from unistd_hf.training.schedule import load_tasks

    args = parse_training_arguments(RUN + ["--cache_dir", data_cache, "--task_options", '{"moving_digits": {"num_test": 3}}'])
    tasks = load_tasks(args, Accelerator(cpu=True))
    assert len(tasks["moving_digits"].test) == 3 and len(tasks["city_traffic"].test) == 8


def test_training_accepts_a_streamed_task(tmp_path, data_cache, capsys):
    """A loader's streaming form (an IterableDatasetDict) trains: the loop writes it once into the cache."""
    import datasets
    import torch

    from test_data_paper import _write_sevir
    from unistd_hf.data import load_task
    from unistd_hf.training.schedule import random_access

    files = {"vil/2018/SEVIR_VIL_RANDOMEVENTS_2018_0101_0430.h5": [f"2018-01-{d:02d} 00:00:00" for d in range(1, 9)],
             "vil/2019/SEVIR_VIL_RANDOMEVENTS_2019_0101_0430.h5": ["2019-03-01 00:00:00", "2019-09-01 00:00:00"]}
    _write_sevir(tmp_path, files, size=64)
    stream = load_task("sevir", data_dir=str(tmp_path), streaming=True)["train"]
    assert isinstance(stream, datasets.IterableDataset)
    built = load_task("sevir", data_dir=str(tmp_path), cache_dir=data_cache)["train"]
    written = random_access(stream, data_cache).with_format("torch")
    assert len(written) == len(built) == 24
    assert torch.equal(written[5]["inputs"], built.with_format("torch")[5]["inputs"])

    code, err = run(tmp_path / "run", data_cache, "--tasks", "sevir", "--num_train_per_task", "", "--data_dir",
                    str(tmp_path), "--task_options", '{"sevir": {"streaming": true}}', capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["batches_per_task"] == {"sevir": 4}
