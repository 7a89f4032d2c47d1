"""UniSTD with RankMoE through peft: identity at init, what trains, what is saved, reload in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

import rankmoe_peft  # noqa: F401  (registers "rankmoe" with peft)
from helpers import tiny_clip_config
from unistd_hf.configuration_unistd import TaskSpec, UniSTDConfig
from unistd_hf.modeling_unistd import TASK_HEAD_MODULES, UniSTDModel
from unistd_hf.peft_integration import default_rankmoe_config, get_unistd_peft_model, load_unistd_peft_model, save_backbone
from unistd_hf.report import parameter_report

REPO = Path(__file__).resolve().parents[1]
TASKS = [
    TaskSpec("taxibj", 4, 4, 2, 32, 32, num_downsample=1, discipline="traffic"),
    TaskSpec("enso", 12, 14, 1, 24, 48, num_downsample=2, discipline="weather"),
]


def make_config(backbone) -> UniSTDConfig:
    return UniSTDConfig(backbone=backbone, tasks=TASKS, hidden_channels=16)


def batch(spec: TaskSpec, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, *spec.input_shape, generator=g), torch.rand(size, *spec.target_shape, generator=g)


def train_steps(model, steps: int = 2) -> None:
    """A few AdamW steps (weights) + SGD steps (ranks), so that adapters and heads are non-trivial."""
    ranks = list(model.rank_parameters())
    rank_ids = {id(p) for p in ranks}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in rank_ids]
    opt_w = torch.optim.AdamW(weights, lr=1e-2)
    opt_r = torch.optim.SGD(ranks, lr=0.05, momentum=0.9, nesterov=True)
    model.train()
    for step in range(steps):
        for spec in TASKS:
            x, y = batch(spec, seed=step)
            loss = model(pixel_values=x, task=spec.name, labels=y).loss
            loss.backward()
        opt_w.step()
        opt_r.step()
        opt_w.zero_grad()
        opt_r.zero_grad()
    model.eval()


# ----------------------------------------------------------------------------------------------------------------


def test_default_config_is_the_papers(clip_dir):
    model = get_unistd_peft_model(make_config(clip_dir))
    config = model.peft_config["default"]
    assert (config.max_rank, config.init_rank, config.lora_alpha, config.router) == (8, 4.5, 8.0, "token")
    summary = model.rank_summary()
    expected = {}
    for i in range(2):
        for proj, experts in (("q_proj", 6), ("k_proj", 6), ("v_proj", 6), ("out_proj", 2)):
            expected[f"backbone.encoder.layers.{i}.self_attn.{proj}"] = experts
        expected[f"temporal_adapters.{i}.temporal_moe"] = 2
    assert {name: len(r) for name, r in summary.items()} == expected  # no fc1/fc2, no heads
    assert all(r == 4.5 for ranks in summary.values() for r in ranks)
    wrapped = {name for name, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    bare = "base_model.model."
    assert wrapped == {f"{bare}{h}.{t.name}" for h in TASK_HEAD_MODULES for t in TASKS} | {
        f"{bare}temporal_adapters.{i}.temporal_{w}" for i in range(2) for w in ("down", "up")
    }
    assert UniSTDConfig.from_dict(config.base_model_config).to_dict() == model.base_model.model.config.to_dict()
    # overrides replace fields
    assert default_rankmoe_config(make_config(clip_dir), max_rank=16).max_rank == 16


def test_identity_at_init(clip_dir):
    torch.manual_seed(0)
    model = get_unistd_peft_model(make_config(clip_dir)).eval()
    backbone = model.base_model.model.backbone
    seen = {}
    backbone.pre_layrnorm.register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", a[0].detach()))
    backbone.encoder.register_forward_hook(lambda m, a, o: seen.__setitem__("hidden", o.last_hidden_state.detach()))
    x, _ = batch(TASKS[1])
    with torch.no_grad():
        model(pixel_values=x, task="enso")
        ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
        expected = ref.encoder(inputs_embeds=ref.pre_layrnorm(seen["tokens"])).last_hidden_state
    assert torch.equal(seen["hidden"], expected)
    # and it can fail: non-zero expert weights change the hidden states
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rankmoe_B" in name:
                p.normal_(std=0.5)
        model(pixel_values=x, task="enso")
    assert not torch.allclose(seen["hidden"], expected, atol=1e-4)


def test_only_adapters_heads_temporal_train(clip_dir):
    torch.manual_seed(0)
    model = get_unistd_peft_model(make_config(clip_dir))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        parts = name.split(".")
        assert (
            any(p.startswith("rankmoe_") for p in parts)
            or ("modules_to_save" in parts and (set(parts) & {*TASK_HEAD_MODULES, "temporal_down", "temporal_up"}))
        ), name
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".base_layer." in n for n in frozen) and any("original_module" in n for n in frozen)
    for spec in TASKS:
        x, y = batch(spec)
        model(pixel_values=x, task=spec.name, labels=y).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable  # every trainable tensor is reached, nothing else
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("rankmoe_B" in n and "q_proj" in n for n in nonzero)
    assert any("rankmoe_B" in n and "temporal_moe" in n for n in nonzero)
    assert any("temporal_up.modules_to_save" in n for n in nonzero)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    state = load_file(os.path.join(clip_dir, "model.safetensors"))
    backbone = model.base_model.model.backbone
    q_proj = backbone.encoder.layers[1].self_attn.q_proj
    assert torch.equal(q_proj.base_layer.weight, state["encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(backbone.encoder.layers[1].mlp.fc1.weight, state["encoder.layers.1.mlp.fc1.weight"])


def test_parameter_report_peft(clip_dir):
    config = make_config(clip_dir)
    bare = parameter_report(UniSTDModel(make_config(clip_dir)))
    report = parameter_report(get_unistd_peft_model(config))
    assert report["backbone"] == bare["backbone"]
    assert report["task heads"] == bare["task heads"]  # wrapped heads counted once (the trained copy)
    assert report["temporal adapters"] == bare["temporal adapters"]
    moe = report["rankmoe adapters"]
    assert moe["trainable"] == moe["total"] > 0
    assert report["total"]["total"] == bare["total"]["total"] + moe["total"]
    assert report["total"]["trainable"] == bare["total"]["trainable"] + moe["total"]


_RELOAD_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from unistd_hf.peft_integration import load_unistd_peft_model
adapter_dir, data, out = sys.argv[1:4]
model = load_unistd_peft_model(adapter_dir).eval()
inputs = load_file(data)
with torch.no_grad():
    preds = {name: model(pixel_values=x, task=name).predictions for name, x in inputs.items()}
save_file(preds, out)
"""


def test_save_and_reload_in_fresh_process(clip_dir, tmp_path):
    torch.manual_seed(0)
    model = get_unistd_peft_model(make_config(clip_dir))
    train_steps(model)
    inputs = {spec.name: batch(spec, seed=7)[0] for spec in TASKS}
    with torch.no_grad():
        expected = {name: model(pixel_values=x, task=name).predictions for name, x in inputs.items()}
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    kept = (*TASK_HEAD_MODULES, "temporal_down", "temporal_up")
    assert saved and all(
        "rankmoe_" in k or any(f"{h}." in k for h in kept) for k in saved
    ), "backbone weights must not be saved with the adapter"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_config"]["backbone"] == clip_dir

    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(adapter_dir), str(tmp_path / "inputs.safetensors"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_file(str(out))
    for name, preds in expected.items():
        assert torch.equal(reloaded[name], preds), name
    # the check can fail: the untrained model predicts differently
    with torch.no_grad():
        fresh = get_unistd_peft_model(make_config(clip_dir)).eval()
        assert not torch.allclose(fresh(pixel_values=inputs["enso"], task="enso").predictions, expected["enso"])


def test_random_backbone_needs_saved_backbone(tmp_path):
    torch.manual_seed(0)
    model = get_unistd_peft_model(make_config(tiny_clip_config()))
    train_steps(model, steps=1)
    x, _ = batch(TASKS[0], seed=3)
    with torch.no_grad():
        expected = model(pixel_values=x, task="taxibj").predictions
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="randomly initialised backbone.*backbone="):
        load_unistd_peft_model(tmp_path / "adapter")
    with pytest.raises(ValueError, match="lacks"):  # the wrapped backbone's own save is not a CLIP checkpoint
        model.base_model.model.backbone.save_pretrained(tmp_path / "wrapped")
        load_unistd_peft_model(tmp_path / "adapter", backbone=tmp_path / "wrapped")
    save_backbone(model, tmp_path / "backbone")
    loaded = load_unistd_peft_model(tmp_path / "adapter", backbone=tmp_path / "backbone")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x, task="taxibj").predictions, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = load_unistd_peft_model(tmp_path / "adapter", backbone=tmp_path / "backbone", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    # a backbone of another architecture is refused
    other = CLIPVisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    CLIPVisionModel(other).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_unistd_peft_model(tmp_path / "adapter", backbone=tmp_path / "other")


def test_missing_base_model_config_is_explained(clip_dir, tmp_path):
    from rankmoe_peft import RankMoEConfig

    import peft

    model = UniSTDModel(make_config(clip_dir))
    peft.get_peft_model(model, RankMoEConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no base_model_config"):
        load_unistd_peft_model(tmp_path)
