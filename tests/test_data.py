"""unistd_hf.data: the registry, the synthetic tasks, the real-format loaders on files written here, bad files."""

import gzip
import hashlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from unistd_hf.configuration_unistd import TaskSpec
from unistd_hf.data import get_task, list_tasks, load_task, spec_for, synthetic
from unistd_hf.metrics import copy_last_frame_baseline, mse

SYNTHETIC = ["moving_digits", "city_traffic", "rain_nowcast", "robot_shapes"]
SMALL = {"num_train": 6, "num_validation": 3, "num_test": 4}

# Copy-last-frame baseline MSE per pixel on the test split: above the floor (the task is not trivial) and
# below the ceiling (the future follows from the past; persistence already explains most of it).
BASELINE_BOUNDS = {
    "moving_digits": (0.04, 0.12),  # two digits move away from where they were
    "city_traffic": (0.001, 0.005),  # counting noise + daily/event changes over 30 minutes
    "rain_nowcast": (0.005, 0.03),  # advection 0.3-1.5 px/frame, growth and decay
    "robot_shapes": (0.01, 0.06),  # moving shapes, arm and camera drift
}


@pytest.fixture(scope="module")
def baseline_sets(tmp_path_factory):
    """Each synthetic task with a 48-clip test split, generated once for the module."""
    cache = tmp_path_factory.mktemp("synthetic_cache")
    return {
        name: load_task(name, seed=0, cache_dir=str(cache), num_train=4, num_validation=4, num_test=48)
        for name in SYNTHETIC
    }


def _digests(split: datasets.Dataset) -> set[str]:
    split = split.with_format("numpy")
    return {hashlib.sha1(row["inputs"].tobytes() + row["targets"].tobytes()).hexdigest() for row in split}


# ---------------------------------------------------------------------------------------------------------
# registry


def test_registry_lists_and_describes_tasks():
    assert set(SYNTHETIC + ["mmnist", "taxibj", "kth", "array", "hf_video"]) <= set(list_tasks())
    assert set(list_tasks(synthetic=True)) == set(SYNTHETIC)
    info = get_task("rain_nowcast")
    assert info.synthetic and info.discipline == "weather" and "csi" in info.metrics
    assert info.csi_thresholds == synthetic.RAIN_CSI_THRESHOLDS
    expected = {
        "moving_digits": (10, 10, 1, 64),
        "city_traffic": (4, 4, 2, 32),
        "rain_nowcast": (13, 12, 1, 64),
        "robot_shapes": (2, 10, 3, 64),
    }
    for name, (t_in, t_out, c, size) in expected.items():
        spec = get_task(name).spec
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert (spec.in_frames, spec.out_frames, spec.channels, spec.height, spec.width) == (t_in, t_out, c, size, size)
        assert spec.num_downsample == 2


def test_unknown_task_and_option_raise():
    with pytest.raises(ValueError, match="registered tasks: .*moving_digits"):
        load_task("moving_mnist_v2")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="does not accept option.*num_frames.*accepted options"):
        load_task("city_traffic", num_frames=3)
    with pytest.raises(ValueError, match="num_train must be a positive int"):
        load_task("city_traffic", num_train=0)


# ---------------------------------------------------------------------------------------------------------
# synthetic tasks


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_shapes_dtypes_ranges(name, baseline_sets):
    ds, spec = baseline_sets[name], get_task(name).spec
    assert list(ds) == ["train", "validation", "test"]
    assert [len(ds[s]) for s in ds] == [4, 4, 48]
    assert ds["train"].features["inputs"].dtype == "float16"  # stored compactly
    batch = ds["test"][:8]
    assert batch["inputs"].dtype == torch.float32  # read back as float32 in [0, 1]
    assert batch["inputs"].shape == (8, *spec.input_shape)
    assert batch["targets"].shape == (8, *spec.target_shape)
    for column in ("inputs", "targets"):
        assert batch[column].min() >= 0 and batch[column].max() <= 1
    assert batch["targets"].std() > 0.01  # not blank
    assert spec_for(name, ds) == spec


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_copy_last_frame_baseline_is_between_floor_and_ceiling(name, baseline_sets):
    test = baseline_sets[name]["test"][:]
    spec = get_task(name).spec
    error = mse(copy_last_frame_baseline(test["inputs"], spec.out_frames), test["targets"]).item()
    floor, ceiling = BASELINE_BOUNDS[name]
    assert floor < error < ceiling, f"{name}: copy-last-frame MSE {error:.5f} outside ({floor}, {ceiling})"


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_is_deterministic_and_splits_are_disjoint(name, tmp_path):
    first = load_task(name, seed=3, cache_dir=str(tmp_path / "a"), **SMALL)
    again = load_task(name, seed=3, cache_dir=str(tmp_path / "b"), **SMALL)
    other = load_task(name, seed=4, cache_dir=str(tmp_path / "c"), **SMALL)
    for split in first:
        assert torch.equal(first[split][:]["inputs"], again[split][:]["inputs"])
        assert torch.equal(first[split][:]["targets"], again[split][:]["targets"])
    assert not torch.equal(first["train"][:]["inputs"], other["train"][:]["inputs"])
    digests = {split: _digests(first[split]) for split in first}
    assert sum(len(d) for d in digests.values()) == sum(SMALL.values())  # no duplicate clip anywhere
    assert not (digests["train"] & digests["validation"] or digests["train"] & digests["test"])


def test_synthetic_cache_is_reused(tmp_path, monkeypatch):
    first = load_task("city_traffic", seed=1, cache_dir=str(tmp_path), **SMALL)
    files = {split: first[split].cache_files for split in first}

    def must_not_run(*args, **kwargs):
        raise AssertionError("clips were generated again instead of read from the cache")

    monkeypatch.setattr(synthetic, "_simulator", must_not_run)
    second = load_task("city_traffic", seed=1, cache_dir=str(tmp_path), **SMALL)
    assert {split: second[split].cache_files for split in second} == files
    assert torch.equal(first["test"][:]["inputs"], second["test"][:]["inputs"])
    with pytest.raises(datasets.exceptions.DatasetGenerationError):  # a new seed is a new build: must_not_run runs
        load_task("city_traffic", seed=2, cache_dir=str(tmp_path), **SMALL)


def test_rain_reaches_the_csi_levels(baseline_sets):
    targets = baseline_sets["rain_nowcast"]["test"][:]["targets"]
    for threshold in synthetic.RAIN_CSI_THRESHOLDS[:5]:
        assert (targets >= threshold).any(), threshold


def _write_idx(path, images: np.ndarray, magic: int = 2051, compress: bool = True) -> None:
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *images.shape))
    data = header + images.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_moving_digits_reads_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)), compress=False)
    ds = load_task("moving_digits", mnist_path=str(tmp_path), cache_dir=str(tmp_path / "cache"), **SMALL)
    assert ds["train"][0]["inputs"].shape == (10, 1, 64, 64)
    _write_idx(tmp_path / "bad.gz", rng.integers(0, 256, (2, 28, 28)), magic=2049)
    with pytest.raises(ValueError, match="magic number 2051"):
        load_task("moving_digits", mnist_path=str(tmp_path / "bad.gz"), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------
# Moving MNIST files


@pytest.fixture
def mmnist_dir(tmp_path):
    folder = tmp_path / "moving_mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "mnist_test_seq.npy", rng.integers(0, 256, (20, 5, 64, 64), dtype=np.uint8))
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    return tmp_path


def test_mmnist_loader(mmnist_dir, tmp_path):
    ds = load_task("mmnist", data_dir=str(mmnist_dir), num_train=6, num_validation=3, cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [6, 3, 5]
    raw = np.load(mmnist_dir / "moving_mnist" / "mnist_test_seq.npy")
    clip = ds["test"][2]
    np.testing.assert_allclose(clip["inputs"][:, 0].numpy(), raw[:10, 2] / 255.0, atol=1e-3)
    np.testing.assert_allclose(clip["targets"][:, 0].numpy(), raw[10:, 2] / 255.0, atol=1e-3)
    assert ds["train"][:]["inputs"].shape == (6, 10, 1, 64, 64)
    assert not _digests(ds["train"]) & _digests(ds["validation"])


def test_mmnist_bad_files(mmnist_dir, tmp_path):
    folder = mmnist_dir / "moving_mnist"
    with pytest.raises(ValueError, match="data_dir"):
        load_task("mmnist")
    np.save(folder / "mnist_test_seq.npy", np.zeros((10, 5, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mnist_test_seq.npy: expected an array of shape .*\(20, \*, 64, 64\)"):
        load_task("mmnist", data_dir=str(mmnist_dir), cache_dir=str(tmp_path / "c"))
    np.save(folder / "mnist_test_seq.npy", np.zeros((20, 5, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="mnist_test_seq.npy: expected uint8"):
        load_task("mmnist", data_dir=str(mmnist_dir), cache_dir=str(tmp_path / "c"))
    (folder / "train-images-idx3-ubyte.gz").unlink()
    np.save(folder / "mnist_test_seq.npy", np.zeros((20, 5, 64, 64), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_task("mmnist", data_dir=str(mmnist_dir), cache_dir=str(tmp_path / "c"))
    (folder / "mnist_test_seq.npy").unlink()
    with pytest.raises(FileNotFoundError, match="mnist_test_seq.npy"):
        load_task("mmnist", data_dir=str(mmnist_dir), cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------
# TaxiBJ files


def _write_taxibj(folder, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "X_train": rng.uniform(-1, 1, (10, 4, 2, 32, 32)),
        "Y_train": rng.uniform(-1, 1, (10, 4, 2, 32, 32)),
        "X_test": rng.uniform(-1, 1, (3, 4, 2, 32, 32)),
        "Y_test": rng.uniform(-1, 1, (3, 4, 2, 32, 32)),
    }
    arrays.update(overrides)
    (folder / "taxibj").mkdir(exist_ok=True)
    np.savez(folder / "taxibj" / "dataset.npz", **arrays)
    return arrays


def test_taxibj_loader(tmp_path):
    arrays = _write_taxibj(tmp_path)
    ds = load_task("taxibj", data_dir=str(tmp_path), validation_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [8, 2, 3]
    np.testing.assert_allclose(ds["test"][1]["targets"].numpy(), (arrays["Y_test"][1] + 1) / 2, atol=1e-3)
    np.testing.assert_allclose(ds["validation"][0]["inputs"].numpy(), (arrays["X_train"][8] + 1) / 2, atol=1e-3)
    assert spec_for("taxibj", ds) == get_task("taxibj").spec


@pytest.mark.parametrize(
    "override, message",
    [
        ({"X_train": np.zeros((10, 4, 3, 32, 32))}, r"X_train.*expected an array of shape .*\(\*, \*, 2, 32, 32\)"),
        ({"X_test": np.zeros((3, 4, 2, 32, 32), dtype=np.int16)}, "X_test.*expected float"),
        ({"Y_test": np.full((3, 4, 2, 32, 32), np.nan)}, "Y_test.*NaN"),
        ({"Y_train": np.full((10, 4, 2, 32, 32), 3.0)}, r"Y_train.*expected values in \[-1, 1\]"),
    ],
    ids=["shape", "dtype", "nan", "range"],
)
def test_taxibj_bad_files(tmp_path, override, message):
    _write_taxibj(tmp_path, **override)
    with pytest.raises(ValueError, match=message):
        load_task("taxibj", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))


def test_taxibj_missing_file_or_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="taxibj/dataset.npz"):
        load_task("taxibj", data_dir=str(tmp_path))
    (tmp_path / "taxibj").mkdir()
    np.savez(tmp_path / "taxibj" / "dataset.npz", X_train=np.zeros((2, 4, 2, 32, 32)))
    with pytest.raises(ValueError, match="missing.*Y_train"):
        load_task("taxibj", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# KTH folders


def _write_kth(root, sequences):
    """sequences: (action, person, number of frames); frame i of a sequence has gray level 10 * i."""
    for action, person, count in sequences:
        folder = root / "kth" / action / f"person{person}_{action}_d1_uncomp"
        folder.mkdir(parents=True)
        for i in range(1, count + 1):
            Image.fromarray(np.full((24, 32, 3), 10 * i, dtype=np.uint8)).save(folder / f"image_{i:04d}.png")


def test_kth_loader(tmp_path):
    _write_kth(tmp_path, [("boxing", "01", 12), ("jogging", "02", 8), ("walking", "16", 8), ("running", "17", 7)])
    ds = load_task(
        "kth", data_dir=str(tmp_path), in_frames=2, out_frames=3, image_size=16, cache_dir=str(tmp_path / "c")
    )
    # windows of 5: boxing every 5 frames (starts 0, 5), jogging/running every 3 (starts 0, 3)
    assert [len(ds[s]) for s in ds] == [4, 1, 1]
    clip = ds["train"][1]
    assert clip["inputs"].shape == (2, 1, 16, 16) and clip["targets"].shape == (3, 1, 16, 16)
    np.testing.assert_allclose(clip["inputs"][:, 0, 0, 0].numpy(), [60 / 255, 70 / 255], atol=1e-3)  # frames 6, 7
    strided = load_task(
        "kth",
        data_dir=str(tmp_path),
        in_frames=2,
        out_frames=2,
        image_size=16,
        frame_stride=2,
        window_stride=1,
        cache_dir=str(tmp_path / "c"),
    )
    np.testing.assert_allclose(strided["train"][0]["inputs"][:, 0, 0, 0].numpy(), [10 / 255, 30 / 255], atol=1e-3)
    assert spec_for("kth", strided).in_frames == 2


def test_kth_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="kth"):
        load_task("kth", data_dir=str(tmp_path))
    _write_kth(tmp_path, [("boxing", "01", 3)])
    with pytest.raises(ValueError, match="no train clip of 20 frames"):  # the paper's 10 -> 10 by default
        load_task("kth", data_dir=str(tmp_path))
    (tmp_path / "kth" / "boxing" / "someone_boxing").mkdir()
    with pytest.raises(ValueError, match="named like person01_boxing_d1_uncomp"):
        load_task("kth", data_dir=str(tmp_path))


def test_kth_unreadable_image(tmp_path):
    _write_kth(tmp_path, [("boxing", "01", 4), ("boxing", "16", 4), ("boxing", "20", 4)])
    (tmp_path / "kth" / "boxing" / "person01_boxing_d1_uncomp" / "image_0002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*image_0002.png"):
        load_task("kth", data_dir=str(tmp_path), in_frames=2, out_frames=2, image_size=8, cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------
# generic arrays and datasets


def test_array_loader_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (10, 7, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "clips.npy", clips)
    ds = load_task("array", path=str(tmp_path / "clips.npy"), in_frames=3, out_frames=3, cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [8, 1, 1]
    found = torch.cat([ds[s][:]["inputs"] for s in ds]).numpy()
    np.testing.assert_allclose(
        np.sort(found.reshape(10, -1), axis=0), np.sort(clips[:, :3].reshape(10, -1) / 255.0, axis=0), atol=2e-3
    )
    assert spec_for("array", ds) == TaskSpec("array", 3, 3, 1, 8, 8, discipline="generic")

    fields = rng.uniform(-5, 5, (6, 9, 8, 8)).astype(np.float32)  # (N, T, H, W): one channel
    np.savez(tmp_path / "fields.npz", a=fields, b=fields[:1])
    ds = load_task(
        "array",
        path=str(tmp_path / "fields.npz"),
        key="a",
        in_frames=2,
        out_frames=2,
        value_range=(-5, 5),
        window_stride=2,
        validation_fraction=0.2,
        test_fraction=0.2,
        cache_dir=str(tmp_path / "c"),
    )
    assert ds["train"][0]["inputs"].shape == (2, 1, 8, 8)
    assert [len(ds[s]) for s in ds] == [4 * 3, 1 * 3, 1 * 3]  # 3 windows (starts 0, 2, 4) per sequence
    assert ds["train"][:]["inputs"].min() >= 0 and ds["train"][:]["inputs"].max() <= 1


@pytest.mark.parametrize(
    "array, options, error, message",
    [
        (np.zeros((10, 6, 8, 8, 1, 1)), {}, ValueError, r"expected an array of shape \(N, T, C, H, W\)"),
        (np.zeros((10, 4, 1, 8, 8)), {}, ValueError, "at least in_frames \\+ out_frames = 6 frames"),
        (np.zeros((10, 6, 1, 8, 8), dtype=bool), {}, ValueError, "expected numeric"),
        (np.full((10, 6, 1, 8, 8), np.nan, dtype=np.float32), {}, ValueError, "NaN"),
        (np.full((10, 6, 1, 8, 8), 7.0), {}, ValueError, r"expected float values in \[0, 1\]"),
        (np.zeros((10, 6, 1, 8, 8), dtype=np.int32), {}, ValueError, "need value_range"),
    ],
    ids=["shape", "frames", "dtype", "nan", "range", "int"],
)
def test_array_bad_files(tmp_path, array, options, error, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(error, match=message):
        load_task("array", path=str(tmp_path / "bad.npy"), in_frames=3, out_frames=3, **options)


def test_array_missing_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_task("array", path=str(tmp_path / "missing.npy"), in_frames=1, out_frames=1)
    np.savez(tmp_path / "two.npz", a=np.zeros((5, 2, 1, 4, 4)), b=np.zeros((5, 2, 1, 4, 4)))
    with pytest.raises(ValueError, match="choose one with key="):
        load_task("array", path=str(tmp_path / "two.npz"), in_frames=1, out_frames=1)
    with pytest.raises(ValueError, match="needs path=, in_frames= and out_frames="):
        load_task("array", path=str(tmp_path / "two.npz"))


def test_hf_video_loader(tmp_path):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (12, 6, 8, 8, 3), dtype=np.uint8)  # (N, T, H, W, C)
    source = datasets.Dataset.from_dict({"clip": videos.tolist(), "label": list(range(12))})
    ds = load_task(
        "hf_video",
        dataset=source,
        column="clip",
        layout="THWC",
        in_frames=2,
        out_frames=3,
        value_range=(0, 255),
        cache_dir=str(tmp_path / "c"),
    )
    assert [len(ds[s]) for s in ds] == [10, 1, 1]
    row = ds["test"][0]
    assert row["inputs"].shape == (2, 3, 8, 8) and row["targets"].shape == (3, 3, 8, 8)
    assert ds["train"].column_names == ["inputs", "targets"]
    expected = videos[:, :2].transpose(0, 1, 4, 2, 3) / 255.0  # (N, 2, C, H, W)
    assert any(np.allclose(row["inputs"].numpy(), e, atol=2e-3) for e in expected)
    with pytest.raises(ValueError, match="int64 values need value_range"):
        load_task("hf_video", dataset=source, column="clip", layout="THWC", in_frames=2, out_frames=3)
    # the source's own splits are kept
    split_source = datasets.DatasetDict({"train": source.select(range(8)), "test": source.select(range(8, 12))})
    ds = load_task(
        "hf_video", dataset=split_source, column="clip", layout="THWC", in_frames=2, out_frames=3, value_range=(0, 255)
    )
    assert len(ds["test"]) == 4 and len(ds["train"]) + len(ds["validation"]) == 8


def test_hf_video_errors():
    source = datasets.Dataset.from_dict({"clip": np.zeros((10, 3, 1, 4, 4), dtype=np.float32).tolist()})
    with pytest.raises(ValueError, match="no column 'video'"):
        load_task("hf_video", dataset=source, in_frames=1, out_frames=1)
    with pytest.raises(ValueError, match="expected at least 5 frames"):
        load_task("hf_video", dataset=source, column="clip", in_frames=2, out_frames=3)
    bad = datasets.Dataset.from_dict({"clip": np.full((10, 3, 1, 4, 4), 2.0, dtype=np.float32).tolist()})
    with pytest.raises(ValueError, match=r"expected float values in \[0, 1\]"):
        load_task("hf_video", dataset=bad, column="clip", in_frames=1, out_frames=1)
