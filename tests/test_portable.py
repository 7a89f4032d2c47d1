"""Portable adapters: what is saved or pushed names its backbone so that it loads on another machine.

The hub is intercepted: `HfApi.create_repo`/`upload_folder` copy into a local "hub" folder, and in a fresh process
`huggingface_hub.snapshot_download` returns that folder. The training folder is deleted before the reload, so a
recorded absolute path of the training machine could not be followed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from helpers import tiny_clip_config
from unistd_hf import TaskSpec, UniSTDConfig, get_unistd_peft_model
from unistd_hf.peft_integration import SAVED_BACKBONE, load_unistd_peft_model, portable_backbone, save_unistd_peft_model
from unistd_hf.pretrain import PACKAGED_BACKBONE, PACKAGED_BACKBONE_DIR
from unistd_hf.report import push_adapter

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "someone/unistd-portable"
SPEC = TaskSpec("digits", in_frames=3, out_frames=2, channels=1, height=16, width=16, num_downsample=1)
HAS_PACKAGED = (PACKAGED_BACKBONE_DIR / "model.safetensors").is_file()

_LOAD_SCRIPT = """
import sys, torch
import huggingface_hub
from safetensors.torch import load_file, save_file
hub, inputs_file, out = sys.argv[1:4]
calls = []
def snapshot_download(repo_id, **kwargs):  # the hub, intercepted: the pushed folder
    calls.append(repo_id)
    return hub + "/" + repo_id
huggingface_hub.snapshot_download = snapshot_download
import unistd_hf
model = unistd_hf.load_unistd_peft_model("%s").eval()
assert calls == ["%s"], calls
with torch.no_grad():
    predictions = model(pixel_values=load_file(inputs_file)["x"], task="digits").predictions
save_file({"predictions": predictions}, out)
""" % (REPO_ID, REPO_ID)


def intercept_hub(monkeypatch, hub: Path) -> None:
    """HfApi's upload copies into `hub/<repo_id>` (subfolders too, as upload_folder does)."""
    import huggingface_hub

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Move every trainable tensor away from its initial value, so a reload onto other weights would show."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def backbone_of(kind: str, folder: Path):
    if kind == "random":
        return tiny_clip_config()
    if kind == "local folder":
        torch.manual_seed(5)
        CLIPVisionModel(tiny_clip_config()).save_pretrained(folder / "my-clip")
        return str(folder / "my-clip")
    return PACKAGED_BACKBONE


@pytest.mark.parametrize("kind", [
    "random", "local folder",
    pytest.param("packaged", marks=pytest.mark.skipif(not HAS_PACKAGED, reason="packaged backbone not installed")),
])
def test_pushed_adapter_loads_in_a_fresh_process_elsewhere(kind, tmp_path, monkeypatch):
    train_dir, hub = tmp_path / "training-machine", tmp_path / "hub"
    train_dir.mkdir()
    torch.manual_seed(0)
    model = trained_like(get_unistd_peft_model(UniSTDConfig(backbone=backbone_of(kind, train_dir), tasks=[SPEC],
                                                            hidden_channels=8)))
    x = torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(pixel_values=x, task="digits").predictions

    adapter = save_unistd_peft_model(model, train_dir / "adapter")
    config_text = (adapter / "adapter_config.json").read_text()
    recorded = json.loads(config_text)["base_model_config"]["backbone"]
    assert str(tmp_path) not in config_text, "the adapter config must not hold a path of the training machine"
    if kind == "packaged":
        assert recorded == PACKAGED_BACKBONE and not (adapter / "backbone").exists()
    else:
        assert recorded == SAVED_BACKBONE and (adapter / "backbone" / "model.safetensors").is_file()
        assert not list((adapter / "backbone").glob("*.bin")), "safetensors only"
    intercept_hub(monkeypatch, hub)
    push_adapter(adapter, REPO_ID, {"tasks": {"digits": {"model": {"mse": 0.1}, "baseline": {"mse": 0.2}}}})
    card = (hub / REPO_ID / "README.md").read_text()
    assert f'import unistd_hf\nmodel = unistd_hf.load_unistd_peft_model("{REPO_ID}")' in card
    assert (hub / REPO_ID / "backbone").is_dir() == (kind != "packaged")

    shutil.rmtree(train_dir)  # the training machine's files are gone: only the hub copy remains
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(hub), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "out.safetensors")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = load_file(str(tmp_path / "out.safetensors"))["predictions"]
    torch.testing.assert_close(reloaded, expected, atol=1e-6, rtol=0)
    # the check can fail: the untrained model predicts something else
    torch.manual_seed(0)
    fresh = get_unistd_peft_model(UniSTDConfig(backbone=tiny_clip_config(), tasks=[SPEC], hidden_channels=8)).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(pixel_values=x, task="digits").predictions, expected, atol=1e-3)


def test_backbone_records():
    assert portable_backbone(UniSTDConfig(backbone="openai/clip-vit-base-patch16", tasks=[SPEC])) == (
        "openai/clip-vit-base-patch16")  # a hub id as is
    assert portable_backbone(UniSTDConfig(backbone=PACKAGED_BACKBONE, tasks=[SPEC])) == PACKAGED_BACKBONE
    assert portable_backbone(UniSTDConfig(backbone=str(PACKAGED_BACKBONE_DIR), tasks=[SPEC])) == PACKAGED_BACKBONE
    assert portable_backbone(UniSTDConfig(backbone=tiny_clip_config(), tasks=[SPEC])) is None  # saved beside
    assert portable_backbone(UniSTDConfig(backbone="/gone/clip", tasks=[SPEC])) is None


def test_saved_beside_is_found_and_the_explicit_backbone_still_wins(tmp_path):
    torch.manual_seed(0)
    model = trained_like(get_unistd_peft_model(UniSTDConfig(backbone=tiny_clip_config(), tasks=[SPEC],
                                                            hidden_channels=8)))
    x = torch.rand(1, 3, 1, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values=x, task="digits").predictions
    save_unistd_peft_model(model, tmp_path / "adapter")
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.move(str(tmp_path / "adapter"), moved.parent.mkdir() or moved)
    with torch.no_grad():
        assert torch.equal(load_unistd_peft_model(moved)(pixel_values=x, task="digits").predictions, expected)
    other = tmp_path / "other-clip"
    torch.manual_seed(9)
    CLIPVisionModel(tiny_clip_config()).save_pretrained(other)
    with torch.no_grad():
        assert not torch.allclose(load_unistd_peft_model(moved, backbone=other)(pixel_values=x, task="digits")
                                  .predictions, expected, atol=1e-4)
    shutil.rmtree(moved / "backbone")
    with pytest.raises(ValueError, match="saved beside it.*holds no config.json"):
        load_unistd_peft_model(moved)


def test_an_adapter_naming_a_missing_path_is_explained(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_config()).save_pretrained(tmp_path / "clip")
    model = get_unistd_peft_model(UniSTDConfig(backbone=str(tmp_path / "clip"), tasks=[SPEC], hidden_channels=8))
    model.save_pretrained(tmp_path / "adapter")  # plain peft save: records the absolute path
    shutil.rmtree(tmp_path / "clip")
    with pytest.raises(ValueError, match="does not exist on this machine; pass backbone="):
        load_unistd_peft_model(tmp_path / "adapter")


@pytest.mark.slow  # a whole (tiny) training run, ~1 minute
def test_training_run_saves_its_random_backbone_beside_the_adapter(tmp_path):
    from test_training import TINY, launch

    output = tmp_path / "run"
    launch(TINY + ["--output_dir", str(output), "--cache_dir", str(tmp_path / "cache"), "--epochs", "1",
                   "--rank_search_epochs", "1"])
    adapter = output / "adapter"
    config_text = (adapter / "adapter_config.json").read_text()
    assert json.loads(config_text)["base_model_config"]["backbone"] == SAVED_BACKBONE
    assert str(tmp_path) not in config_text
    x = torch.rand(1, 4, 2, 32, 32)
    with torch.no_grad():
        expected = load_unistd_peft_model(adapter, backbone=output / "backbone")(pixel_values=x, task="city_traffic")
    moved = tmp_path / "copied" / "adapter"
    shutil.copytree(adapter, moved)
    shutil.rmtree(output)
    with torch.no_grad():
        got = load_unistd_peft_model(moved)(pixel_values=x, task="city_traffic")
    assert torch.equal(got.predictions, expected.predictions)


@pytest.mark.skipif(not HAS_PACKAGED, reason="packaged backbone not installed")
def test_a_run_on_the_packaged_backbone_records_its_name(tmp_path):
    from accelerate import Accelerator

    from unistd_hf.training import TrainingArguments
    from unistd_hf.training.models import build_model, resolve_run_backbone

    args = TrainingArguments(output_dir=str(tmp_path / "run"), hidden_channels=8)  # --backbone: the packaged default
    assert args.backbone == PACKAGED_BACKBONE
    backbone, sha256 = resolve_run_backbone(args)
    model, config = build_model(args, [SPEC], backbone, Accelerator(cpu=True))
    assert config.backbone == PACKAGED_BACKBONE and sha256
    save_unistd_peft_model(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_config"]
    assert recorded["backbone"] == PACKAGED_BACKBONE and not (tmp_path / "adapter" / "backbone").exists()
