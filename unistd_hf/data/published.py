"""Loaders of the seven other data sets of the paper, in the layout of the reference loader most users have.

Every loader reads one clip at a time from disk (h5py slices, one TFRecord at a time, one image at a time), so
a split builds with at most `max_chunk` clips in memory, and `streaming=True` returns an `IterableDatasetDict`
that reads the files on the fly. Frame sizes are read from the files (the published ones give the paper's
Table 1 shapes); `scale=k` averages k x k pixels (a lighter task). See docs/DATA.md for each folder tree.

- "kitticaltech": `kitti_hkl/X_{train,val,test}.hkl` + `sources_*.hkl` (PredNet / OpenSTL; hickle = HDF5).
- "bair": `softmotion30_44k/{train,test}/*.tfrecords` (OpenSTL), frames `{i}/image_aux1/encoded`.
- "human": `human/{train,test}.txt` + `human/images/*.jpg` (OpenSTL's Human3.6M).
- "cityscapes": `cityscapes/leftImg8bit_sequence/{train,val,test}/<city>/*_leftImg8bit.png` (official).
- "sevir": `sevir/CATALOG.csv` + `sevir/data/vil/<year>/*.h5` (official; Earthformer's splits and windows).
- "traffic4cast": `traffic4cast/<CITY>/training/<date>_<CITY>_8ch.h5` (NeurIPS 2021 edition, key "array").
- "enso": `enso/CMIP_train.nc` (ICAR-ENSO, Earthformer's preprocessing).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.fingerprint import Hasher
from PIL import Image

from ..metrics import DEFAULT_METRICS
from .builder import (
    Example,
    build_splits,
    check_dtype,
    check_finite,
    check_shape,
    file_signature,
    require_file,
    to_unit,
)
from .formats import (
    close_netcdf,
    iter_tfrecord_examples,
    open_hdf5,
    read_hickle_array,
    read_hickle_strings,
    read_netcdf_variable,
)
from .paper_tasks import ENSO_SST_RANGE, PAPER_TASKS
from .registry import TaskInfo, register_task
from .synthetic import RAIN_CSI_THRESHOLDS

__all__ = [
    "load_bair",
    "load_cityscapes",
    "load_enso",
    "load_human",
    "load_kitticaltech",
    "load_sevir",
    "load_traffic4cast",
]

VERSION = "1"
Options = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _folder(task: str, data_dir: str | None, sub: str, layout: str) -> Path:
    """data_dir/sub, or an error saying which folder tree the task reads."""
    if data_dir is None:
        raise ValueError(f"task {task!r} reads files: pass data_dir=<folder> holding {layout}")
    root = Path(data_dir) / sub
    if not root.is_dir():
        raise FileNotFoundError(f"{task}: expected a folder {root} holding {layout}, found none")
    return root


def _positive(task: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{task}: {name} must be a positive int, got {value!r}")


def _pool(clip: np.ndarray, scale: int, source: str) -> np.ndarray:
    """(T, C, H, W) float32 averaged over scale x scale pixel blocks (identity for scale=1)."""
    if scale == 1:
        return clip
    T, C, H, W = clip.shape
    if H % scale or W % scale:
        raise ValueError(f"{source}: frames of {H}x{W} cannot be averaged by scale={scale} (must divide both)")
    return clip.reshape(T, C, H // scale, scale, W // scale, scale).mean(axis=(3, 5))


def _example(clip: np.ndarray, in_frames: int) -> Example:
    clip = clip.astype(np.float16)
    return {"inputs": clip[:in_frames], "targets": clip[in_frames:]}


def _uint8_clip(frames: np.ndarray, scale: int, source: str) -> np.ndarray:
    """(T, H, W, C) uint8 frames -> (T, C, H', W') float32 in [0, 1] (value / 255, then pooled)."""
    clip = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    return _pool(clip, scale, source)


def _num_held_out(total: int, fraction: float, what: str) -> int:
    """How many of `total` items a held-out split of `fraction` gets (at least 1, never all)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{what}: the held-out fraction must be in (0, 1), got {fraction}")
    count = max(1, int(round(total * fraction)))
    if count >= total:
        raise ValueError(f"{what}: {total} item(s) are too few to hold out a fraction {fraction} and keep the rest")
    return count


def _image(path: Path, size: int | None, task: str) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8, resized (bicubic) to size x size when `size` is given."""
    require_file(path, f"{task} frame")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
    except OSError as error:
        raise ValueError(f"{task}: cannot read image {path}: {error}") from None


def _files_key(files: Sequence[Path]) -> str:
    return Hasher.hash([file_signature(f) for f in sorted(set(files))])


# ---------------------------------------------------------------------------------------------------------
# KITTI (PredNet's hickle files, OpenSTL's kitti_hkl folder)

_HKL_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _kitti_open(folder: Path, split: str) -> tuple[Any, list[str], Path]:
    """(lazy (N, H, W, 3) uint8 dataset, per-frame source names, path) of one split; the file stays open."""
    x_path, s_path = folder / f"X_{split}.hkl", folder / f"sources_{split}.hkl"
    require_file(s_path, "KittiCaltech frame sources")
    with open_hdf5(s_path, "kitticaltech", "a hickle list of frame sources") as h5:
        sources = read_hickle_strings(h5, s_path)
    h5 = open_hdf5(x_path, "kitticaltech", "a hickle uint8 array (frames, height, width, 3)")
    try:
        frames = read_hickle_array(h5, x_path)
        check_shape(frames, str(x_path), (None, None, None, 3), "(frames, height, width, RGB)")
        check_dtype(frames, str(x_path), "u", "uint8 (0-255)")
        if len(sources) != frames.shape[0]:
            raise ValueError(
                f"{s_path}: expected one source per frame of {x_path} ({frames.shape[0]}), got {len(sources)}"
            )
    except ValueError:
        h5.close()
        raise
    return frames, sources, x_path


def _runs(labels: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of each run of equal consecutive labels: the frames of one recording."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((start, i))
            start = i
    return runs


def _kitti_starts(sources: Sequence[str], length: int, window_stride: int | None) -> list[int]:
    """Clip starts inside each recording. Default (OpenSTL): non-overlapping clips aligned to the recording's end."""
    starts = []
    for begin, end in _runs(sources):
        if window_stride is None:
            starts += range(end - length, begin - 1, -length)
        else:
            starts += range(begin, end - length + 1, window_stride)
    return sorted(starts)


def _generate_kitti(path: str, starts: list[int], length: int, in_frames: int, scale: int) -> Iterator[Example]:
    with open_hdf5(Path(path), "kitticaltech", "a hickle uint8 array") as h5:
        frames = read_hickle_array(h5, Path(path))
        for start in starts:
            yield _example(_uint8_clip(frames[start : start + length], scale, path), in_frames)


def load_kitticaltech(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 10,
    out_frames: int = 10,
    window_stride: int | None = None,
    scale: int = 1,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """KITTI as PredNet preprocessed it (128x160 RGB, every frame of each drive), 10 -> 10 as the paper.

    Args:
        data_dir: folder holding `kitti_hkl/X_{train,val,test}.hkl` (uint8 (N, 128, 160, 3)) and
            `sources_{train,val,test}.hkl` (the drive of each frame); hickle 2/3 or 4/5 files, read with h5py.
        seed: unused (the splits are PredNet's files: train, val -> validation, test).
        in_frames, out_frames: frames per clip (OpenSTL's KittiCaltech: 10 -> 1, out_frames=1).
        window_stride: None: OpenSTL's clips (non-overlapping, aligned to each drive's end); an int: a clip
            starting every `window_stride` frames. No clip spans two drives.
        scale: average scale x scale pixels (1: 128x160).
        max_chunk: clips held in memory before they are written (see `build_splits`).
        streaming: return an `IterableDatasetDict` reading the files on the fly.
        cache_dir: where `datasets` stores the clips.
    """
    _positive("kitticaltech", in_frames=in_frames, out_frames=out_frames, scale=scale)
    folder = _folder("kitticaltech", data_dir, "kitti_hkl", "X_{train,val,test}.hkl and sources_{train,val,test}.hkl")
    length, generators, files, shape = in_frames + out_frames, {}, [], None
    for split, name in _HKL_SPLITS.items():
        frames, sources, x_path = _kitti_open(folder, name)
        shape = tuple(int(s) for s in frames.shape[1:])
        frames.file.close()
        starts = _kitti_starts(sources, length, window_stride)
        if not starts:
            raise ValueError(f"{x_path}: no drive has {length} frames (in_frames + out_frames)")
        files += [x_path, folder / f"sources_{name}.hkl"]
        generators[split] = (
            _generate_kitti,
            {"path": str(x_path), "starts": starts, "length": length, "in_frames": in_frames, "scale": scale},
        )
    H, W = shape[0] // scale, shape[1] // scale
    return build_splits("kitticaltech", generators, (in_frames, 3, H, W), (out_frames, 3, H, W), VERSION,
                        cache_dir, {"files": _files_key(files)}, max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------
# BAIR robot pushing (softmotion30_44k TFRecords, as OpenSTL reads them)

_BAIR_FRAME = "{}/image_aux1/encoded"


def _bair_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.tfrecords"))
    if not files:
        raise FileNotFoundError(f"bair: expected *.tfrecords files in {folder}, found none")
    return files


def _bair_frames(example: dict[str, Any], source: str, size: int) -> np.ndarray:
    """The (T, size, size, 3) uint8 frames `0/image_aux1/encoded`, `1/...` of one record (raw RGB bytes)."""
    frames, i = [], 0
    while _BAIR_FRAME.format(i) in example:
        values = example[_BAIR_FRAME.format(i)]
        raw = values[0] if values else b""
        if len(raw) != size * size * 3:
            raise ValueError(f"{source}: {_BAIR_FRAME.format(i)} must hold {size}x{size}x3 raw RGB bytes "
                             f"({size * size * 3}), got {len(raw)} bytes")
        frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(size, size, 3))
        i += 1
    if not frames:
        raise ValueError(f"{source}: expected features '0/image_aux1/encoded', '1/image_aux1/encoded', ...; "
                         f"found {sorted(example)[:6]}")
    return np.stack(frames)


def _generate_bair(
    files: list[str], in_frames: int, length: int, window_stride: int | None, scale: int
) -> Iterator[Example]:
    for path in files:
        for k, example in enumerate(iter_tfrecord_examples(Path(path), "bair")):
            frames = _bair_frames(example, f"{path} record {k}", 64)
            if len(frames) < length:
                raise ValueError(f"{path} record {k}: expected at least {length} frames, got {len(frames)}")
            starts = [0] if window_stride is None else range(0, len(frames) - length + 1, window_stride)
            for start in starts:
                yield _example(_uint8_clip(frames[start : start + length], scale, path), in_frames)


def load_bair(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 2,
    out_frames: int = 10,
    window_stride: int | None = None,
    validation_fraction: float = 0.1,
    scale: int = 1,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """BAIR robot pushing (64x64 RGB, 30 frames per trajectory), 2 -> 10 as the paper.

    Args:
        data_dir: folder holding `softmotion30_44k/train/*.tfrecords` and `softmotion30_44k/test/*.tfrecords`
            (each record one trajectory; frames `{i}/image_aux1/encoded`, raw 64x64x3 bytes, as OpenSTL reads).
        seed: unused (the splits are by file).
        in_frames, out_frames: frames per clip (OpenSTL: 2 -> 12).
        window_stride: None: one clip per trajectory (its first frames); an int: a clip every `window_stride`
            frames (OpenSTL: 1).
        validation_fraction: the last train files (whole trajectories) held out for validation.
        scale, max_chunk, streaming, cache_dir: see `load_kitticaltech`.
    """
    _positive("bair", in_frames=in_frames, out_frames=out_frames, scale=scale)
    root = _folder("bair", data_dir, "softmotion30_44k", "{train,test}/*.tfrecords")
    train, test = _bair_files(root / "train"), _bair_files(root / "test")
    held = _num_held_out(len(train), validation_fraction, f"bair: train files in {root / 'train'}")
    common = {"in_frames": in_frames, "length": in_frames + out_frames, "window_stride": window_stride, "scale": scale}
    generators = {
        split: (_generate_bair, {"files": [str(f) for f in files], **common})
        for split, files in (("train", train[:-held]), ("validation", train[-held:]), ("test", test))
    }
    shape = (3, 64 // scale, 64 // scale)
    return build_splits("bair", generators, (in_frames, *shape), (out_frames, *shape), VERSION, cache_dir,
                        {"files": _files_key(train + test)}, max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------
# Human3.6M (OpenSTL's images + list files)


def _human_list(path: Path) -> list[tuple[str, int]]:
    """(frame file prefix, first frame number) per line `images/S1_Walking.54138969_,123` of train/test.txt."""
    require_file(path, "Human3.6M clip list")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise ValueError(f"{path}:{number}: expected '<frame prefix>,<first frame number>', got {line.strip()!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise ValueError(f"{path}: expected lines '<frame prefix>,<first frame number>', the file is empty")
    return entries


def _generate_human(root: str, entries: list[tuple[str, int]], in_frames: int, length: int, step: int,
                    image_size: int) -> Iterator[Example]:
    for prefix, begin in entries:
        frames = [_image(Path(root) / f"{prefix}{j:06d}.jpg", image_size, "human")
                  for j in range(begin, begin + length * step, step)]
        yield _example(_uint8_clip(np.stack(frames), 1, root), in_frames)


def load_human(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 4,
    out_frames: int = 4,
    step: int = 5,
    image_size: int = 256,
    validation_fraction: float = 0.05,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Human3.6M as OpenSTL: one clip per line of train.txt / test.txt, every `step`-th frame, 4 -> 4 at 256x256.

    Args:
        data_dir: folder holding `human/train.txt`, `human/test.txt` (lines `images/S1_Walking.54138969_,1621`)
            and the frames `human/images/S1_Walking.54138969_001621.jpg` (prefix + 6-digit frame number).
        seed: unused.
        in_frames, out_frames: frames per clip.
        step: frame numbers between two clip frames (OpenSTL: 5).
        image_size: frames are resized (bicubic) to image_size x image_size when they differ; RGB order
            (OpenSTL reads BGR with OpenCV).
        validation_fraction: the last videos (line prefixes, sorted) of train.txt held out for validation.
        max_chunk, streaming, cache_dir: see `load_kitticaltech`.
    """
    _positive("human", in_frames=in_frames, out_frames=out_frames, step=step, image_size=image_size)
    root = _folder("human", data_dir, "human", "train.txt, test.txt and images/*.jpg")
    train, test = _human_list(root / "train.txt"), _human_list(root / "test.txt")
    videos = sorted({prefix for prefix, _ in train})
    held = set(videos[len(videos) - _num_held_out(len(videos), validation_fraction, f"human: videos of {root}"):])
    splits = {"train": [e for e in train if e[0] not in held], "validation": [e for e in train if e[0] in held],
              "test": test}
    common = {"root": str(root), "in_frames": in_frames, "length": in_frames + out_frames, "step": step,
              "image_size": image_size}
    generators = {split: (_generate_human, {"entries": entries, **common}) for split, entries in splits.items()}
    shape = (3, image_size, image_size)
    key = {"lists": _files_key([root / "train.txt", root / "test.txt"])}
    return build_splits("human", generators, (in_frames, *shape), (out_frames, *shape), VERSION, cache_dir, key,
                        max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------
# Cityscapes (official leftImg8bit_sequence)

_CITYSCAPES_FILE = re.compile(r"^(.+)_(\d+)_(\d+)_leftImg8bit\.png$")
_CITYSCAPES_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _cityscapes_sequences(folder: Path) -> list[list[Path]]:
    """The frames of each snippet (city, sequence number, consecutive frame numbers), in frame order."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cityscapes: expected a folder {folder} holding <city>/<city>_<seq>_<frame>_leftImg8bit.png"
        )
    groups: dict[tuple[str, int], list[tuple[int, Path]]] = {}
    for path in folder.glob("*/*_leftImg8bit.png"):
        match = _CITYSCAPES_FILE.match(path.name)
        if match:
            groups.setdefault((match.group(1), int(match.group(2))), []).append((int(match.group(3)), path))
    sequences = []
    for key in sorted(groups):
        frames = sorted(groups[key])
        run = [frames[0]]
        for frame in frames[1:]:
            if frame[0] != run[-1][0] + 1:  # a gap in the frame numbers starts a new snippet
                sequences.append([p for _, p in run])
                run = []
            run.append(frame)
        sequences.append([p for _, p in run])
    if not sequences:
        raise FileNotFoundError(f"cityscapes: no <city>/<city>_<seq>_<frame>_leftImg8bit.png files under {folder}")
    return sequences


def _generate_cityscapes(clips: list[list[str]], in_frames: int, image_size: int) -> Iterator[Example]:
    for clip in clips:
        frames = np.stack([_image(Path(p), image_size, "cityscapes") for p in clip])
        yield _example(_uint8_clip(frames, 1, clip[0]), in_frames)


def load_cityscapes(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 2,
    out_frames: int = 5,
    window_stride: int = 10,
    test_clips_per_sequence: int | None = 1,
    image_size: int = 128,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Cityscapes video snippets (30 frames each), 2 -> 5 at 128x128 as the paper.

    Args:
        data_dir: folder holding
            `cityscapes/leftImg8bit_sequence/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`.
        seed: unused (the official train / val / test folders are the splits).
        in_frames, out_frames: frames per clip.
        window_stride: frames between clip starts within a snippet (10: 3 clips per 30-frame snippet, the
            8,925 training clips of the paper's Table 1 for 2,975 snippets).
        test_clips_per_sequence: the first clips kept per test snippet (1: 1,525 test clips); None: all.
        image_size: frames are resized (bicubic, the whole 2048x1024 view) to image_size x image_size.
        max_chunk, streaming, cache_dir: see `load_kitticaltech`.
    """
    _positive("cityscapes", in_frames=in_frames, out_frames=out_frames, window_stride=window_stride,
              image_size=image_size)
    root = _folder("cityscapes", data_dir, "cityscapes/leftImg8bit_sequence", "{train,val,test}/<city>/*.png")
    length, generators, files = in_frames + out_frames, {}, []
    for split, name in _CITYSCAPES_SPLITS.items():
        clips = []
        for frames in _cityscapes_sequences(root / name):
            windows = [frames[s : s + length] for s in range(0, len(frames) - length + 1, window_stride)]
            if split == "test" and test_clips_per_sequence is not None:
                windows = windows[:test_clips_per_sequence]
            clips += [[str(p) for p in w] for w in windows]
            files += frames
        if not clips:
            raise ValueError(f"cityscapes: no snippet of {length} consecutive frames in {root / name}")
        generators[split] = (_generate_cityscapes, {"clips": clips, "in_frames": in_frames, "image_size": image_size})
    shape = (3, image_size, image_size)
    key = {"files": Hasher.hash(sorted(str(f) for f in files))}  # names only: stat-ing ~150k PNGs costs minutes
    return build_splits("cityscapes", generators, (in_frames, *shape), (out_frames, *shape), VERSION, cache_dir,
                        key, max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------
# SEVIR VIL (official catalog and HDF5 files; Earthformer's splits and windows)

_SEVIR_COLUMNS = ("id", "file_name", "file_index", "img_type", "time_utc")


def _sevir_events(catalog: Path) -> list[tuple[datetime, str, str, int]]:
    """(time, event id, file name, index in file) of each complete VIL event of CATALOG.csv."""
    require_file(catalog, "SEVIR catalog")
    with open(catalog, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _SEVIR_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{catalog}: expected columns {list(_SEVIR_COLUMNS)}, missing {missing}")
        events = []
        for line, row in enumerate(reader, 2):
            if row["img_type"] != "vil" or float(row.get("pct_missing") or 0) != 0:  # Earthformer's default filter
                continue
            try:
                time, index = datetime.fromisoformat(row["time_utc"]), int(row["file_index"])
            except ValueError as error:
                raise ValueError(f"{catalog}:{line}: expected time_utc 'YYYY-MM-DD HH:MM:SS' and an int file_index "
                                 f"({error})") from None
            events.append((time, row["id"], row["file_name"], index))
    if not events:
        raise ValueError(f"{catalog}: no row with img_type 'vil' (and pct_missing 0)")
    return sorted(events)


def _sevir_vil(h5: Any, path: Path) -> Any:
    if "vil" not in h5:
        raise ValueError(f"{path}: expected a dataset 'vil' (events, height, width, frames), found {sorted(h5.keys())}")
    vil = h5["vil"]
    check_shape(vil, str(path), (None, None, None, None), "(events, height, width, frames)")
    check_dtype(vil, str(path), "u", "uint8 VIL levels (0-255)")
    return vil


def _generate_sevir(root: str, events: list[tuple[str, str, int]], starts: list[int], length: int, in_frames: int,
                    scale: int) -> Iterator[Example]:
    handle, current = None, None
    try:
        for event_id, file_name, index in events:
            path = Path(root) / file_name
            if file_name != current:
                if handle is not None:
                    handle.close()
                handle, current = open_hdf5(path, "sevir", "a SEVIR VIL HDF5 file"), file_name
            vil = _sevir_vil(handle, path)
            if index >= vil.shape[0]:
                raise ValueError(
                    f"{path}: catalog event {event_id} has file_index {index}, the file holds {vil.shape[0]} events"
                )
            if "id" in handle:
                stored = handle["id"][index]
                stored = stored.decode() if isinstance(stored, bytes) else str(stored)
                if stored != event_id:
                    raise ValueError(f"{path}: expected event {event_id} at file_index {index}, found {stored}")
            for start in starts:
                frames = vil[index, :, :, start : start + length]  # (H, W, T): only this window is read
                yield _example(_uint8_clip(frames.transpose(2, 0, 1)[..., None], scale, str(path)), in_frames)
    finally:
        if handle is not None:
            handle.close()


def load_sevir(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 13,
    out_frames: int = 12,
    window_stride: int = 12,
    train_end: str = "2019-01-01",
    validation_end: str = "2019-06-01",
    scale: int = 1,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """SEVIR vertically integrated liquid (VIL), 13 -> 12 frames of 384x384 (5 minutes apart), as Earthformer.

    Args:
        data_dir: folder holding `sevir/CATALOG.csv` and `sevir/data/vil/<year>/SEVIR_VIL_*.h5` (datasets
            `vil` uint8 (events, 384, 384, 49) and `id`); the catalog's `file_name` is relative to `sevir/data/`.
        seed: unused.
        in_frames, out_frames: frames per clip; clips start every `window_stride` frames of an event
            (Earthformer: 25-frame windows every 12 of 49: 3 per event). No clip spans two events.
        train_end, validation_end: events with time_utc <= train_end train, <= validation_end validate, later
            ones test (Earthformer's split dates).
        scale, max_chunk, streaming, cache_dir: see `load_kitticaltech`. Each clip reads only its window.
    """
    _positive("sevir", in_frames=in_frames, out_frames=out_frames, window_stride=window_stride, scale=scale)
    root = _folder("sevir", data_dir, "sevir", "CATALOG.csv and data/vil/<year>/*.h5")
    events = _sevir_events(root / "CATALOG.csv")
    ends = (datetime.fromisoformat(train_end), datetime.fromisoformat(validation_end))
    files = sorted({name for _, _, name, _ in events})
    shape = None
    for name in files:  # check every file's layout now, without reading its frames
        with open_hdf5(root / "data" / name, "sevir", "a SEVIR VIL HDF5 file named in CATALOG.csv") as h5:
            vil_shape = tuple(_sevir_vil(h5, root / "data" / name).shape[1:])
        if shape is not None and vil_shape != shape:
            raise ValueError(f"{root / 'data' / name}: expected events of (H, W, frames) = {shape}, got {vil_shape}")
        shape = vil_shape
    H, W, raw_frames = shape
    length = in_frames + out_frames
    if raw_frames < length:
        raise ValueError(f"sevir: events have {raw_frames} frames, fewer than in_frames + out_frames = {length}")
    starts = list(range(0, raw_frames - length + 1, window_stride))
    splits: dict[str, list[tuple[str, str, int]]] = {"train": [], "validation": [], "test": []}
    for time, event_id, name, index in events:
        split = "train" if time <= ends[0] else "validation" if time <= ends[1] else "test"
        splits[split].append((event_id, name, index))
    for split, chosen in splits.items():
        if not chosen:
            raise ValueError(f"sevir: no VIL event of {root / 'CATALOG.csv'} falls in the {split} split "
                             f"(train <= {train_end} < validation <= {validation_end} < test)")
        chosen.sort(key=lambda e: (e[1], e[2]))  # file by file, in file order: each file is opened once
    common = {"root": str(root / "data"), "starts": starts, "length": length, "in_frames": in_frames, "scale": scale}
    generators = {split: (_generate_sevir, {"events": chosen, **common}) for split, chosen in splits.items()}
    out_shape = (1, H // scale, W // scale)
    key = {"files": _files_key([root / "CATALOG.csv"] + [root / "data" / n for n in files])}
    return build_splits("sevir", generators, (in_frames, *out_shape), (out_frames, *out_shape), VERSION, cache_dir,
                        key, max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------
# Traffic4Cast (NeurIPS 2021 edition: per-day HDF5 files, 288 x 495 x 436 x 8 uint8)

_T4C_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})_(.+)_8ch\.h5$")


def _t4c_days(root: Path) -> dict[str, list[Path]]:
    """City -> its per-day files `<CITY>/training/<YYYY-MM-DD>_<CITY>_8ch.h5`, in date order."""
    cities: dict[str, list[Path]] = {}
    for path in sorted(root.glob("*/training/*_8ch.h5")):
        if _T4C_FILE.match(path.name):
            cities.setdefault(path.parent.parent.name, []).append(path)
    if not cities:
        raise FileNotFoundError(f"traffic4cast: expected <CITY>/training/<YYYY-MM-DD>_<CITY>_8ch.h5 files under {root}")
    return {city: sorted(days, key=lambda p: p.name) for city, days in sorted(cities.items())}


def _t4c_array(h5: Any, path: Path) -> Any:
    if "array" not in h5:
        raise ValueError(f"{path}: expected a dataset 'array' (time bins, height, width, 8), found {sorted(h5.keys())}")
    array = h5["array"]
    check_shape(array, str(path), (None, None, None, 8), "(time bins, height, width, 8 volume/speed channels)")
    check_dtype(array, str(path), "u", "uint8 (0-255)")
    return array


def _t4c_frames(frames: np.ndarray, grid: tuple[int, int], pool: int, source: str) -> np.ndarray:
    """(T, H, W, 8) uint8 -> (T, 8, grid_h, grid_w): zero-padded (bottom, right) to grid * pool, pool x pool means."""
    T, H, W, C = frames.shape
    height, width = grid[0] * pool, grid[1] * pool
    if H > height or W > width:
        raise ValueError(f"{source}: frames of {H}x{W} do not fit grid {grid} x pool {pool} = {height}x{width}")
    padded = np.zeros((T, C, height, width), dtype=np.float32)
    padded[:, :, :H, :W] = frames.transpose(0, 3, 1, 2) / 255.0
    return _pool(padded, pool, source)


def _generate_t4c(files: list[str], starts: list[int], length: int, in_frames: int, grid: tuple[int, int],
                  pool: int) -> Iterator[Example]:
    for path in files:
        with open_hdf5(Path(path), "traffic4cast", "a Traffic4Cast day file") as h5:
            array = _t4c_array(h5, Path(path))
            if array.shape[0] < starts[-1] + length:
                raise ValueError(f"{path}: expected at least {starts[-1] + length} time bins, got {array.shape[0]}")
            for start in starts:
                yield _example(_t4c_frames(array[start : start + length], grid, pool, path), in_frames)


def load_traffic4cast(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 9,
    out_frames: int = 3,
    window_stride: int | None = None,
    grid: tuple[int, int] = (128, 112),
    pool: int = 4,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Traffic4Cast 2021 movies (5-minute bins of 495x436 cells, 8 channels: volume and speed per heading), 9 -> 3.

    The paper's 8 x 128 x 112 frames: each 495x436 frame is zero-padded at the bottom and right to 512x448 and
    averaged over 4x4 cells (`grid` x `pool`), values / 255.

    Args:
        data_dir: folder holding `traffic4cast/<CITY>/training/<YYYY-MM-DD>_<CITY>_8ch.h5` (dataset `array`,
            uint8 (288, 495, 436, 8): one file per day).
        seed: unused (the splits are chronological).
        in_frames, out_frames: frames per clip; clips never span two days.
        window_stride: time bins between clip starts in a day (None: in_frames + out_frames, no overlap).
        grid, pool: output grid and the cells averaged per grid point (frames must fit grid * pool).
        validation_fraction, test_fraction: the last days of each city (by date) for validation, then test.
        max_chunk, streaming, cache_dir: see `load_kitticaltech`.
    """
    grid = (int(grid[0]), int(grid[1]))
    _positive("traffic4cast", in_frames=in_frames, out_frames=out_frames, pool=pool, grid_h=grid[0], grid_w=grid[1])
    root = _folder("traffic4cast", data_dir, "traffic4cast", "<CITY>/training/<YYYY-MM-DD>_<CITY>_8ch.h5")
    length = in_frames + out_frames
    stride = window_stride or length
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    bins = None
    for city, days in _t4c_days(root).items():
        n_test = _num_held_out(len(days), test_fraction, f"traffic4cast: days of {city}")
        n_val = _num_held_out(len(days) - n_test, validation_fraction, f"traffic4cast: days of {city}")
        cut = len(days) - n_test - n_val
        for split, chosen in (("train", days[:cut]), ("validation", days[cut:-n_test]), ("test", days[-n_test:])):
            splits[split] += [str(p) for p in chosen]
        with open_hdf5(days[0], "traffic4cast", "a Traffic4Cast day file") as h5:
            bins = _t4c_array(h5, days[0]).shape[0]
    if bins < length:
        raise ValueError(f"traffic4cast: days have {bins} time bins, fewer than in_frames + out_frames = {length}")
    starts = list(range(0, bins - length + 1, stride))
    common = {"starts": starts, "length": length, "in_frames": in_frames, "grid": grid, "pool": pool}
    generators = {split: (_generate_t4c, {"files": files, **common}) for split, files in splits.items()}
    shape = (8, *grid)
    key = {"files": _files_key([Path(f) for files in splits.values() for f in files])}
    return build_splits("traffic4cast", generators, (in_frames, *shape), (out_frames, *shape), VERSION, cache_dir,
                        key, max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------
# ENSO (ICAR-ENSO CMIP_train.nc, Earthformer's preprocessing)

_ENSO_DIMS = ("year", "month", "lat", "lon")
_ENSO_LON = (95.0, 330.0)  # Earthformer keeps longitudes 95E-330E: 48 of the 72 grid columns


def _enso_open(path: Path) -> tuple[Any, Any, np.ndarray]:
    """(sst variable, handle, axis order to (year, month, lat, lon)); checks the variable's layout."""
    sst, dims, handle = read_netcdf_variable(path, "sst", "enso")
    try:
        if sorted(dims) != sorted(_ENSO_DIMS):
            raise ValueError(f"{path}: expected variable 'sst' with dimensions {_ENSO_DIMS} (any order), got {dims}")
        order = np.array([dims.index(d) for d in _ENSO_DIMS])
        if sst.shape[order[1]] != 36:
            raise ValueError(f"{path}: expected 36 months per record (dimension 'month'), got {sst.shape[order[1]]}")
        check_dtype(sst, str(path), "f", "float SST anomalies")
    except ValueError:
        close_netcdf(handle)
        raise
    return sst, handle, order


def _enso_lon(path: Path) -> np.ndarray:
    lon, _, handle = read_netcdf_variable(path, "lon", "enso")
    values = np.array(lon[...], dtype=np.float64)  # a copy: the file can close
    del lon
    close_netcdf(handle)
    return (values >= _ENSO_LON[0]) & (values <= _ENSO_LON[1])


def _enso_series(records: np.ndarray) -> np.ndarray:
    """Records (years, 36 months, ...) starting 12 months apart -> the continuous series (years * 12 + 24, ...)."""
    years = records.shape[0]
    months = np.arange(years * 12 + 24)
    record = np.minimum(months // 12, years - 1)
    return records[record, months - 12 * record]


def _generate_enso(path: str, models: list[tuple[int, int]], in_frames: int, length: int, sample_stride: int,
                   scale: int) -> Iterator[Example]:
    keep = _enso_lon(Path(path))
    sst, handle, order = _enso_open(Path(path))
    try:
        for offset, years in models:  # one climate model's records in memory at a time
            index = [slice(None)] * 4
            index[order[0]] = slice(offset, offset + years)  # only this model's records are read
            block = np.transpose(np.asarray(sst[tuple(index)]), order)[..., keep]  # (years, 36, lat, lon)
            check_finite(block, f"{path} sst records {offset}-{offset + years - 1}")
            series = _enso_series(block.astype(np.float32))  # (months, lat, lon)
            for start in range(0, len(series) - length + 1, sample_stride):
                clip = to_unit(series[start : start + length, None], ENSO_SST_RANGE)  # (T, 1, lat, lon)
                yield _example(_pool(clip, scale, path), in_frames)
    finally:
        del sst
        close_netcdf(handle)


def load_enso(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 12,
    out_frames: int = 14,
    sample_stride: int = 1,
    models: Sequence[Sequence[int]] = ((15, 151), (17, 140)),
    scale: int = 1,
    max_chunk: int | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """ICAR-ENSO monthly SST anomalies of CMIP6 and CMIP5 runs on a 24 x 48 grid, 12 -> 14 months (Earthformer).

    `CMIP_train.nc` holds 36-month records starting every 12 months, model after model; each model's records are
    folded back into one series (151 * 12 + 24 months for CMIP6), longitudes 95E-330E are kept, and values map
    to [0, 1] by Earthformer's (sst - min) / (max - min) with (min, max) = `ENSO_SST_RANGE`. Splits as
    Earthformer: the last model of the last group tests, the one before validates, all others train.

    Args:
        data_dir: folder holding `enso/CMIP_train.nc` (variable `sst` (year, month=36, lat=24, lon=72) float and
            coordinate `lon`; NetCDF-4/HDF5 read with h5py, or classic NetCDF-3 read with scipy).
        seed: unused.
        in_frames, out_frames: months per clip (Earthformer's own setting: 12 -> 26).
        sample_stride: months between clip starts (1: the 52,350 / 1,679 clips of the paper's Table 1;
            Earthformer trains with 10 and evaluates with 11).
        models: (number of models, years per model) of each group of records in file order (CMIP6, then CMIP5).
        scale, max_chunk, streaming, cache_dir: see `load_kitticaltech`.
    """
    _positive("enso", in_frames=in_frames, out_frames=out_frames, sample_stride=sample_stride, scale=scale)
    path = _folder("enso", data_dir, "enso", "CMIP_train.nc") / "CMIP_train.nc"
    groups = [(int(n), int(y)) for n, y in models]
    keep = _enso_lon(path)
    sst, handle, order = _enso_open(path)
    records, lat, lon = (int(sst.shape[order[i]]) for i in (0, 2, 3))
    del sst
    close_netcdf(handle)
    if len(keep) != lon:
        raise ValueError(f"{path}: coordinate 'lon' has {len(keep)} values, 'sst' has {lon} longitudes")
    if sum(n * y for n, y in groups) != records:
        raise ValueError(f"{path}: expected {sum(n * y for n, y in groups)} records (models={groups}), got {records}")
    spans, offset = [], 0
    for n, years in groups:
        for _ in range(n):
            spans.append((offset, years))
            offset += years
    if len(spans) < 3:
        raise ValueError(f"enso: models={groups} must name at least 3 models (train, validation, test)")
    length = in_frames + out_frames
    if min(y for _, y in spans) * 12 + 24 < length:
        raise ValueError(f"enso: a model's series is shorter than in_frames + out_frames = {length} months")
    common = {"path": str(path), "in_frames": in_frames, "length": length, "sample_stride": sample_stride,
              "scale": scale}
    generators = {
        split: (_generate_enso, {"models": chosen, **common})
        for split, chosen in (("train", spans[:-2]), ("validation", spans[-2:-1]), ("test", spans[-1:]))
    }
    shape = (1, lat // scale, int(keep.sum()) // scale)
    return build_splits("enso", generators, (in_frames, *shape), (out_frames, *shape), VERSION, cache_dir,
                        {"file": file_signature(path)}, max_chunk, streaming)


# ---------------------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "kitticaltech": (load_kitticaltech, "KITTI (PredNet/OpenSTL data_dir/kitti_hkl/*.hkl)", ()),
    "bair": (load_bair, "BAIR robot pushing (data_dir/softmotion30_44k/{train,test}/*.tfrecords)", ()),
    "human": (load_human, "Human3.6M (OpenSTL data_dir/human/{train,test}.txt + images/)", ()),
    "cityscapes": (load_cityscapes, "Cityscapes sequences (data_dir/cityscapes/leftImg8bit_sequence/)", ()),
    "sevir": (load_sevir, "SEVIR VIL (data_dir/sevir/CATALOG.csv + data/vil/<year>/*.h5)", RAIN_CSI_THRESHOLDS),
    "traffic4cast": (load_traffic4cast, "Traffic4Cast 2021 (data_dir/traffic4cast/<CITY>/training/*_8ch.h5)", ()),
    "enso": (load_enso, "ICAR-ENSO SST (data_dir/enso/CMIP_train.nc)", ()),
}

for _name, (_loader, _text, _thresholds) in _DESCRIPTIONS.items():
    register_task(
        TaskInfo(
            name=_name,
            spec=PAPER_TASKS[_name],
            discipline=PAPER_TASKS[_name].discipline,
            metrics=DEFAULT_METRICS + (("csi",) if _thresholds else ()),
            csi_thresholds=tuple(_thresholds),
            synthetic=False,
            loader=_loader,
            description=_text,
        )
    )
