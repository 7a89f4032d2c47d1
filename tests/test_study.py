"""benchmarks/study_joint.py builds the configuration each row names, at equal exposure per task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import study_joint as study  # noqa: E402

from unistd_hf import UniSTDModel  # noqa: E402
from unistd_hf.data import load_task  # noqa: E402
from unistd_hf.peft_integration import load_unistd_peft_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Every row (the optional fine-tuned one too) at tiny size, one seed, two batches of each task."""
    out = tmp_path_factory.mktemp("study")
    args = study.parse_args(["--tiny", "--seeds", "0", "--rows", *study.ROWS, "--output_dir", str(out),
                             "--cache_dir", str(out / "cache")])
    common = study.sizes(args)
    common["random_shape"] = study.random_backbone_shape(args.backbone)
    study.prepare_data(args.seeds, common, args.cache_dir)
    runs = {}
    for seed, row, kwargs in study.planned_runs(args.rows, args.seeds, common, args):
        runs.setdefault(row, []).append((kwargs, study.run_one(kwargs, args)))
    return runs, common


def _loaded(report: dict) -> UniSTDModel:
    """The saved model of a run: an adapter on the backbone, or (adapter "none") the whole model."""
    folder = Path(report["arguments"]["output_dir"]) / "adapter"
    if (folder / "adapter_config.json").is_file():
        return load_unistd_peft_model(folder).get_base_model()
    return UniSTDModel.from_pretrained(folder)


@pytest.mark.slow  # shares the study of every row at tiny size (~3 minutes)
def test_every_row_sees_the_same_batches_of_each_task(tiny_study):
    runs, common = tiny_study
    assert set(runs) == set(study.ROWS)
    for row, entries in runs.items():
        assert len(entries) == (len(study.TASKS) if study.ROWS[row].per_task else 1), row
        seen = {}
        for kwargs, report in entries:
            seen.update(report["batches_per_task"])
            assert report["steps"] == common["batches_per_task"] * len(kwargs["tasks"])
            assert report["validation_history"], row  # the curves have points
        assert seen == dict.fromkeys(study.TASKS, common["batches_per_task"]), row


@pytest.mark.slow  # shares the study of every row at tiny size (~3 minutes)
def test_rows_build_what_they_name(tiny_study):
    runs, _ = tiny_study
    report = {row: entries[0][1] for row, entries in runs.items()}
    trainable = {row: r["parameters"] for row, r in report.items()}
    assert report["joint_lora"]["rank_summary"] and all(r == [8.0] for r in report["joint_lora"]["rank_summary"].values())
    assert all(len(r) > 1 for r in report["joint"]["rank_summary"].values())  # experts, not one LoRA
    assert report["joint"]["arguments"]["rank_search_epochs"] >= 1
    assert report["joint_fixed_rank"]["arguments"]["rank_search_epochs"] == 0
    assert "rank_summary" not in report["joint_no_adapter"] and trainable["joint_no_adapter"]["temporal adapters"]["trainable"] > 0
    assert trainable["joint_no_temporal"]["temporal adapters"]["total"] == 0
    assert trainable["joint_full_ft"]["backbone"]["trainable"] == trainable["joint_full_ft"]["backbone"]["total"] > 0
    assert {report[r]["arguments"]["method"] for r in ("simvp", "tau")} == {"simvp", "tau"}
    for row in ("joint", "joint_random_backbone", "joint_no_adapter", "joint_no_transformer"):
        assert trainable[row]["backbone"]["trainable"] == 0, row
    # the no-Transformer row has only the heads: nothing on or in the backbone trains
    assert trainable["joint_no_transformer"]["total"]["trainable"] == trainable["joint_no_transformer"]["task heads"]["trainable"]


@pytest.mark.slow  # shares the study of every row at tiny size (~3 minutes)
def test_no_transformer_row_never_runs_the_backbone(tiny_study):
    runs, _ = tiny_study
    model = _loaded(runs["joint_no_transformer"][0][1])
    calls = []
    for module in model.backbone.modules():
        module.register_forward_hook(lambda *_: calls.append(1))
    task = "moving_digits"
    clip = load_task(task, seed=0, num_train=2, num_validation=1, num_test=1).with_format("torch")["test"][0:1]
    before = model(pixel_values=clip["inputs"].float(), task=task).predictions
    with torch.no_grad():
        for param in model.backbone.parameters():
            param.add_(1.0)
    after = model(pixel_values=clip["inputs"].float(), task=task).predictions
    assert not calls and torch.equal(before, after)


@pytest.mark.slow  # shares the study of every row at tiny size (~3 minutes)
def test_random_backbone_row_differs_from_the_pretrained_one_in_weights_not_shape(tiny_study):
    runs, _ = tiny_study
    pretrained = _loaded(runs["joint"][0][1]).backbone.state_dict()
    random = _loaded(runs["joint_random_backbone"][0][1]).backbone.state_dict()
    key = "encoder.layers.0.mlp.fc1.weight"  # not adapted: the backbone's own weight
    assert set(pretrained) == set(random) and pretrained[key].shape == random[key].shape
    assert not torch.equal(pretrained[key], random[key])


@pytest.mark.slow  # shares the study of every row at tiny size (~3 minutes)
def test_study_renders_tables_curves_and_findings(tiny_study, tmp_path):
    runs, common = tiny_study
    raw = {"command": "test", "sizes": common, "seeds": [0], "rows": {r: study.ROWS[r].label for r in runs},
           "search_fraction": 0.5, "total_wall_time_s": 1.0, "backbone": "unistd-hf/clip-mae-tiny", "jobs": 1,
           "threads": 1, "partial": False, "runs": {"0": {}}}
    for row, entries in runs.items():
        summaries = {kwargs["tasks"][0]: study.summarize_run(report) for kwargs, report in entries}
        raw["runs"]["0"][row] = summaries if study.ROWS[row].per_task else next(iter(summaries.values()))
    curves = study.plot_curves({0: raw["runs"]["0"]}, list(runs), tmp_path / "curves.png")
    assert curves.stat().st_size > 0
    text = study.render(json.loads(json.dumps(raw)), curves=curves.name)
    for label in ("joint, no Transformer (heads only)", "single-task, full method (4 models)", "copy-last-frame",
                  "**Control (the shared Transformer)**", "**Claim 4 (pretraining)**", "curves.png"):
        assert label in text


def test_verdict_pairs_seeds_and_calls_a_difference_within_the_spread_no_difference():
    def table(a: list[float], b: list[float], seeds=(0, 1, 2)) -> dict:
        return {"a": {"seeds": list(seeds), "metrics": {"t": {"psnr": a, "mse": a}}},
                "b": {"seeds": list(seeds), "metrics": {"t": {"psnr": b, "mse": b}}}}

    # seeds differ by 5 dB (their data), the pairs by +0.3 +- 0.1: the interval 0.3 +- 4.303 * 0.1 / sqrt(3) excludes 0
    diff, noise, word = study.verdict(table([20.3, 25.4, 30.2], [20.0, 25.0, 30.0]), "a", "b", "t", "psnr")
    assert word == "better" and diff == pytest.approx(0.3) and noise == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert study.verdict(table([20.3, 25.4, 30.2], [20.0, 25.0, 30.0]), "a", "b", "t", "mse")[2] == "worse"
    assert study.verdict(table([20.3, 24.8, 30.2], [20.0, 25.0, 30.0]), "a", "b", "t", "psnr")[2] == "no difference"
    # two seeds: +0.04 and +0.06 is consistent but within 12.7 * 0.014 / sqrt(2); +0.50 and +0.52 is not
    assert study.verdict(table([20.04, 25.06], [20.0, 25.0], seeds=(0, 1)), "a", "b", "t", "psnr")[2] == "no difference"
    assert study.verdict(table([20.50, 25.52], [20.0, 25.0], seeds=(0, 1)), "a", "b", "t", "psnr")[2] == "better"
    one = {"a": {"seeds": [0], "metrics": {"t": {"psnr": [21.0]}}}, "b": {"seeds": [0, 1], "metrics": {"t": {"psnr": [20.0, 22.0]}}}}
    assert study.verdict(one, "a", "b", "t", "psnr")[2] == "one seed"
