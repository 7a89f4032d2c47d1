"""Bad input, as a new user gives it: every row must fail with a clear message that names the offending value or
file, with exit code 2 from the command lines (ValueError from the API), and leave the output folder unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_clip_config

TINY = [
    "--tasks", "city_traffic", "moving_digits", "--num_train", "16", "--num_train_per_task", "", "--num_validation", "4",
    "--num_test", "8", "--backbone", "random", "--backbone_width", "32", "--backbone_layers", "1", "--backbone_heads",
    "2", "--hidden_channels", "8", "--batch_size", "4", "--eval_batch_size", "8", "--epochs", "1",
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


# --- the training command: (flags, text the message must contain) ---------------------------------------------------

CLI_ROWS = [
    (["--tasks", "no_such_task"], "unknown task(s) ['no_such_task']"),
    (["--tasks", "moving_digits", "moving_digits"], "names a task twice"),
    (["--schedule", "sometimes"], "--schedule must be one of"),
    (["--adapter", "dora"], "--adapter must be one of"),
    (["--router", "expert"], "--router must be one of"),
    (["--temporal_gate", "open"], "--temporal_gate must be one of"),
    (["--mixed_precision", "fp16", "--cpu", "true"], "--mixed_precision fp16 needs a CUDA GPU"),
    (["--report_to", "wandb"], "--report_to must be one of"),
    (["--warmup_ratio", "5"], "--warmup_ratio is a fraction"),
    (["--warmup_ratio", "-0.1"], "--warmup_ratio is a fraction"),
    (["--checkpoint_every", "-1"], "--checkpoint_every must be >= 0, got -1"),
    (["--log_every", "0"], "--log_every must be >= 1, got 0"),
    (["--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--max_steps", "-1"], "--max_steps must be >= 0, got -1"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--rank_learning_rate", "-0.05"], "--rank_learning_rate must be > 0"),
    (["--rank_momentum", "1.0"], "--rank_momentum must lie in [0, 1)"),
    (["--init_rank", "9"], "--init_rank must lie in [0, --max_rank=8], got 9"),
    (["--rank_grad_scale=-1e5"], "--rank_grad_scale must be > 0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    (["--rank_budget", "-3"], "--rank_budget must be >= 0"),
    (["--num_train_per_task", "city_traffic=0"], "'city_traffic=0'"),
    (["--num_train_per_task", "city_trafic=100"], "unknown task(s) ['city_trafic']"),
    (["--finetune_backbone", "true"], "use it with --adapter none"),
    (["--task_options", '{"kth": {"out_frames": 20}}'], "names task(s) ['kth'] that are not in --tasks"),
    (["--task_options", "kth=20"], "--task_options must be a JSON mapping"),
    (["--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "'/no/such/checkpoint' is not a checkpoint folder"),
    (["--resume_from_checkpoint", "latest", "--overwrite_output_dir", "true"], "pick one"),
    # past argument validation: these need the data, and still write nothing
    (["--num_train_per_task", "moving_digits=2"], "moving_digits (2 clips // 1 process(es) // batch 4 = 0)"),
    (["--resume_from_checkpoint", "latest"], "holds no complete checkpoint"),
    (["--backbone", "/no/such/clip"], "'/no/such/clip': no such folder"),
]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets-cache"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from unistd_hf.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", CLI_ROWS, ids=[" ".join(r[0])[:40] for r in CLI_ROWS])
def test_training_command_refuses(flags, expected, tmp_path, capsys, data_cache):
    output = tmp_path / "out"
    output.mkdir()
    code, err = run_cli(TINY + ["--cache_dir", data_cache, "--output_dir", str(output)] + flags, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # besides data progress bars
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert snapshot(output) == {}  # nothing written


def test_output_dir_below_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = run_cli(TINY + ["--output_dir", str(blocker / "out")], capsys)
    assert code == 2 and "is not writable" in err and str(blocker) in err


def test_backbone_folder_without_weights_is_refused(tmp_path, capsys, data_cache):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    code, err = run_cli(TINY + ["--cache_dir", data_cache, "--output_dir", str(tmp_path / "out"), "--backbone",
                                str(tmp_path / "clip")], capsys)
    assert code == 2 and "model.safetensors" in err and not (tmp_path / "out").exists()


def test_folder_with_foreign_files_is_refused(tmp_path, capsys, data_cache):
    output = tmp_path / "out"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    code, err = run_cli(TINY + ["--cache_dir", data_cache, "--output_dir", str(output)], capsys)
    assert code == 2 and "not empty and holds no run" in err
    assert snapshot(output) == {"thesis.tex": b"years of work"}


# --- config files: (file name, content, text the message must contain) ---------------------------------------------

CONFIG_ROWS = [
    ("run.yaml", b"epochs: 2\nlearning_rat: 0.1\n", "unknown key(s) ['learning_rat']"),
    ("run.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a text file"),
    ("run.yaml", b"- epochs\n- 2\n", "must hold a mapping"),
    ("run.yaml", b"epochs: [2\n", "is not valid YAML"),
    ("run.json", b"{\"epochs\": 2,}", "is not valid JSON"),
    ("run.yaml", b"tasks: moving_digits city_traffic\n", "--tasks must be a non-empty list"),
]


@pytest.mark.parametrize("name, content, expected", CONFIG_ROWS, ids=[r[2][:30] for r in CONFIG_ROWS])
def test_config_file_refused(name, content, expected, tmp_path, capsys):
    config = tmp_path / name
    config.write_bytes(content)
    code, err = run_cli(["--config", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_named(tmp_path, capsys):
    code, err = run_cli(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err and "does not exist" in err


# --- predict: a tiny saved model, then bad inputs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from unistd_hf import TaskSpec, UniSTDConfig, get_unistd_peft_model, save_backbone

    folder = tmp_path_factory.mktemp("model")
    spec = TaskSpec("digits", 2, 2, 1, 16, 16, num_downsample=1)
    model = get_unistd_peft_model(UniSTDConfig(backbone=tiny_clip_config(), tasks=[spec], hidden_channels=8))
    model.save_pretrained(folder / "adapter")
    save_backbone(model, folder / "backbone")
    return folder


def npy_bytes(array: np.ndarray, tmp_path: Path) -> bytes:
    np.save(tmp_path / "tmp.npy", array)
    return (tmp_path / "tmp.npy").read_bytes()


PREDICT_ROWS = [
    ("missing", None, "does not exist"),
    ("empty", lambda t: b"", "not a readable .npy array"),
    ("truncated", lambda t: npy_bytes(np.zeros((2, 1, 16, 16), np.float32), t)[:100], "not a readable .npy array"),
    ("wrong ndim", lambda t: npy_bytes(np.zeros((16, 16), np.float32), t), "expected an array (T, C, H, W)"),
    ("int64 values", lambda t: npy_bytes(np.zeros((2, 1, 16, 16), np.int64), t), "got dtype int64"),
    ("0-255 floats", lambda t: npy_bytes(np.full((2, 1, 16, 16), 200.0, np.float32), t), "must be scaled to [0, 1]"),
    ("NaN", lambda t: npy_bytes(np.full((2, 1, 16, 16), np.nan, np.float32), t), "must be finite"),
    ("wrong frames", lambda t: npy_bytes(np.zeros((3, 1, 16, 16), np.float32), t), "must have shape"),
]


@pytest.mark.parametrize("case, make, expected", PREDICT_ROWS, ids=[r[0] for r in PREDICT_ROWS])
def test_predict_refuses(case, make, expected, saved_model, tmp_path, capsys):
    from unistd_hf.predict import main

    clip = tmp_path / "clip.npy"
    if make is not None:
        clip.write_bytes(make(tmp_path))
    code = main(["--adapter", str(saved_model / "adapter"), "--task", "digits", "--input", str(clip)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (tmp_path / "clip.pred.npy").exists()


def test_predict_names_unknown_task_and_incomplete_adapter(saved_model, tmp_path, capsys):
    from unistd_hf.predict import main

    np.save(tmp_path / "clip.npy", np.zeros((2, 1, 16, 16), np.float32))
    assert main(["--adapter", str(saved_model / "adapter"), "--task", "kth", "--input", str(tmp_path / "clip.npy")]) == 2
    assert "unknown task 'kth'" in capsys.readouterr().err
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((saved_model / "adapter" / "adapter_config.json").read_text())
    assert main(["--adapter", str(broken), "--task", "digits", "--input", str(tmp_path / "clip.npy")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "adapter_model.safetensors" in err


def test_predict_maps_uint8_and_clamps(saved_model, tmp_path):
    from unistd_hf.predict import predict, read_input

    np.save(tmp_path / "clip.npy", np.full((2, 1, 16, 16), 255, np.uint8))
    frames = read_input(tmp_path / "clip.npy")
    assert frames.dtype == torch.float32 and frames.max().item() == 1.0
    adapter = saved_model / "adapter"
    raw = predict(adapter, "digits", frames, str(saved_model / "backbone"), clamp=False)
    clamped = predict(adapter, "digits", frames, str(saved_model / "backbone"))
    assert torch.equal(clamped, raw.clamp(0, 1))


# --- the Python API: (callable, exception text) --------------------------------------------------------------------


def _frames(value: float, dtype=torch.float32) -> torch.Tensor:
    return torch.full((2, 2, 1, 8, 8), value).to(dtype)


def _model_call(pixel_values):
    from unistd_hf import TaskSpec, UniSTDConfig, UniSTDModel

    model = UniSTDModel(UniSTDConfig(backbone=tiny_clip_config(), tasks=[TaskSpec("d", 2, 2, 1, 8, 8, num_downsample=1)],
                                     hidden_channels=8))
    return model(pixel_values=pixel_values, task="d")


def _rank_search(**kwargs):
    from peft import get_peft_model

    from helpers import MLP
    from rankmoe_peft import RankMoEConfig, RankSearch

    return RankSearch(get_peft_model(MLP(), RankMoEConfig(target_modules=["lin1"])), **kwargs)


def _config(**kwargs):
    from rankmoe_peft import RankMoEConfig

    return RankMoEConfig(target_modules=["q_proj"], **kwargs)


def _metric(name, *args, **kwargs):
    from unistd_hf import metrics

    return getattr(metrics, name)(*args, **kwargs)


API_ROWS = [
    ("psnr of uint8 frames", lambda: _metric("psnr", _frames(200, torch.uint8), _frames(100, torch.uint8)), "convert integer frames"),
    ("ssim of int64 frames", lambda: _metric("ssim", _frames(2, torch.int64), _frames(1, torch.int64)), "convert integer frames"),
    ("mse of uint8 frames", lambda: _metric("mse", _frames(2, torch.uint8), _frames(1, torch.uint8)), "convert integer frames"),
    ("psnr data_range 0", lambda: _metric("psnr", _frames(0.2), _frames(0.1), data_range=0), "255 for uint8), got 0"),
    ("ssim data_range -1", lambda: _metric("ssim", _frames(0.2), _frames(0.1), data_range=-1.0), "data_range must be > 0"),
    ("empty batch", lambda: _metric("psnr", torch.zeros(0, 2, 1, 8, 8), torch.zeros(0, 2, 1, 8, 8)), "hold no frames"),
    ("negative gamma", lambda: _config(rank_grad_scale=-1e5), "reverses the rank gradient"),
    ("init rank above max", lambda: _config(init_rank=9.0), "init_rank must lie in [0, max_rank=8]"),
    ("search lr 0", lambda: _rank_search(lr=0.0), "RankSearch needs lr > 0"),
    ("frames in [0, 255]", lambda: _model_call(_frames(200.0)), "must be scaled to [0, 1], got values in [200, 200]"),
    ("frames with NaN", lambda: _model_call(_frames(float("nan"))), "must be finite"),
    ("integer frames", lambda: _model_call(_frames(1, torch.uint8)), "must be a floating-point tensor"),
]


@pytest.mark.parametrize("case, call, expected", API_ROWS, ids=[r[0] for r in API_ROWS])
def test_api_refuses(case, call, expected):
    with pytest.raises(ValueError) as error:
        call()
    assert expected in str(error.value)


@pytest.mark.parametrize("content, expected", [(b"", "not a readable .npy array"), (b"\x93NUMPY\x01\x00", "not a readable .npy array")])
def test_array_task_names_a_broken_file(content, expected, tmp_path):
    from unistd_hf.data import load_task

    path = tmp_path / "clips.npy"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_task("array", path=str(path), in_frames=2, out_frames=2, cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(error.value) and expected in str(error.value)
