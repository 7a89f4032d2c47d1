"""UniSTDModel without PEFT: shapes, identity at init, freezing, backbone loading, save/load, input errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from helpers import tiny_clip_config
from unistd_hf.configuration_unistd import TaskSpec, UniSTDConfig
from unistd_hf.modeling_unistd import UniSTDModel, UniSTDOutput
from unistd_hf.report import format_parameter_report, parameter_report
from unistd_hf.modules import TemporalAdapter, sincos_2d_position_encoding

# Table 1 of the paper, scaled down (frames as in the paper, smaller frames/resolutions where it keeps tests fast).
TASKS = [
    TaskSpec("mmnist", 10, 10, 1, 64, 64, num_downsample=2, discipline="trajectory"),
    TaskSpec("taxibj", 4, 4, 2, 32, 32, num_downsample=1, discipline="traffic"),
    TaskSpec("bair", 2, 10, 3, 64, 64, num_downsample=2, discipline="trajectory"),
    TaskSpec("enso", 12, 14, 1, 24, 48, num_downsample=2, discipline="weather"),
    TaskSpec("kitti", 4, 2, 3, 32, 48, num_downsample=2, discipline="driving"),
]


def make_config(backbone=None, tasks=TASKS, **kwargs) -> UniSTDConfig:
    kwargs.setdefault("hidden_channels", 16)
    return UniSTDConfig(backbone=backbone if backbone is not None else tiny_clip_config(), tasks=tasks, **kwargs)


def batch(spec: TaskSpec, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, *spec.input_shape, generator=g), torch.rand(size, *spec.target_shape, generator=g)


def perturb_temporal_adapters(model: UniSTDModel) -> None:
    with torch.no_grad():
        for adapter in model.temporal_adapters:
            adapter.temporal_up.weight.normal_(std=0.5)
            adapter.temporal_up.bias.normal_(std=0.5)


@pytest.fixture(scope="module")
def clip_dir_old_prefix(tmp_path_factory, clip_dir) -> str:
    """The same checkpoint with the older `vision_model.` key prefix (as in transformers 4 / full CLIP files)."""
    path = tmp_path_factory.mktemp("clip_old")
    state = load_file(os.path.join(clip_dir, "model.safetensors"))
    prefixed = {f"vision_model.{k}": v for k, v in state.items()}
    save_file(prefixed, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(open(os.path.join(clip_dir, "config.json")).read())
    return str(path)


@pytest.fixture(scope="module")
def model() -> UniSTDModel:
    torch.manual_seed(0)
    return UniSTDModel(make_config())


def capture_backbone_io(model: UniSTDModel):
    """Hooks recording the tokens entering the pre-encoder layernorm and the encoder's output."""
    seen: dict[str, torch.Tensor] = {}
    h1 = model.backbone.pre_layrnorm.register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", a[0].detach()))
    h2 = model.backbone.encoder.register_forward_hook(
        lambda m, a, o: seen.__setitem__("hidden", o.last_hidden_state.detach())
    )
    return seen, (h1, h2)


def reference_hidden(clip_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """The unmodified backbone (a fresh load of the same checkpoint) on the same tokens."""
    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        return ref.encoder(inputs_embeds=ref.pre_layrnorm(tokens)).last_hidden_state


# ----------------------------------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    config = make_config(
        hidden_channels=24,
        temporal_reduction=4,
        temporal_gate="additive",
        use_temporal_adapter=False,
        freeze_backbone=False,
        pretrained_backbone_config=tiny_clip_config(hidden_size=64).to_dict(),
    )
    config.save_pretrained(tmp_path)
    loaded = UniSTDConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.task_specs == config.task_specs
    assert (loaded.hidden_channels, loaded.temporal_gate, loaded.use_temporal_adapter) == (24, "additive", False)
    assert loaded.pretrained_backbone_config["hidden_size"] == 64
    assert UniSTDConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize("spec", TASKS, ids=[t.name for t in TASKS])
def test_forward_backward_shapes(model, spec):
    model.zero_grad(set_to_none=True)
    x, y = batch(spec)
    out = model(pixel_values=x, task=spec.name, labels=y)
    assert isinstance(out, UniSTDOutput)
    assert out.predictions.shape == (2, spec.out_frames, spec.channels, spec.height, spec.width)
    h, w = spec.token_grid
    assert out.last_hidden_state.shape == (2, h * w, model.width)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ((out.predictions - y) ** 2).mean())
    out.loss.backward()
    for head in ("task_encoders", "input_projections", "output_projections", "task_decoders"):
        params = list(getattr(model, head)[spec.name].parameters())
        assert all(p.grad is not None for p in params), head
        assert any(p.grad.abs().sum() > 0 for p in params), head
        others = [p for name, m in getattr(model, head).items() if name != spec.name for p in m.parameters()]
        assert all(p.grad is None for p in others), f"{head} of other tasks got gradients"
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(a.temporal_up.weight.grad is not None for a in model.temporal_adapters)
    # without labels: predictions only; tuple output
    loss, preds, hidden = model(x, spec.name, labels=y, return_dict=False)
    assert preds.shape == out.predictions.shape
    assert model(x, spec.name).loss is None


def test_position_encoding_any_grid():
    pos = sincos_2d_position_encoding(3, 5, 16)
    assert pos.shape == (15, 16)
    grid = pos.view(3, 5, 16)
    # first half encodes the row, second half the column
    assert torch.equal(grid[1, 0, :8], grid[1, 4, :8]) and not torch.equal(grid[0, 0, :8], grid[1, 0, :8])
    assert torch.equal(grid[0, 2, 8:], grid[2, 2, 8:]) and not torch.equal(grid[0, 0, 8:], grid[0, 1, 8:])
    assert torch.unique(pos, dim=0).shape[0] == 15
    # position 0 is (sin 0, cos 0) per frequency
    assert torch.equal(pos[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_encoding(2, 2, 30)


def test_identity_at_init(clip_dir):
    torch.manual_seed(0)
    model = UniSTDModel(make_config(backbone=clip_dir)).eval()
    spec = TASKS[3]
    x, _ = batch(spec)
    seen, hooks = capture_backbone_io(model)
    with torch.no_grad():
        model(x, spec.name)
    expected = reference_hidden(clip_dir, seen["tokens"])
    assert torch.equal(seen["hidden"], expected)

    # the check can fail: a trained temporal adapter changes the hidden states
    perturb_temporal_adapters(model)
    with torch.no_grad():
        model(x, spec.name)
    assert not torch.allclose(seen["hidden"], expected, atol=1e-4)
    for h in hooks:
        h.remove()


def test_residual_to_last_frame_adds_the_last_observed_frame():
    spec = TASKS[0]
    plain = UniSTDModel(make_config(tasks=[spec])).eval()
    residual = UniSTDModel(make_config(tasks=[spec], residual_to_last_frame=True)).eval()
    residual.load_state_dict(plain.state_dict())
    frames, _ = batch(spec)
    with torch.no_grad():
        change = plain(pixel_values=frames, task=spec.name).predictions
        predicted = residual(pixel_values=frames, task=spec.name).predictions
    torch.testing.assert_close(predicted, change + frames[:, -1:])


def test_additive_gate_is_not_identity(clip_dir):
    model = UniSTDModel(make_config(backbone=clip_dir, temporal_gate="additive")).eval()
    x = torch.randn(2, 6, model.width)
    adapter = model.temporal_adapters[0]
    torch.testing.assert_close(adapter(x), x + 0.5)
    scaled = TemporalAdapter(model.width, 6, "scaled")
    assert torch.equal(scaled(x), x)


def test_only_new_modules_train_backbone_unchanged(clip_dir):
    torch.manual_seed(0)
    model = UniSTDModel(make_config(backbone=clip_dir))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") or "temporal_moe" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    heads_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for spec in TASKS[:2]:
        x, y = batch(spec)
        model(x, spec.name, labels=y).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} <= trainable
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), f"{name} changed"
    changed = [n for n, p in model.named_parameters() if n in heads_before and not torch.equal(p, heads_before[n])]
    assert any(n.startswith("task_encoders.mmnist") for n in changed)
    assert any("temporal_up" in n for n in changed)


def test_unfrozen_backbone_trains(clip_dir):
    model = UniSTDModel(make_config(backbone=clip_dir, freeze_backbone=False))
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for a in model.temporal_adapters for p in a.temporal_moe.parameters())


@pytest.mark.parametrize("prefixed", [False, True], ids=["plain", "vision_model-prefix"])
def test_backbone_loads_from_saved_clip(clip_dir, clip_dir_old_prefix, prefixed):
    path = clip_dir_old_prefix if prefixed else clip_dir
    config = make_config(backbone=path, tasks=TASKS[:1])
    model = UniSTDModel(config)
    saved = load_file(os.path.join(clip_dir, "model.safetensors"))
    state = model.backbone.state_dict()
    assert set(saved) <= set(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert config.pretrained_backbone_config["hidden_size"] == 32
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert isinstance(model.backbone.encoder.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_backbone_checkpoint_errors(clip_dir, tmp_path):
    recorded = tiny_clip_config(hidden_size=64).to_dict()
    wrong = make_config(backbone=clip_dir, tasks=TASKS[:1], pretrained_backbone_config=recorded)
    with pytest.raises(ValueError, match="does not match the architecture.*hidden_size"):
        UniSTDModel(wrong)
    state = load_file(os.path.join(clip_dir, "model.safetensors"))
    save_file({k: v for k, v in state.items() if k.startswith("embeddings.")}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(clip_dir, "config.json")).read())
    with pytest.raises(ValueError, match="lacks .* weight"):
        UniSTDModel(make_config(backbone=str(tmp_path), tasks=TASKS[:1]))


def test_save_and_from_pretrained(clip_dir, tmp_path):
    torch.manual_seed(0)
    model = UniSTDModel(make_config(backbone=clip_dir, tasks=TASKS[3:])).eval()
    perturb_temporal_adapters(model)
    spec = TASKS[3]
    x, _ = batch(spec)
    with torch.no_grad():
        expected = model(x, spec.name).predictions
    model.save_pretrained(tmp_path)
    loaded = UniSTDModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, spec.name).predictions, expected)
    # loading re-applies the freezing (transformers creates fresh parameters)
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert not any(p.requires_grad for a in loaded.temporal_adapters for p in a.temporal_moe.parameters())
    assert any(p.requires_grad for p in loaded.task_encoders.parameters())


def test_bad_inputs_raise(model):
    spec = TASKS[0]
    x, y = batch(spec)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*\['mmnist', 'taxibj'"):
        model(x, "nope")
    expected = r"pixel_values for task 'mmnist' must have shape .*\(B, 10, 1, 64, 64\), got \(2, 10, 1, 32, 64\)"
    with pytest.raises(ValueError, match=expected):
        model(x[..., :32, :], "mmnist")
    with pytest.raises(ValueError, match=r"must have shape .*got \(10, 1, 64, 64\)"):
        model(x[0], "mmnist")
    expected = (
        r"labels for task 'mmnist' must have shape \(B, T', C, H, W\) = \(2, 10, 1, 64, 64\), "
        r"got \(2, 9, 1, 64, 64\)"
    )
    with pytest.raises(ValueError, match=expected):
        model(x, "mmnist", labels=y[:, :9])
    with pytest.raises(ValueError, match=r"labels .*\(1, 10, 1, 64, 64\), got \(2, 10, 1, 64, 64\)"):
        model(x[:1], "mmnist", labels=y)
    bad = x.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values for task 'mmnist' must be finite, got 1 NaN/inf"):
        model(bad, "mmnist")
    bad_y = y.clone()
    bad_y[1, 2, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="labels .* must be finite"):
        model(x, "mmnist", labels=bad_y)
    with pytest.raises(ValueError, match="floating-point"):
        model((x * 255).to(torch.uint8), "mmnist")
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        model(x.numpy(), "mmnist")


def test_invalid_task_names_and_widths():
    with pytest.raises(ValueError, match="cannot contain '.'"):
        UniSTDModel(make_config(tasks=[TaskSpec("a.b", 2, 2, 1, 8, 8, num_downsample=1)]))
    with pytest.raises(ValueError, match="at least one TaskSpec"):
        UniSTDModel(make_config(tasks=[]))


def test_dtype_follows_backbone():
    torch.manual_seed(0)
    spec = TASKS[1]
    model = UniSTDModel(make_config(tasks=[spec]))
    model.backbone.to(torch.bfloat16)
    x, y = batch(spec)
    out = model(x, spec.name, labels=y)
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert out.predictions.dtype == torch.float32 and out.loss.dtype == torch.float32
    out.loss.backward()
    model.to(torch.bfloat16)
    assert model(x, spec.name).predictions.dtype == torch.bfloat16


def test_without_temporal_adapter():
    model = UniSTDModel(make_config(tasks=TASKS[1:2], use_temporal_adapter=False))
    assert len(model.temporal_adapters) == 0
    assert all(not layer.self_attn._forward_hooks for layer in model.backbone.encoder.layers)
    x, _ = batch(TASKS[1])
    assert model(x, "taxibj").predictions.shape == (2, *TASKS[1].target_shape)


def test_deepcopy_rebinds_temporal_hooks(model):
    spec = TASKS[1]
    x, _ = batch(spec)
    model.eval()
    with torch.no_grad():
        before = model(x, spec.name).predictions
        clone = copy.deepcopy(model)
        perturb_temporal_adapters(clone)
        assert torch.equal(model(x, spec.name).predictions, before)
        assert not torch.allclose(clone(x, spec.name).predictions, before)
    model.train()


def test_parameter_report_bare(model):
    report = parameter_report(model)
    assert report["backbone"] == {"trainable": 0, "total": sum(p.numel() for p in model.backbone.parameters())}
    head_names = ("task_encoders", "input_projections", "output_projections", "task_decoders")
    heads = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in head_names)
    assert report["task heads"] == {"trainable": heads, "total": heads}
    moe = sum(a.temporal_moe.weight.numel() for a in model.temporal_adapters)
    temporal = sum(p.numel() for p in model.temporal_adapters.parameters())
    assert report["temporal adapters"] == {"trainable": temporal - moe, "total": temporal}
    assert report["rankmoe adapters"] == {"trainable": 0, "total": 0}
    assert report["total"]["total"] == sum(p.numel() for p in model.parameters())
    table = format_parameter_report(report)
    assert table.splitlines()[0] == "| part | trainable | total | trainable % |"
    assert f"| backbone | 0 | {report['backbone']['total']:,} | 0.00 |" in table
