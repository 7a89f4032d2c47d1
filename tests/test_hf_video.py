"""`hf_video`: every documented form of a video column reads as (T, C, H, W) in [0, 1], or fails naming the column."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from unistd_hf.data import load_task

N, T, H, W = 10, 5, 8, 12  # H != W, so a transposed read would show in the shapes


def videos(channels: int, seed: int = 0) -> np.ndarray:
    """(N, T, C, H, W) uint8 with every pixel different across frames and channels."""
    return np.random.default_rng(seed).integers(0, 256, (N, T, channels, H, W), dtype=np.uint8)


def load(source, **options):
    return load_task("hf_video", dataset=source, column="clip", in_frames=2, out_frames=3, **options)


def check_clips(ds: datasets.DatasetDict, expected: np.ndarray) -> None:
    """Every clip of every split is one of the expected (N, T, C, H, W) videos in [0, 1], frames in order."""
    count = 0
    for split in ds.values():
        for row in split:
            clip = np.concatenate([row["inputs"].numpy(), row["targets"].numpy()])
            assert clip.shape == expected.shape[1:]
            assert any(np.allclose(clip, e, atol=1e-3) for e in expected), "a clip is not one of the videos"
            count += 1
    assert count == len(expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_nested_lists_are_divided_by_255(channels):
    raw = videos(channels)
    source = datasets.Dataset.from_dict({"clip": raw})  # List(...(Value('uint8'))): numpy format gives int64
    assert "uint8" in str(source.features["clip"])
    check_clips(load(source), raw / 255.0)


def test_thwc_lists_are_detected():
    raw = videos(3)
    source = datasets.Dataset.from_dict({"clip": raw.transpose(0, 1, 3, 4, 2)})  # (N, T, H, W, C)
    check_clips(load(source), raw / 255.0)
    check_clips(load(source, layout="THWC"), raw / 255.0)  # stated explicitly: the same


def test_float_lists_in_unit_range():
    raw = videos(2).astype(np.float32) / 255.0
    source = datasets.Dataset.from_dict({"clip": raw.tolist()})  # plain Python floats
    check_clips(load(source), raw)


def test_int_lists_need_a_value_range():
    raw = videos(1)
    source = datasets.Dataset.from_dict({"clip": raw.astype(np.int64).tolist()})  # Python ints: int64, not uint8
    with pytest.raises(ValueError, match=r"column 'clip': int64 values need value_range=\(low, high\)"):
        load(source)
    check_clips(load(source, value_range=(0, 255)), raw / 255.0)


def test_array4d_and_array3d_features():
    raw = videos(1)
    float_source = datasets.Dataset.from_dict(
        {"clip": raw.astype(np.float32) / 255.0},
        features=datasets.Features({"clip": datasets.Array4D((T, 1, H, W), "float32")}),
    )
    check_clips(load(float_source), raw / 255.0)
    grey_source = datasets.Dataset.from_dict(
        {"clip": raw[:, :, 0]}, features=datasets.Features({"clip": datasets.Array3D((T, H, W), "uint8")})
    )  # (N, T, H, W) uint8: read back as int64 by the numpy formatter
    check_clips(load(grey_source), raw / 255.0)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_lists_of_pil_images(mode):
    channels = 1 if mode == "L" else 3
    raw = videos(channels)
    frames = raw[:, :, 0] if mode == "L" else raw.transpose(0, 1, 3, 4, 2)
    images = [[Image.fromarray(frame, mode=mode) for frame in video] for video in frames]
    source = datasets.Dataset.from_dict({"clip": images})
    assert "Image" in str(source.features["clip"])
    ds = load(source)
    assert ds["train"][0]["inputs"].shape == (2, channels, H, W)
    check_clips(ds, raw / 255.0)
    check_clips(load(source, layout="TCHW"), raw / 255.0)  # a layout does not apply to images: still detected


def test_ambiguous_and_wrong_shapes_name_the_column():
    square = np.zeros((N, T, 4, 6, 4), dtype=np.uint8)  # axes 1 and 3 both 4 long
    with pytest.raises(ValueError, match=r"column 'clip': cannot tell the layout .* pass layout='TCHW'"):
        load(datasets.Dataset.from_dict({"clip": square}))
    check_clips(load(datasets.Dataset.from_dict({"clip": square}), layout="TCHW"), square.astype(np.float32))
    flat = datasets.Dataset.from_dict({"clip": np.zeros((N, T, 3), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"column 'clip': expected one video per example with 3 axes"):
        load(flat)
    with pytest.raises(ValueError, match=r"column 'clip' holds Value\('string'\); expected one video per example"):
        load(datasets.Dataset.from_dict({"clip": ["a.mp4"] * N}))
    with pytest.raises(ValueError, match=r"column 'clip'.*layout TCHW \(4 axes\), got shape \(5, 8, 12\)"):
        load(datasets.Dataset.from_dict({"clip": videos(1)[:, :, 0]}), layout="TCHW")
    with pytest.raises(ValueError, match="layout must be None"):
        load(datasets.Dataset.from_dict({"clip": videos(1)}), layout="CHW")
