"""Constant-velocity extrapolation (`unistd_hf.motion`) against independent computations, and its wiring as the
residual's base of UniSTD and the SimVP/TAU references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_clip_config
from unistd_hf.baselines import build_reference_model
from unistd_hf.configuration_unistd import TaskSpec, UniSTDConfig
from unistd_hf.modeling_unistd import UniSTDModel
from unistd_hf.motion import _smooth, _window_mean, block_matching_flow, extrapolate, forward_splat


def texture(size: int = 40, seed: int = 0) -> torch.Tensor:
    """A smooth random texture (1, 1, size, size): every window matches one shift only."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size + 8, size + 8, generator=g)
    return F.avg_pool2d(noise, 3, 1)[..., 3 : 3 + size, 3 : 3 + size]


def square(size: int, top: float, left: float, side: int = 6, value: float = 1.0) -> torch.Tensor:
    """A bright square on black (1, 1, size, size), anti-aliased at sub-pixel positions: each pixel holds the
    fraction of its area that the square covers."""
    coords = torch.arange(size, dtype=torch.float32)
    cover_y = ((coords + 1).clamp(max=top + side) - coords.clamp(min=top)).clamp(0, 1)
    cover_x = ((coords + 1).clamp(max=left + side) - coords.clamp(min=left)).clamp(0, 1)
    return value * (cover_y[:, None] * cover_x[None, :])[None, None]


def test_window_mean_equals_average_pooling_without_padding():
    x = torch.rand(2, 3, 11, 14, dtype=torch.float64)
    for window in (1, 3, 5, 9):
        expected = F.avg_pool2d(x, window, 1, window // 2, count_include_pad=False)
        torch.testing.assert_close(_window_mean(x, window), expected)


@pytest.mark.parametrize("shift", [(2, -3), (0, 4), (-1, 0)])
def test_block_matching_recovers_an_integer_shift(shift):
    frame = texture()
    moved = torch.roll(frame, shifts=shift, dims=(2, 3))
    velocity = block_matching_flow(frame, moved, radius=4, window=7)  # (1, 2, H, W)
    inner = velocity[0, :, 8:-8, 8:-8]  # away from the wrapped border
    expected = torch.tensor(shift, dtype=torch.float32).view(2, 1, 1)
    # the parabola's sub-pixel step is biased where the cost is asymmetric around its minimum: small, and unbiased
    # on average
    assert (inner - expected).abs().max() < 0.2 and (inner - expected).mean((1, 2)).abs().max() < 0.03
    assert torch.equal(inner.round(), expected.expand_as(inner))


def test_block_matching_divides_by_the_gap_and_refines_below_a_pixel():
    frame = texture()
    moved = torch.roll(frame, shifts=(4, -2), dims=(2, 3))
    velocity = block_matching_flow(frame, moved, radius=4, window=7, gap=2)
    assert torch.allclose(velocity[0, :, 8:-8, 8:-8].mean((1, 2)), torch.tensor([2.0, -1.0]), atol=0.02)
    # a square moved by half a pixel: the parabola puts the estimate near 0.5, integer matching could not
    before, after = square(24, 9.0, 9.0), square(24, 9.0, 9.5)
    velocity = block_matching_flow(before, after, radius=3, window=9)
    dx = velocity[0, 1, 9:15, 9:15]
    assert (dx - 0.5).abs().max() < 0.2, dx


def test_flat_regions_stay_still():
    frame = torch.full((1, 1, 16, 16), 0.3)
    assert torch.equal(block_matching_flow(frame, frame), torch.zeros(1, 2, 16, 16))


def test_smoothing_lets_textured_pixels_speak_for_flat_ones():
    frame = torch.zeros(1, 1, 16, 16)
    frame[..., 4:12, 4:12] = 1.0  # textured (non-zero gradient) only on the square's border
    velocity = torch.randn(1, 2, 16, 16)  # noise where the frame is flat
    edge = frame.diff(dim=-1, append=frame[..., -1:]).abs() + frame.diff(dim=-2, append=frame[..., -1:, :]).abs() > 0
    velocity[:, 0][edge[:, 0]], velocity[:, 1][edge[:, 0]] = 2.0, -1.0
    smoothed = _smooth(velocity, frame, 9)
    inner = smoothed[0, :, 6:10, 6:10]  # flat pixels inside the square: the border's velocity, the noise gone
    assert torch.allclose(inner, torch.tensor([2.0, -1.0]).view(2, 1, 1).expand_as(inner), atol=1e-3)
    assert torch.equal(_smooth(velocity, frame, 1), velocity)


def test_forward_splat_moves_content_and_interpolates_between_pixels():
    frame = torch.zeros(1, 1, 20, 20)
    frame[..., 5:9, 6:10] = torch.rand(4, 4)
    displacement = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 20, 20)
    out = forward_splat(frame, displacement, torch.zeros(1, 20, 20))
    torch.testing.assert_close(out, torch.roll(frame, shifts=(3, -2), dims=(2, 3)))
    # half a pixel to the right: each target pixel gets the mean of its two sources (interior columns)
    field = texture(20)
    half = torch.tensor([0.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, 20, 20)
    out = forward_splat(field, half, torch.zeros(1, 20, 20))
    torch.testing.assert_close(out[..., 1:], 0.5 * (field[..., :-1] + field[..., 1:]))


def test_moving_content_passes_in_front_and_leaves_nothing_behind():
    background = torch.full((1, 1, 24, 24), 0.2)
    frame = torch.maximum(background, square(24, 8, 8))
    velocity = torch.zeros(1, 2, 24, 24)
    velocity[:, 1, 8:14, 8:14] = 6.0  # the square moves 6 px right, the background stays
    speed = velocity.square().sum(1).sqrt()
    out = forward_splat(frame, velocity, 4.0 * speed)
    assert torch.allclose(out[0, 0, 8:14, 14:20], torch.ones(6, 6), atol=1e-6), "the moving square is in front"
    assert torch.equal(out[0, 0, 8:14, 8:14], torch.zeros(6, 6)), "nothing lands where it was"
    assert torch.equal(out[..., 16:, :], background[..., 16:, :])


def test_content_entering_the_frame_continues_its_edge():
    field = texture(20)
    wind = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 20, 20)  # everything moves 3 px right
    out = forward_splat(field, wind, torch.zeros(1, 20, 20))
    torch.testing.assert_close(out[..., 3:], field[..., :-3])
    torch.testing.assert_close(out[..., :3], field[..., :1].expand(-1, -1, -1, 3))


def test_extrapolate_continues_a_constant_velocity():
    size, step = 48, (2, 3)
    clip = torch.cat([square(size, 4 + step[0] * t, 2 + step[1] * t, side=8) for t in range(4)], 1)[:, :, None]
    future = torch.cat([square(size, 4 + step[0] * t, 2 + step[1] * t, side=8) for t in range(4, 8)], 1)[:, :, None]
    exact = extrapolate(clip, 4, smooth=1)  # (1, 4, 1, H, W), the velocity as matched
    assert exact.shape == future.shape
    torch.testing.assert_close(exact, future, atol=1e-5, rtol=0)
    # smoothed (the default): a few pixels at the square's edges borrow some of the background's zero velocity
    copy = clip[:, -1:].expand_as(future)
    assert (extrapolate(clip, 4) - future).abs().mean() < 0.03 * (copy - future).abs().mean()
    assert torch.equal(extrapolate(clip[:, :1], 3), clip[:, :1].expand(1, 3, 1, size, size)), "one frame: no motion"


def test_extrapolated_task_starts_as_the_extrapolation_and_others_as_the_last_frame(tmp_path):
    moving, still = TaskSpec("moving", 4, 3, 1, 48, 48, num_downsample=2), TaskSpec("still", 4, 3, 1, 48, 48)
    config = UniSTDConfig(backbone=tiny_clip_config(), tasks=[moving, still], hidden_channels=8,
                          residual_to_last_frame=True, extrapolated_tasks=["moving"])
    model = UniSTDModel(config).eval()
    clip = torch.cat([square(48, 4 + 2 * t, 2 + 3 * t, side=8) for t in range(4)], 1)[:, :, None]
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=clip, task="moving").predictions, extrapolate(clip, 3))
        torch.testing.assert_close(model(pixel_values=clip, task="still").predictions, clip[:, -1:].expand(1, 3, 1, 48, 48))
    model.save_pretrained(tmp_path)
    assert UniSTDModel.from_pretrained(tmp_path).config.extrapolated_tasks == ["moving"]
    reference = build_reference_model("tau", [moving, still], residual_to_last_frame=True, extrapolated_tasks=["moving"])
    with torch.no_grad():
        torch.testing.assert_close(reference(pixel_values=clip, task="moving").predictions, extrapolate(clip, 3))


def test_extrapolated_tasks_are_checked():
    spec = TaskSpec("t", 4, 3, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\['other'\] are not tasks of this config"):
        UniSTDConfig(backbone=tiny_clip_config(), tasks=[spec], residual_to_last_frame=True, extrapolated_tasks=["other"])
    with pytest.raises(ValueError, match="needs residual_to_last_frame=True"):
        UniSTDConfig(backbone=tiny_clip_config(), tasks=[spec], extrapolated_tasks=["t"])
    with pytest.raises(ValueError, match="needs residual_to_last_frame=True"):
        build_reference_model("simvp", [spec], extrapolated_tasks=["t"])


@pytest.mark.parametrize("residual", [True, False])
def test_added_tasks_can_start_from_the_extrapolation(tmp_path, residual):
    from unistd_hf import add_tasks_to_unistd_peft_model, get_unistd_peft_model, save_backbone

    old, new = TaskSpec("old", 2, 2, 1, 16, 16, num_downsample=1), TaskSpec("new", 3, 2, 1, 16, 16, num_downsample=1)
    config = UniSTDConfig(backbone=tiny_clip_config(), tasks=[old], hidden_channels=8, residual_to_last_frame=residual,
                          extrapolated_tasks=["old"] if residual else None)
    model = get_unistd_peft_model(config)
    model.save_pretrained(tmp_path / "adapter")
    save_backbone(model, tmp_path / "backbone")
    if not residual:
        with pytest.raises(ValueError, match="needs residual_to_last_frame=True"):
            add_tasks_to_unistd_peft_model(tmp_path / "adapter", [new], tmp_path / "backbone", extrapolated_tasks=["new"])
        return
    added = add_tasks_to_unistd_peft_model(tmp_path / "adapter", [new], tmp_path / "backbone", extrapolated_tasks=["new"])
    assert added.get_base_model().config.extrapolated_tasks == ["old", "new"]
