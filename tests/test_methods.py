"""SimVP and TAU through the same loop as UniSTD: train, checkpoint, resume, report and reload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_bad_inputs import TINY, snapshot


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets-cache"))


def run(*flags: str, capsys) -> tuple[int, str]:
    from unistd_hf.cli import main

    code = main(TINY + ["--max_steps", "4", "--checkpoint_every", "2", "--log_every", "2", *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("method", ["simvp", "tau"])
def test_reference_method_trains_resumes_and_reloads(method, tmp_path, data_cache, capsys):
    from unistd_hf.baselines import load_reference_model
    from unistd_hf.predict import predict
    from unistd_hf.training import evaluate_task
    from unistd_hf.training.schedule import task_data
    from unistd_hf.data import load_task

    output = tmp_path / "run"
    common = ["--method", method, "--cache_dir", data_cache, "--output_dir", str(output), "--translator_channels", "16",
              "--translator_depth", "2"]
    code, err = run(*common, capsys=capsys)
    assert code == 0, err
    code, err = run(*common, "--resume_from_checkpoint", "latest", "--max_steps", "6", capsys=capsys)
    assert code == 0, err
    report = json.loads((output / "report.json").read_text())
    assert report["steps"] == 6 and report["arguments"]["method"] == method
    assert report["parameters"]["total"]["trainable"] > 0

    model = load_reference_model(output / "model").eval()
    assert model.config.method == method and model.config.hid_T == 16
    assert model.config.extrapolated_tasks == ["moving_digits"]  # 'auto': the trajectory task, not the traffic one
    data = load_task("moving_digits", seed=0, cache_dir=data_cache, num_train=16, num_validation=4, num_test=8)
    reloaded = evaluate_task(model, task_data("moving_digits", data), batch_size=8)[0]
    for metric, value in report["tasks"]["moving_digits"]["model"].items():
        assert reloaded[metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
    clip = torch.from_numpy(np.asarray(data["test"][0:1]["inputs"], dtype=np.float32))
    assert predict(output / "model", "moving_digits", clip).shape == (1, 10, 1, 64, 64)


@pytest.mark.parametrize("flags", [["--adapter", "lora"], ["--adapter", "none", "--finetune_backbone", "true"]])
def test_reference_method_refuses_unistd_flags(flags, tmp_path, capsys):
    code, err = run("--method", "simvp", "--output_dir", str(tmp_path / "out"), *flags, capsys=capsys)
    assert code == 2 and "apply to --method unistd only" in err
    assert snapshot(tmp_path / "out") == {}


@pytest.mark.parametrize("flags, message", [
    (["--extrapolated_tasks", "rain_nowcast"], "not in --tasks"),
    (["--extrapolated_tasks", "moving_digits", "--residual_to_last_frame", "false"], "with --residual_to_last_frame true"),
])
def test_wrong_extrapolated_tasks_stop_before_training(flags, message, tmp_path, capsys):
    code, err = run("--output_dir", str(tmp_path / "out"), *flags, capsys=capsys)
    assert code == 2 and "error:" in err and message in err
    assert snapshot(tmp_path / "out") == {}
