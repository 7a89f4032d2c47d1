"""The paper's data sets: each loader on fixture files written here in the published format, bad files, memory.

Fixtures keep the published names, dtypes, layouts and value ranges; only their sizes are small (fewer frames,
events, days or pixels). Pixel values encode (sequence, frame), so a test can tell which frame of which sequence
a clip holds: values, frame order, split sizes and clip boundaries are all checked against that code.
"""

import csv
import tracemalloc

import datasets
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from unistd_hf.configuration_unistd import TaskSpec
from unistd_hf.data import PAPER_TASKS, get_task, list_tasks, load_task, spec_for
from unistd_hf.data.paper_tasks import ENSO_SST_RANGE
from unistd_hf.metrics import nino34_index, nino34_scores

ATOL = 1e-3  # float16 storage; a neighbouring uint8 level is 1/255 = 0.0039 away


def _frames(ds, split, index, column="inputs"):
    return ds[split][index][column].numpy()


def _code(sequence: int, frame: int) -> int:
    """The uint8 level of frame `frame` of sequence `sequence` in every fixture."""
    return (sequence * 37 + frame * 5) % 256


# ---------------------------------------------------------------------------------------------------------
# the table


def test_paper_tasks_match_tables_1_and_8():
    table = {  # name: (in, out, C, H, W, n) from the paper's Table 1 (shapes) and Table 8 (n)
        "kitticaltech": (10, 10, 3, 128, 160, 3), "bair": (2, 10, 3, 64, 64, 2), "cityscapes": (2, 5, 3, 128, 128, 3),
        "taxibj": (4, 4, 2, 32, 32, 2), "sevir": (13, 12, 1, 384, 384, 4), "mmnist": (10, 10, 1, 64, 64, 3),
        "kth": (10, 10, 1, 128, 128, 3), "human": (4, 4, 3, 256, 256, 4), "traffic4cast": (9, 3, 8, 128, 112, 3),
        "enso": (12, 14, 1, 24, 48, 1),
    }
    tokens = {"taxibj": 64, "traffic4cast": 224, "mmnist": 64, "bair": 256, "human": 256, "kth": 256,
              "cityscapes": 256, "kitticaltech": 320, "sevir": 576, "enso": 288}  # Table 8's N
    assert set(PAPER_TASKS) == set(table) and set(table) <= set(list_tasks())
    for name, (t_in, t_out, c, h, w, n) in table.items():
        spec = PAPER_TASKS[name]
        assert (spec.in_frames, spec.out_frames, spec.channels, spec.height, spec.width, spec.num_downsample) == (
            t_in, t_out, c, h, w, n)
        assert spec.token_grid[0] * spec.token_grid[1] == tokens[name]
        assert get_task(name).spec == spec


# ---------------------------------------------------------------------------------------------------------
# KITTI: hickle files (HDF5) as PredNet wrote them


def _hickle3(path, array):
    """hickle 2/3 layout: the object is the dataset /data_0 (a list of str: one dataset of byte strings)."""
    with h5py.File(path, "w") as h5:
        h5.attrs["CLASS"], h5.attrs["VERSION"] = b"hickle", b"3"
        h5.create_dataset("data_0", data=array).attrs["type"] = [b"ndarray" if array.dtype != object else b"list"]


def _hickle5_strings(path, strings):
    """hickle 4/5 layout of a list of str: group /data with one (1, n) |S1 dataset per item."""
    with h5py.File(path, "w") as h5:
        h5.attrs["HICKLE_VERSION"] = "5.0.2"
        group = h5.create_group("data")
        group.attrs["base_type"] = b"list"
        for i, text in enumerate(strings):
            raw = np.frombuffer(text.encode(), dtype="S1").reshape(1, -1)
            group.create_dataset(f"data{i}", data=raw).attrs["str_type"] = b"str"


def _write_kitti(root, drives, H=8, W=10, layout=3):
    """drives: {split: [frames per drive]}; frame f of drive d (numbered over all splits) has level _code(d, f)."""
    folder = root / "kitti_hkl"
    folder.mkdir(parents=True)
    number = 0
    for split, lengths in drives.items():
        frames, sources = [], []
        for length in lengths:
            for f in range(length):
                frame = np.full((H, W, 3), _code(number, f), dtype=np.uint8)
                frame[0, 0] = [1, 2, 3]  # channel order check
                frames.append(frame)
                sources.append(f"city-2011_09_26_drive_{number:04d}_sync")
            number += 1
        _hickle3(folder / f"X_{split}.hkl", np.stack(frames))
        if layout == 3:
            _hickle3(folder / f"sources_{split}.hkl", np.array([s.encode() for s in sources]))
        else:
            _hickle5_strings(folder / f"sources_{split}.hkl", sources)


@pytest.mark.parametrize("layout", [3, 5])
def test_kitticaltech_loader(tmp_path, layout):
    _write_kitti(tmp_path, {"train": [25, 13], "val": [11], "test": [12, 5]}, layout=layout)
    ds = load_task("kitticaltech", data_dir=str(tmp_path), in_frames=4, out_frames=2, cache_dir=str(tmp_path / "c"))
    # OpenSTL: non-overlapping clips aligned to the drive's end: 25 -> starts 1, 7, 13, 19; 13 -> 1, 7; 11 -> 5;
    # 12 -> 0, 6; 5 -> none
    assert [len(ds[s]) for s in ds] == [6, 1, 2]
    clip = ds["train"][0]
    assert clip["inputs"].shape == (4, 3, 8, 10) and clip["targets"].shape == (2, 3, 8, 10)
    levels = [_frames(ds, "train", i)[:, 0, 1, 1] for i in range(6)]
    expected = [[_code(0, s + k) / 255 for k in range(4)] for s in (1, 7, 13, 19)]
    expected += [[_code(1, s + k) / 255 for k in range(4)] for s in (1, 7)]
    np.testing.assert_allclose(levels, expected, atol=ATOL)  # frame order, drive boundaries
    np.testing.assert_allclose(_frames(ds, "train", 0)[0, :, 0, 0], [1 / 255, 2 / 255, 3 / 255], atol=ATOL)  # RGB
    np.testing.assert_allclose(_frames(ds, "test", 0, "targets")[:, 0, 1, 1], [_code(3, 4) / 255, _code(3, 5) / 255],
                               atol=ATOL)
    expected_spec = TaskSpec("kitticaltech", 4, 2, 3, 8, 10, num_downsample=1, value_range=(0, 255),
                             discipline="driving")
    assert spec_for("kitticaltech", ds) == expected_spec
    strided = load_task("kitticaltech", data_dir=str(tmp_path), in_frames=10, out_frames=1, window_stride=3,
                        cache_dir=str(tmp_path / "c"))  # OpenSTL's 10 -> 1 with overlapping clips
    assert len(strided["train"]) == len(range(0, 25 - 11 + 1, 3)) + len(range(0, 13 - 11 + 1, 3))


def test_kitticaltech_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="kitti_hkl"):
        load_task("kitticaltech", data_dir=str(tmp_path))
    _write_kitti(tmp_path, {"train": [12], "val": [12], "test": [12]})
    small = {"in_frames": 4, "out_frames": 2}
    folder = tmp_path / "kitti_hkl"
    (folder / "sources_test.hkl").unlink()
    with pytest.raises(FileNotFoundError, match="sources_test.hkl"):
        load_task("kitticaltech", data_dir=str(tmp_path), in_frames=4, out_frames=2)
    _hickle3(folder / "sources_test.hkl", np.array([b"a"] * 11))
    with pytest.raises(ValueError, match=r"sources_test.hkl: expected one source per frame .*\(12\), got 11"):
        load_task("kitticaltech", data_dir=str(tmp_path), **small)
    _hickle3(folder / "X_test.hkl", np.zeros((11, 8, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="X_test.hkl: expected uint8"):
        load_task("kitticaltech", data_dir=str(tmp_path), **small)
    _hickle3(folder / "X_test.hkl", np.zeros((11, 8, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"X_test.hkl: expected an array of shape \(frames, height, width, RGB\)"):
        load_task("kitticaltech", data_dir=str(tmp_path), **small)
    data = (folder / "X_val.hkl").read_bytes()
    (folder / "X_val.hkl").write_bytes(data[: len(data) // 3])  # truncated HDF5
    with pytest.raises(ValueError, match="X_val.hkl: expected a readable HDF5 file"):
        load_task("kitticaltech", data_dir=str(tmp_path), **small)


# ---------------------------------------------------------------------------------------------------------
# BAIR: softmotion30_44k TFRecords


def _write_bair(root, files, frames=14):
    """files: {split: [records per file]}; frame f of trajectory t (numbered over all files) has level _code(t, f)."""
    import tfrecord

    number = 0
    for split, records in files.items():
        folder = root / "softmotion30_44k" / split
        folder.mkdir(parents=True)
        for k, count in enumerate(records):
            writer = tfrecord.TFRecordWriter(str(folder / f"traj_{k * 256}_to_{k * 256 + 255}.tfrecords"))
            for _ in range(count):
                example = {}
                for f in range(frames):
                    image = np.full((64, 64, 3), _code(number, f), dtype=np.uint8)
                    image[0, 0] = [1, 2, 3]
                    example[f"{f}/image_aux1/encoded"] = (image.tobytes(), "byte")
                    example[f"{f}/image_main/encoded"] = (np.zeros(64 * 64 * 3, np.uint8).tobytes(), "byte")
                    example[f"{f}/action"] = ([0.1, 0.2, 0.3, 0.4], "float")
                    example[f"{f}/endeffector_pos"] = ([0.0, 0.0, 0.0], "float")
                writer.write(example)
                number += 1
            writer.close()


def test_bair_loader(tmp_path):
    _write_bair(tmp_path, {"train": [2, 1, 2], "test": [2]})
    ds = load_task("bair", data_dir=str(tmp_path), validation_fraction=0.34, cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [3, 2, 2]  # one clip per trajectory; the last train file validates
    clip = ds["validation"][1]
    assert clip["inputs"].shape == (2, 3, 64, 64) and clip["targets"].shape == (10, 3, 64, 64)
    np.testing.assert_allclose(clip["inputs"][:, 0, 5, 5].numpy(), [_code(4, 0) / 255, _code(4, 1) / 255], atol=ATOL)
    np.testing.assert_allclose(clip["targets"][:, 2, 5, 5].numpy(), [_code(4, f) / 255 for f in range(2, 12)],
                               atol=ATOL)
    np.testing.assert_allclose(clip["inputs"][0, :, 0, 0].numpy(), [1 / 255, 2 / 255, 3 / 255], atol=ATOL)
    assert spec_for("bair", ds) == PAPER_TASKS["bair"]
    windows = load_task("bair", data_dir=str(tmp_path), validation_fraction=0.34, window_stride=1, scale=2,
                        cache_dir=str(tmp_path / "c"))
    assert len(windows["test"]) == 2 * (14 - 12 + 1) and windows["test"][0]["inputs"].shape == (2, 3, 32, 32)
    np.testing.assert_allclose(windows["test"][1]["inputs"][:, 0, 4, 4].numpy(),  # trajectory 5, start 1
                               [_code(5, 1) / 255, _code(5, 2) / 255], atol=ATOL)


def test_bair_bad_files(tmp_path):
    (tmp_path / "softmotion30_44k" / "train").mkdir(parents=True)
    (tmp_path / "softmotion30_44k" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"expected \*.tfrecords files in .*train"):
        load_task("bair", data_dir=str(tmp_path))
    _write_bair(tmp_path / "short", {"train": [1, 1], "test": [1]}, frames=5)
    with pytest.raises(ValueError, match="record 0: expected at least 12 frames, got 5"):
        load_task("bair", data_dir=str(tmp_path / "short"), cache_dir=str(tmp_path / "c"))
    _write_bair(tmp_path / "cut", {"train": [1, 1], "test": [2]})
    path = next((tmp_path / "cut" / "softmotion30_44k" / "test").glob("*.tfrecords"))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"{path.name}: expected TFRecord framing, record 1 is truncated"):
        load_task("bair", data_dir=str(tmp_path / "cut"), cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------
# Human3.6M: OpenSTL's images and list files


def _write_human(root, videos, frames=60, size=16):
    """videos: {name: sequence number}; frame j of a video has level _code(sequence, j) (flat: JPEG keeps it)."""
    folder = root / "human" / "images"
    folder.mkdir(parents=True)
    for name, sequence in videos.items():
        for j in range(1, frames + 1):
            Image.fromarray(np.full((size, size, 3), _code(sequence, j), np.uint8)).save(folder / f"{name}_{j:06d}.jpg")


def _decoded(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def test_human_loader(tmp_path):
    videos = {"S1_Walking.54138969": 0, "S5_Eating.55011271": 1, "S9_Phoning.60457274": 2, "S11_Walking.58860488": 3}
    _write_human(tmp_path, videos)
    root = tmp_path / "human"
    (root / "train.txt").write_text("images/S1_Walking.54138969_,1\nimages/S1_Walking.54138969_,11\n"
                                    "images/S5_Eating.55011271_,3\n\n")
    (root / "test.txt").write_text("images/S11_Walking.58860488_,5\nimages/S9_Phoning.60457274_,1\n")
    ds = load_task("human", data_dir=str(tmp_path), image_size=16, validation_fraction=0.5,
                   cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [2, 1, 2]  # S5 (last video of train.txt, sorted) validates
    clip = ds["train"][1]
    assert clip["inputs"].shape == (4, 3, 16, 16) and clip["targets"].shape == (4, 3, 16, 16)
    numbers = range(11, 11 + 8 * 5, 5)  # every 5th frame from 11
    expected = np.stack([_decoded(root / "images" / f"S1_Walking.54138969_{j:06d}.jpg") for j in numbers])
    frames = torch.cat([clip["inputs"], clip["targets"]]).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(frames, expected, atol=ATOL)
    np.testing.assert_allclose(frames[:, 0, 0, 0], [_code(0, j) / 255 for j in numbers], atol=3 / 255)
    resized = load_task("human", data_dir=str(tmp_path), image_size=8, validation_fraction=0.5,
                        cache_dir=str(tmp_path / "c"))
    assert resized["test"][0]["inputs"].shape == (4, 3, 8, 8)


def test_human_bad_files(tmp_path):
    _write_human(tmp_path, {"S1_Walking.54138969": 0, "S5_Eating.55011271": 1}, frames=10)
    root = tmp_path / "human"
    (root / "train.txt").write_text("images/S1_Walking.54138969_,1\nimages/S5_Eating.55011271_,1\n")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        load_task("human", data_dir=str(tmp_path))
    (root / "test.txt").write_text("images/S1_Walking.54138969_ 1\n")
    with pytest.raises(ValueError, match=r"test.txt:1: expected '<frame prefix>,<first frame number>'"):
        load_task("human", data_dir=str(tmp_path))
    (root / "test.txt").write_text("images/S1_Walking.54138969_,1\n")  # 8 frames every 5th from 1: needs 36
    with pytest.raises(FileNotFoundError, match=r"S1_Walking.54138969_000011.jpg"):
        load_task("human", data_dir=str(tmp_path), image_size=16, cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------------------------------------
# Cityscapes: leftImg8bit_sequence


def _write_cityscapes(root, snippets, H=8, W=16):
    """snippets: {split: [(city, seq, [frame numbers])]}; frame f of snippet s (numbered) has level _code(s, f)."""
    base = root / "cityscapes" / "leftImg8bit_sequence"
    number = 0
    for split, items in snippets.items():
        for city, seq, frames in items:
            folder = base / split / city
            folder.mkdir(parents=True, exist_ok=True)
            for f in frames:
                image = np.full((H, W, 3), _code(number, f), np.uint8)
                image[0, 0] = [1, 2, 3]
                Image.fromarray(image).save(folder / f"{city}_{seq:06d}_{f:06d}_leftImg8bit.png")
            number += 1


def test_cityscapes_loader(tmp_path):
    _write_cityscapes(tmp_path, {
        "train": [("aachen", 0, range(0, 12)), ("bochum", 3, list(range(10, 16)) + list(range(40, 46)))],
        "val": [("frankfurt", 0, range(0, 12))],
        "test": [("berlin", 7, range(0, 12)), ("bonn", 1, range(5, 17))],
    })
    ds = load_task("cityscapes", data_dir=str(tmp_path), in_frames=2, out_frames=1, window_stride=4, image_size=8,
                   cache_dir=str(tmp_path / "c"))
    # aachen: starts 0, 4, 8; bochum: two snippets of 6 frames (gap 16..39): starts 0 and 0; test: one per snippet
    assert [len(ds[s]) for s in ds] == [5, 3, 2]
    levels = [_frames(ds, "train", i)[:, 0, 4, 4] for i in range(5)]
    expected = [[_code(0, s) / 255, _code(0, s + 1) / 255] for s in (0, 4, 8)]
    expected += [[_code(1, 10) / 255, _code(1, 11) / 255], [_code(1, 40) / 255, _code(1, 41) / 255]]
    np.testing.assert_allclose(levels, expected, atol=ATOL)
    np.testing.assert_allclose(_frames(ds, "test", 1, "targets")[0, :, 4, 4], [_code(4, 7) / 255] * 3, atol=ATOL)
    assert ds["train"][0]["inputs"].shape == (2, 3, 8, 8)


def test_cityscapes_empty_folder(tmp_path):
    _write_cityscapes(tmp_path, {"train": [("aachen", 0, range(0, 8))], "val": [("ulm", 0, range(0, 8))]})
    (tmp_path / "cityscapes" / "leftImg8bit_sequence" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no <city>/<city>_<seq>_<frame>_leftImg8bit.png files under .*test"):
        load_task("cityscapes", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# SEVIR: CATALOG.csv + data/vil/<year>/*.h5


CATALOG_COLUMNS = ["id", "file_name", "file_index", "img_type", "time_utc", "minute_offsets", "episode_id", "event_id",
                   "event_type", "llcrnrlat", "llcrnrlon", "urcrnrlat", "urcrnrlon", "proj", "size_x", "size_y",
                   "height_m", "width_m", "data_min", "data_max", "pct_missing"]


def _sevir_event(number, size, frames=49):
    vil = np.empty((size, size, frames), np.uint8)
    vil[:] = np.array([_code(number, t) for t in range(frames)], np.uint8)
    vil[0, 1, :] = 7  # (row 0, column 1): orientation check
    return vil


def _write_sevir(root, files, size=16, dtype=np.uint8):
    """files: {file_name: [event times]}; event e (numbered) is S<e> at file_index = position in its file."""
    base = root / "sevir"
    rows, number = [], 0
    for name, times in files.items():
        path = base / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        events = []
        for index, time in enumerate(times):
            events.append(_sevir_event(number, size))
            rows.append({"id": f"S{number}", "file_name": name, "file_index": index, "img_type": "vil",
                         "time_utc": time, "pct_missing": 0.0})
            rows.append({"id": f"S{number}", "file_name": name.replace("vil", "ir069"), "file_index": index,
                         "img_type": "ir069", "time_utc": time, "pct_missing": 0.0})
            number += 1
        with h5py.File(path, "w") as h5:
            h5.create_dataset("vil", data=np.stack(events).astype(dtype), chunks=(1, size, size, 49))
            h5.create_dataset("id", data=np.array([f"S{number - len(times) + i}".encode() for i in range(len(times))]))
    rows.append({"id": "S99", "file_name": next(iter(files)), "file_index": 0, "img_type": "vil",
                 "time_utc": "2018-03-01 00:00:00", "pct_missing": 2.5})  # incomplete: Earthformer drops it
    with open(base / "CATALOG.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CATALOG_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, 0) for c in CATALOG_COLUMNS})


SEVIR_FILES = {
    "vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5": ["2018-05-01 10:00:00", "2018-12-31 23:55:00"],
    "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5": ["2019-02-01 00:00:00", "2019-06-02 12:00:00"],
    "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0701_1231.h5": ["2019-07-04 00:00:00"],
}


def test_sevir_loader(tmp_path):
    _write_sevir(tmp_path, SEVIR_FILES)
    ds = load_task("sevir", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [6, 3, 6]  # 2 / 1 / 2 events, 3 windows each (25 frames every 12 of 49)
    clip = ds["train"][4]  # event 1, window 1
    assert clip["inputs"].shape == (13, 1, 16, 16) and clip["targets"].shape == (12, 1, 16, 16)
    np.testing.assert_allclose(clip["inputs"][:, 0, 5, 5].numpy(), [_code(1, 12 + t) / 255 for t in range(13)],
                               atol=ATOL)
    np.testing.assert_allclose(clip["targets"][:, 0, 5, 5].numpy(), [_code(1, 25 + t) / 255 for t in range(12)],
                               atol=ATOL)
    assert clip["inputs"][0, 0, 0, 1] == pytest.approx(7 / 255, abs=ATOL) and clip["inputs"][0, 0, 1, 0] != clip[
        "inputs"][0, 0, 0, 1]
    test_events = {round(float(ds["test"][i]["inputs"][0, 0, 5, 5]) * 255) for i in range(6)}
    assert test_events == {_code(3, 0), _code(3, 12), _code(3, 24), _code(4, 0), _code(4, 12), _code(4, 24)}
    assert get_task("sevir").csi_thresholds and "csi" in get_task("sevir").metrics


def test_sevir_streaming_matches_and_memory_is_bounded(tmp_path, monkeypatch):
    files = {"vil/2018/SEVIR_VIL_RANDOMEVENTS_2018_0101_0430.h5": [f"2018-01-{d:02d} 00:00:00" for d in range(1, 9)],
             "vil/2019/SEVIR_VIL_RANDOMEVENTS_2019_0101_0430.h5": ["2019-03-01 00:00:00", "2019-09-01 00:00:00"]}
    _write_sevir(tmp_path, files, size=64)
    from datasets import arrow_writer

    buffered, original = [], arrow_writer.ArrowWriter.write

    def write(self, example, *args, **kwargs):
        original(self, example, *args, **kwargs)
        buffered.append(len(self.current_examples))  # clips held in memory, not yet on disk

    monkeypatch.setattr(arrow_writer.ArrowWriter, "write", write)
    tracemalloc.start()
    ds = load_task("sevir", data_dir=str(tmp_path), max_chunk=2, cache_dir=str(tmp_path / "c"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ds["train"]) == 24 and max(buffered) <= 2  # 24 clips, never more than 2 waiting to be written
    all_clips = 24 * 25 * 64 * 64 * 4  # the training split as float32
    assert peak < all_clips / 4, f"peak {peak} bytes while building; the whole split is {all_clips} bytes"
    stream = load_task("sevir", data_dir=str(tmp_path), streaming=True)
    assert isinstance(stream, datasets.IterableDatasetDict) and list(stream) == ["train", "validation", "test"]
    streamed = list(stream["train"])
    assert len(streamed) == 24
    for i in (0, 5, 23):
        assert torch.equal(streamed[i]["inputs"], ds["train"][i]["inputs"])
        assert torch.equal(streamed[i]["targets"], ds["train"][i]["targets"])


def test_sevir_bad_files(tmp_path):
    _write_sevir(tmp_path, SEVIR_FILES, dtype=np.float32)
    with pytest.raises(ValueError, match="SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5: expected uint8 VIL"):
        load_task("sevir", data_dir=str(tmp_path))
    (tmp_path / "sevir" / "CATALOG.csv").write_text("id,file_name,img_type\nS0,a.h5,vil\n")
    with pytest.raises(ValueError, match=r"CATALOG.csv: expected columns .*missing \['file_index', 'time_utc'\]"):
        load_task("sevir", data_dir=str(tmp_path))
    other = tmp_path / "other"
    _write_sevir(other, SEVIR_FILES)
    with h5py.File(other / "sevir" / "data" / next(iter(SEVIR_FILES)), "a") as h5:
        h5["id"][1] = b"S7"  # the catalog and the file disagree
    with pytest.raises(ValueError, match="expected event S1 at file_index 1, found S7"):
        load_task("sevir", data_dir=str(other), cache_dir=str(tmp_path / "c"))
    (other / "sevir" / "data" / "vil" / "2019" / "SEVIR_VIL_STORMEVENTS_2019_0701_1231.h5").unlink()
    with pytest.raises(FileNotFoundError, match="2019_0701_1231.h5, found none"):
        load_task("sevir", data_dir=str(other))


# ---------------------------------------------------------------------------------------------------------
# Traffic4Cast 2021: per-day HDF5 files


def _write_t4c(root, cities, days, bins=24, H=10, W=9, channels=8):
    """Day d of city c (numbered) holds levels _code(c * 100 + d, t) + channel, with a spatial ramp."""
    for c, city in enumerate(cities):
        folder = root / "traffic4cast" / city / "training"
        folder.mkdir(parents=True)
        for d in range(days):
            array = np.zeros((bins, H, W, channels), np.uint8)
            for t in range(bins):
                array[t] = (_code(c * 100 + d, t) + np.arange(channels) + np.arange(W)[:, None] * 0) % 256
            array[:, 0, 0, :] = 255
            with h5py.File(folder / f"2019-01-{d + 1:02d}_{city}_8ch.h5", "w") as h5:
                h5.create_dataset("array", data=array, compression="gzip", compression_opts=6)


def test_traffic4cast_loader(tmp_path):
    _write_t4c(tmp_path, ["BERLIN", "ISTANBUL"], days=5)
    ds = load_task("traffic4cast", data_dir=str(tmp_path), grid=(3, 3), pool=4, test_fraction=0.2,
                   validation_fraction=0.25, cache_dir=str(tmp_path / "c"))
    assert [len(ds[s]) for s in ds] == [12, 4, 4]  # per city 3 / 1 / 1 days, 2 clips of 12 bins per day
    clip = ds["test"][1]  # BERLIN, 2019-01-05, bins 12-23
    assert clip["inputs"].shape == (9, 8, 3, 3) and clip["targets"].shape == (3, 8, 3, 3)
    with h5py.File(tmp_path / "traffic4cast" / "BERLIN" / "training" / "2019-01-05_BERLIN_8ch.h5") as h5:
        raw = h5["array"][12:24].astype(np.float64) / 255  # (12, 10, 9, 8)
    padded = np.zeros((12, 12, 12, 8))
    padded[:, :10, :9] = raw
    expected = padded.reshape(12, 3, 4, 3, 4, 8).mean(axis=(2, 4)).transpose(0, 3, 1, 2)  # (12, 8, 3, 3)
    got = torch.cat([clip["inputs"], clip["targets"]]).numpy()
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(got[:, 1, 1, 1], [(_code(4, t) + 1) % 256 / 255 for t in range(12, 24)], atol=ATOL)
    assert get_task("traffic4cast").spec.input_shape == (9, 8, 128, 112)


def test_traffic4cast_bad_files(tmp_path):
    (tmp_path / "traffic4cast").mkdir()
    with pytest.raises(FileNotFoundError, match=r"<CITY>/training/<YYYY-MM-DD>_<CITY>_8ch.h5 files under"):
        load_task("traffic4cast", data_dir=str(tmp_path))
    _write_t4c(tmp_path / "nine", ["MOSCOW"], days=3, channels=9)
    with pytest.raises(ValueError, match=r"2019-01-01_MOSCOW_8ch.h5: expected an array of shape .*8 volume/speed"):
        load_task("traffic4cast", data_dir=str(tmp_path / "nine"), grid=(3, 3))
    _write_t4c(tmp_path / "cut", ["MOSCOW"], days=3)
    path = tmp_path / "cut" / "traffic4cast" / "MOSCOW" / "training" / "2019-01-01_MOSCOW_8ch.h5"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="2019-01-01_MOSCOW_8ch.h5: expected a readable HDF5 file"):
        load_task("traffic4cast", data_dir=str(tmp_path / "cut"), grid=(3, 3))


# ---------------------------------------------------------------------------------------------------------
# ENSO: CMIP_train.nc (NetCDF-4 via h5netcdf, and classic NetCDF-3 via scipy)

ENSO_MODELS = ((2, 3), (3, 2))  # 2 models of 3 years, then 3 of 2: 12 records


def _enso_value(model, month, lat, lon):
    """The SST anomaly of a model's absolute month at a grid point: a smooth, overlap-consistent code."""
    return -8.0 + 0.05 * month + 1.5 * model + 0.01 * lat - 0.02 * lon


def _enso_records():
    records = []
    lat, lon = np.meshgrid(np.arange(24), np.arange(72), indexing="ij")
    for model, (n, years) in enumerate([(n, y) for n, y in ENSO_MODELS for _ in range(n)]):
        for year in range(years):
            months = 12 * year + np.arange(36)
            records.append(np.stack([_enso_value(model, m, lat, lon) for m in months]))
    return np.stack(records).astype(np.float32)  # (12, 36, 24, 72)


def _write_enso(root, fmt="netcdf4", sst=None):
    import h5netcdf
    from scipy.io import netcdf_file

    folder = root / "enso"
    folder.mkdir(parents=True)
    sst = _enso_records() if sst is None else sst
    lon = np.arange(0, 360, 5, dtype=np.float64)
    path = folder / "CMIP_train.nc"
    if fmt == "netcdf4":
        with h5netcdf.File(path, "w") as f:
            f.dimensions = {"year": sst.shape[0], "month": 36, "lat": 24, "lon": 72}
            f.create_variable("lon", ("lon",), data=lon)
            f.create_variable("lat", ("lat",), data=np.arange(-55, 65, 5, dtype=np.float64))
            f.create_variable("sst", ("year", "month", "lat", "lon"), data=sst)
            f.create_variable("t300", ("year", "month", "lat", "lon"), data=np.zeros_like(sst))
    else:  # classic NetCDF-3, dimensions stored in another order
        f = netcdf_file(str(path), "w")
        for name, size in (("lat", 24), ("lon", 72), ("year", sst.shape[0]), ("month", 36)):
            f.createDimension(name, size)
        f.createVariable("lon", "d", ("lon",))[:] = lon
        f.createVariable("sst", "f", ("lat", "lon", "year", "month"))[:] = sst.transpose(2, 3, 0, 1)
        f.close()
    return sst


@pytest.mark.parametrize("fmt", ["netcdf4", "netcdf3"])
def test_enso_loader(tmp_path, fmt):
    _write_enso(tmp_path, fmt)
    ds = load_task("enso", data_dir=str(tmp_path), in_frames=3, out_frames=2, sample_stride=7, models=ENSO_MODELS,
                   cache_dir=str(tmp_path / "c"))
    per_model = {3: len(range(0, 60 - 5 + 1, 7)), 2: len(range(0, 48 - 5 + 1, 7))}  # series of years*12+24 months
    assert [len(ds[s]) for s in ds] == [2 * per_model[3] + 1 * per_model[2], per_model[2], per_model[2]]
    low, high = ENSO_SST_RANGE
    lat, lon = np.meshgrid(np.arange(24), np.arange(19, 67), indexing="ij")  # longitudes 95E-330E
    cases = (("train", 1, 0, 7), ("train", per_model[3] + 7, 1, 49), ("train", 2 * per_model[3], 2, 0),
             ("test", 2, 4, 14))  # (split, clip, model, first month)
    for split, index, model, start in cases:
        clip = torch.cat([ds[split][index]["inputs"], ds[split][index]["targets"]]).numpy()[:, 0]  # (5, 24, 48)
        expected = np.stack([(_enso_value(model, start + t, lat, lon) - low) / (high - low) for t in range(5)])
        np.testing.assert_allclose(clip, expected, atol=ATOL)  # the months of one model only, in order
    assert ds["train"][0]["inputs"].shape == (3, 1, 24, 48)


def test_enso_bad_files(tmp_path):
    _write_enso(tmp_path)
    with pytest.raises(ValueError, match=r"CMIP_train.nc: expected 4645 records .*got 12"):
        load_task("enso", data_dir=str(tmp_path))
    sst = _enso_records()
    sst[3, 5, 2, 40] = np.nan
    _write_enso(tmp_path / "nan", sst=sst)
    with pytest.raises(ValueError, match=r"CMIP_train.nc sst records 3-5: expected finite values"):
        load_task("enso", data_dir=str(tmp_path / "nan"), models=ENSO_MODELS, cache_dir=str(tmp_path / "c"))
    (tmp_path / "bad" / "enso").mkdir(parents=True)
    (tmp_path / "bad" / "enso" / "CMIP_train.nc").write_bytes(b"not a netcdf file at all")
    with pytest.raises(ValueError, match="CMIP_train.nc: expected a NetCDF file"):
        load_task("enso", data_dir=str(tmp_path / "bad"), models=ENSO_MODELS)


def test_nino34_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.uniform(0, 1, (2, 6, 5, 1, 24, 48))
    low, high = ENSO_SST_RANGE
    sst = target[:, :, 0] * (high - low) + low  # (B, T, 24, 48)
    region = sst[:, :, 10:13, 19:30].mean(axis=(2, 3))  # 5S-5N, 170W-120W
    expected = np.stack([region[:, i : i + 3].mean(axis=1) for i in range(3)], axis=1)  # (B, T - 2)
    got = nino34_index(torch.tensor(target), ENSO_SST_RANGE)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    p_index = nino34_index(torch.tensor(pred), ENSO_SST_RANGE).numpy()
    corr = [np.corrcoef(p_index[:, k], expected[:, k])[0, 1] for k in range(3)]
    scores = nino34_scores(torch.tensor(pred), torch.tensor(target), ENSO_SST_RANGE)
    assert scores["nino34_corr"] == pytest.approx(np.mean(corr), abs=1e-5)
    weights = np.array([1.5, 1.5, 1.5]) * np.log(np.arange(1, 4))
    assert scores["nino34_wcorr"] == pytest.approx(float(weights @ corr), abs=1e-5)
    assert scores["nino34_mse"] == pytest.approx(float(np.mean((p_index - expected) ** 2)), rel=1e-10)
    same = nino34_scores(torch.tensor(target), torch.tensor(target), ENSO_SST_RANGE)
    assert same["nino34_corr"] == pytest.approx(1.0, abs=1e-5) and same["nino34_mse"] == 0.0
    with pytest.raises(ValueError, match=r"expects SST frames \(B, T, 1, 24, 48\)"):
        nino34_index(torch.zeros(1, 5, 1, 8, 8), ENSO_SST_RANGE)


def test_nino34_in_the_evaluate_module():
    import evaluate

    from unistd_hf.metrics import EVALUATE_MODULE_PATH

    rng = np.random.default_rng(1)
    pred, target = rng.uniform(0, 1, (2, 4, 5, 1, 24, 48)).astype(np.float32)
    metric = evaluate.load(EVALUATE_MODULE_PATH)
    result = metric.compute(predictions=list(pred), references=list(target), nino34_value_range=list(ENSO_SST_RANGE))
    direct = nino34_scores(torch.tensor(pred), torch.tensor(target), ENSO_SST_RANGE)
    for key, value in direct.items():
        assert result[key] == pytest.approx(value, rel=1e-6)
    assert "mse" in result


def test_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # as if h5py were not installed
    (tmp_path / "kitti_hkl").mkdir()
    (tmp_path / "kitti_hkl" / "sources_train.hkl").write_bytes(b"")
    with pytest.raises(ImportError, match=r"task 'kitticaltech' needs the optional library 'h5py': pip install "
                                          r"\"unistd-hf\[data\]\""):
        load_task("kitticaltech", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# the paper's recipe: configs/paper_10tasks.yaml on fixture data of all ten tasks


def _write_all_ten(root):
    """Fixture files of the ten tasks at their published frame sizes (cut to a few sequences)."""
    from test_data import _write_idx, _write_kth, _write_taxibj

    _write_kitti(root, {"train": [20], "val": [20], "test": [20]}, H=128, W=160)
    _write_bair(root, {"train": [1, 1], "test": [1]}, frames=12)
    _write_cityscapes(root, {s: [("aachen", 0, range(7))] for s in ("train", "val", "test")}, H=32, W=64)
    _write_taxibj(root)
    _write_sevir(root, {"vil/2018/a.h5": ["2018-05-01 00:00:00"], "vil/2019/b.h5": ["2019-03-01 00:00:00"],
                        "vil/2019/c.h5": ["2019-08-01 00:00:00"]}, size=384)
    (root / "moving_mnist").mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "moving_mnist" / "mnist_test_seq.npy", rng.integers(0, 256, (20, 2, 64, 64), dtype=np.uint8))
    _write_idx(root / "moving_mnist" / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_kth(root, [("boxing", "01", 20), ("boxing", "16", 20), ("boxing", "20", 20)])
    _write_human(root, {"S1_Walking.54138969": 0, "S5_Eating.55011271": 1}, frames=36, size=64)
    (root / "human" / "train.txt").write_text("images/S1_Walking.54138969_,1\nimages/S5_Eating.55011271_,1\n")
    (root / "human" / "test.txt").write_text("images/S1_Walking.54138969_,1\n")
    _write_t4c(root, ["BERLIN"], days=3, bins=12, H=495, W=436)
    _write_enso(root, sst=_enso_records()[:3])  # 3 one-year models: train, validation, test


# Loader options that shrink each task for a fast CPU run (frames 32-48 pixels), not a change of code.
DOWNSCALE = {
    "kitticaltech": {"scale": 4}, "bair": {"scale": 2}, "cityscapes": {"image_size": 32}, "taxibj": {},
    "sevir": {"scale": 8}, "mmnist": {"num_train": 2, "num_validation": 1}, "kth": {"image_size": 32},
    "human": {"image_size": 32}, "traffic4cast": {"grid": (16, 14), "pool": 32}, "enso": {"models": ((1, 1), (2, 1))},
}


def test_paper_config_runs_two_steps_on_all_ten_tasks(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from unistd_hf import UniSTDConfig, default_rankmoe_config, get_unistd_peft_model
    from unistd_hf.cli import parse_training_arguments, read_config_file
    from unistd_hf.training import validate_arguments

    config = read_config_file("configs/paper_10tasks.yaml")
    assert config["backbone"] == "openai/clip-vit-base-patch16" and config["tasks"] == list(PAPER_TASKS)
    assert (config["learning_rate"], config["weight_decay"], config["epochs"], config["batch_size"]) == (
        0.01, 0.05, 90, 16)
    assert (config["budget_weight"], config["num_experts"], config["out_proj_experts"], config["init_rank"]) == (
        1.0, 6, 2, 4.5)
    clip_dir = tmp_path / "clip"  # the layout of ViT-B/16 (patch 16, MLP ratio 4), narrower and shallower
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                     patch_size=16, image_size=224)).save_pretrained(clip_dir)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_all_ten(data_dir)
    args = parse_training_arguments(["--config", "configs/paper_10tasks.yaml", "--backbone", str(clip_dir),
                                     "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "run"),
                                     "--batch_size", "2", "--mixed_precision", "no"])
    validate_arguments(args)
    assert (args.learning_rate, args.weight_decay, args.num_experts, args.init_rank) == (0.01, 0.05, 6, 4.5)
    data = {name: load_task(name, data_dir=str(data_dir), cache_dir=str(tmp_path / "c"), **DOWNSCALE[name])
            for name in args.tasks}
    specs = [spec_for(name, data[name]) for name in args.tasks]
    for spec in specs:  # the paper's frames and channels; only the pixels are fewer
        paper = PAPER_TASKS[spec.name]
        assert (spec.in_frames, spec.out_frames, spec.channels) == (paper.in_frames, paper.out_frames, paper.channels)
        assert spec.height <= 64 and spec.width <= 64
    config = UniSTDConfig(backbone=args.backbone, tasks=specs, hidden_channels=args.hidden_channels,
                          temporal_gate=args.temporal_gate, residual_to_last_frame=args.residual_to_last_frame)
    model = get_unistd_peft_model(config, default_rankmoe_config(
        config, num_experts=args.num_experts, init_rank=args.init_rank, max_rank=args.max_rank,
        budget_weight=args.budget_weight, num_experts_pattern={"out_proj": args.out_proj_experts,
                                                               "temporal_moe": args.out_proj_experts}))
    experts = {name.rsplit(".", 1)[-1]: len(ranks) for name, ranks in model.rank_summary().items()}
    assert experts == {"q_proj": 6, "k_proj": 6, "v_proj": 6, "out_proj": 2, "temporal_moe": 2}
    assert {rank for ranks in model.rank_summary().values() for rank in ranks} == {4.5}
    ranks = {id(p) for p in model.rank_parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ranks]
    optimizer = torch.optim.AdamW(weights, lr=args.learning_rate, weight_decay=args.weight_decay)
    before = [p.detach().clone() for p in weights]
    for _ in range(2):  # two optimizer steps, each over one batch of every task
        optimizer.zero_grad()
        for name in args.tasks:
            batch = data[name]["train"][: args.batch_size]
            out = model(pixel_values=batch["inputs"].float(), task=name, labels=batch["targets"].float())
            assert torch.isfinite(out.loss) and out.predictions.shape == batch["targets"].shape
            out.loss.backward()
        (args.budget_weight * model.rank_budget_loss()).backward()
        optimizer.step()
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, weights))
    assert changed > len(weights) // 2  # every task's head and the shared adapters moved


def test_default_chunk_fits_the_memory_budget(tmp_path, monkeypatch):
    from datasets import arrow_writer

    from unistd_hf.data import builder

    sizes = []
    original = arrow_writer.ArrowWriter.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sizes.append(self.writer_batch_size)

    monkeypatch.setattr(arrow_writer.ArrowWriter, "__init__", init)
    monkeypatch.setattr(builder, "CHUNK_BYTES", 25 * 64 * 64 * 2 * 3)  # room for 3 clips of 25 x 64 x 64
    _write_sevir(tmp_path, SEVIR_FILES, size=64)
    load_task("sevir", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert sizes and set(sizes) == {3}
