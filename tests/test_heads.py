"""The task heads: SimVP's first-stage skip into the decoder (live, any T/T', any num_downsample), and the loss."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_clip_config
from unistd_hf.configuration_unistd import TaskSpec, UniSTDConfig
from unistd_hf.modeling_unistd import UniSTDModel
from unistd_hf.modules import FrameDecoder, FrameEncoder, SkipTimeMap, forecast_loss, image_gradient_difference

FRAMES = [(3, 5), (5, 2), (4, 4)]  # T' > T, T' < T, T' = T


def make_model(specs: list[TaskSpec], **kwargs) -> UniSTDModel:
    kwargs.setdefault("hidden_channels", 8)
    return UniSTDModel(UniSTDConfig(backbone=tiny_clip_config(), tasks=specs, **kwargs))


def clips(spec: TaskSpec, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, *spec.input_shape, generator=g), torch.rand(size, *spec.target_shape, generator=g)


def perturb_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("num_downsample", [1, 2, 3, 4])
@pytest.mark.parametrize("frames", FRAMES, ids=["more-out", "fewer-out", "same"])
def test_shapes_and_skip_gradient(frames, num_downsample):
    T, T_out = frames
    spec = TaskSpec("t", T, T_out, 2, 16, 32, num_downsample=num_downsample)
    model = make_model([spec])
    x, y = clips(spec)
    out = model(pixel_values=x, task="t", labels=y)
    assert out.predictions.shape == (2, T_out, 2, 16, 32)
    out.loss.backward()
    skip = model.task_decoders["t"].skip
    assert skip.mix.weight.shape == (8 * T_out, T, 1, 1)  # per channel: a T -> T' map
    assert skip.mix.weight.grad is not None and skip.mix.weight.grad.abs().sum() > 0


def test_zeroing_first_stage_features_in_the_skip_changes_the_prediction():
    spec = TaskSpec("t", 4, 6, 1, 16, 16, num_downsample=2)
    model = make_model([spec]).eval()
    x, _ = clips(spec)
    decoder = model.task_decoders["t"]
    with torch.no_grad():
        before = model(pixel_values=x, task="t").predictions
        handle = decoder.skip.register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
        zeroed = model(pixel_values=x, task="t").predictions
        handle.remove()
    assert not torch.allclose(before, zeroed, atol=1e-4)
    assert (before - zeroed).abs().amax(dim=(0, 2)).gt(1e-4).all(), "every predicted frame uses the skip"


def test_without_skip_the_decoder_has_none():
    spec = TaskSpec("t", 4, 6, 1, 16, 16, num_downsample=2)
    model = make_model([spec], decoder_skip=False)
    assert model.task_decoders["t"].skip is None
    assert not any("skip" in name for name, _ in model.named_parameters())
    x, _ = clips(spec)
    assert model(pixel_values=x, task="t").predictions.shape == (2, 6, 1, 16, 16)
    with pytest.raises(ValueError, match="built without a skip"):
        model.task_decoders["t"](torch.zeros(6, 8, 4, 4), torch.zeros(1, 4, 8, 16, 16))


def test_skip_time_map_starts_as_the_last_frame_and_learns_the_others():
    skip = SkipTimeMap(in_frames=3, out_frames=5, channels=4)
    first = torch.randn(2, 3, 4, 6, 6)
    torch.testing.assert_close(skip(first), first[:, -1:].expand(-1, 5, -1, -1, -1))
    with torch.no_grad():
        skip.mix.weight.zero_()
        skip.mix.weight[5:10, 0] = 1.0  # channel 1 = output rows 5..9: every predicted frame also adds frame 0
    expected = first[:, -1:].expand(-1, 5, -1, -1, -1).clone()
    expected[:, :, 1] += first[:, :1, 1]
    torch.testing.assert_close(skip(first), expected)


def test_encoder_returns_latent_and_full_resolution_features():
    encoder = FrameEncoder(3, 8, num_downsample=2)
    latent, first = encoder(torch.randn(5, 3, 16, 24))
    assert latent.shape == (5, 8, 4, 6) and first.shape == (5, 8, 16, 24)
    with pytest.raises(ValueError, match="needs out_frames"):
        FrameDecoder(8, 3, 2, in_frames=4)


def test_skip_weights_survive_save_and_from_pretrained(tmp_path):
    spec = TaskSpec("t", 3, 5, 1, 16, 16, num_downsample=2)
    model = make_model([spec]).eval()
    perturb_(model.task_decoders["t"].skip)
    x, _ = clips(spec)
    with torch.no_grad():
        expected = model(pixel_values=x, task="t").predictions
    model.save_pretrained(tmp_path)
    loaded = UniSTDModel.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder_skip and loaded.config.loss_l1_weight == 0.0
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x, task="t").predictions, expected)


def test_l1_term_of_the_loss():
    spec = TaskSpec("t", 2, 3, 1, 8, 8, num_downsample=1)
    model = make_model([spec], loss_l1_weight=0.5)
    x, y = clips(spec)
    out = model(pixel_values=x, task="t", labels=y)
    error = out.predictions.detach() - y
    torch.testing.assert_close(out.loss.detach(), error.square().mean() + 0.5 * error.abs().mean())
    torch.testing.assert_close(forecast_loss(out.predictions, y), error.square().mean())
    with pytest.raises(ValueError, match="loss_l1_weight must be >= 0"):
        UniSTDConfig(backbone=tiny_clip_config(), tasks=[spec], hidden_channels=8, loss_l1_weight=-1.0)


def test_gradient_difference_term_penalises_blur():
    target = torch.zeros(1, 1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1.0  # a sharp square
    blurred = torch.nn.functional.avg_pool2d(target[0], 3, stride=1, padding=1)[None]
    assert image_gradient_difference(target, target) == 0
    assert image_gradient_difference(blurred, target) > 0.1
    # by hand along W: edges of 1 at two columns per row, in 4 rows, over 8x7 differences; H likewise
    flat = torch.zeros_like(target)
    torch.testing.assert_close(image_gradient_difference(flat, target), torch.tensor(2 * (4 * 2) / 56.0))
    spec = TaskSpec("t", 2, 3, 1, 8, 8, num_downsample=1)
    model = make_model([spec], loss_gdl_weight=0.3)
    x, y = clips(spec)
    out = model(pixel_values=x, task="t", labels=y)
    expected = forecast_loss(out.predictions, y) + 0.3 * image_gradient_difference(out.predictions, y)
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="loss_gdl_weight must be >= 0"):
        UniSTDConfig(backbone=tiny_clip_config(), tasks=[spec], hidden_channels=8, loss_gdl_weight=-0.1)
