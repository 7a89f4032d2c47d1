"""SimVP and TAU references: shapes for any T/T', the translator sees all frames, UniSTD's calling convention, reload."""

from __future__ import annotations

import pytest
import torch

from unistd_hf.baselines import (
    METHODS,
    InceptionUNet,
    ReferenceModel,
    ReferenceOutput,
    TAUTranslator,
    build_reference_model,
    load_reference_model,
)
from unistd_hf.configuration_unistd import TaskSpec
from unistd_hf.modules import forecast_loss

SPECS = [
    TaskSpec("more_out", 2, 5, 3, 16, 16, num_downsample=2),  # T' > T
    TaskSpec("fewer_out", 5, 3, 1, 16, 32, num_downsample=1),  # T' < T
    TaskSpec("same", 4, 4, 2, 16, 16, num_downsample=2),  # T' = T
]
SIZES = dict(hid_S=8, hid_T=16, N_T=2)


def clips(spec: TaskSpec, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, *spec.input_shape, generator=g), torch.rand(size, *spec.target_shape, generator=g)


@pytest.fixture(scope="module", params=METHODS)
def model(request) -> ReferenceModel:
    torch.manual_seed(0)
    return build_reference_model(request.param, SPECS, **SIZES)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_shapes_loss_and_only_own_task_trains(model, spec):
    model.zero_grad(set_to_none=True)
    x, y = clips(spec)
    out = model(pixel_values=x, task=spec.name, labels=y)
    assert isinstance(out, ReferenceOutput)
    assert out.predictions.shape == (2, *spec.target_shape)
    torch.testing.assert_close(out.loss, forecast_loss(out.predictions, y))
    out.loss.backward()
    assert all(p.grad is not None for p in model.models[spec.name].parameters())
    assert all(p.grad is None for name, m in model.models.items() if name != spec.name for p in m.parameters())
    assert model(x, spec.name).loss is None


def test_translator_sees_all_frames_channels_at_once(model):
    spec = SPECS[2]
    translator = model.models[spec.name].translator
    first_conv = translator.down[0].reduce if isinstance(translator, InceptionUNet) else translator.proj_in
    assert first_conv.in_channels == spec.in_frames * SIZES["hid_S"]
    assert first_conv.out_channels != 0 and first_conv.groups == 1
    # the first observed frame reaches every predicted frame (the skip starts from the last frame only)
    model.eval()
    x, _ = clips(spec)
    changed = x.clone()
    changed[:, 0, 1] = 1.0 - changed[:, 0, 1]
    with torch.no_grad():
        delta = model(changed, spec.name).predictions - model(x, spec.name).predictions
    model.train()
    assert delta.abs().amax(dim=(0, 2, 3, 4)).gt(1e-6).all(), "some predicted frame ignores observed frame 0"


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_reference_model(method, tmp_path):
    torch.manual_seed(0)
    model = build_reference_model(
        method, SPECS[:2], **SIZES, residual_to_last_frame=True, loss_l1_weight=0.25, loss_gdl_weight=0.5
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for spec in SPECS[:2]:  # one step per task: weights away from init, BatchNorm statistics updated
        x, y = clips(spec)
        model(x, spec.name, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = load_reference_model(tmp_path).eval()
    saved = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == saved
    assert loaded.config.method == method and (loaded.config.loss_l1_weight, loaded.config.loss_gdl_weight) == (0.25, 0.5)
    with torch.no_grad():
        for spec in SPECS[:2]:
            x, _ = clips(spec, seed=1)
            assert torch.equal(loaded(x, spec.name).predictions, model(x, spec.name).predictions)


def test_same_input_checks_as_unistd(model):
    spec = SPECS[0]
    x, y = clips(spec)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*\['more_out', 'fewer_out', 'same'\]"):
        model(x, "nope")
    with pytest.raises(ValueError, match=r"pixel_values for task 'more_out' must have shape .*\(B, 2, 3, 16, 16\)"):
        model(x[:, :1], "more_out")
    with pytest.raises(ValueError, match=r"labels for task 'more_out' must have shape"):
        model(x, "more_out", labels=y[:, :2])
    bad = x.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        model(bad, "more_out")


def test_bad_sizes_and_methods_raise():
    with pytest.raises(ValueError, match="method must be one of"):
        build_reference_model("convlstm", SPECS)
    with pytest.raises(ValueError, match="N_T must be >= 2 for simvp"):
        build_reference_model("simvp", SPECS, N_T=1)
    with pytest.raises(ValueError, match="hid_S .* multiple of group_norm_groups"):
        build_reference_model("tau", SPECS, hid_S=12)
    with pytest.raises(ValueError, match="tasks is empty"):
        build_reference_model("tau", [])


def test_translators_map_stacked_channels():
    x = torch.randn(2, 40, 4, 4)  # T*C' = 40
    assert InceptionUNet(40, 16, 24, depth=3)(x).shape == (2, 24, 4, 4)
    assert TAUTranslator(40, 16, 24, depth=2)(x).shape == (2, 24, 4, 4)
