"""Generic loaders: any array file of clips ("array") and any `datasets` dataset with a video column ("hf_video").

Both cut each sequence into `in_frames` observed and `out_frames` predicted frames and map values to [0, 1]:
`value_range=None` divides uint8 by 255 and requires floats to be in [0, 1] already; `value_range=(low, high)`
maps [low, high] linearly to [0, 1] (values outside are clipped); "array" also accepts `value_range="minmax"`
(the array's own minimum and maximum).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.fingerprint import Hasher

from ..metrics import DEFAULT_METRICS
from .builder import (
    Example,
    build_splits,
    check_dtype,
    check_finite,
    clip_features,
    file_signature,
    require_file,
    to_unit,
)
from .registry import TaskInfo, register_task

__all__ = ["LAYOUTS", "load_array", "load_hf_video"]

VERSION = "1"
LAYOUTS = ("TCHW", "THWC", "THW")
ValueRange = tuple[float, float] | str | None


def _check_frames(in_frames: int, out_frames: int) -> None:
    for name, value in (("in_frames", in_frames), ("out_frames", out_frames)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (frames per clip), got {value!r}")


def _resolve_range(array: np.ndarray, value_range: ValueRange, source: str) -> tuple[float, float]:
    """The (low, high) that maps `array` to [0, 1], after checking it makes sense for the data."""
    if value_range == "minmax":
        low, high = float(np.min(array)), float(np.max(array))
        return (low, high) if high > low else (low, low + 1.0)
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        return low, high
    if array.dtype == np.uint8:
        return 0.0, 255.0
    if array.dtype.kind != "f":
        raise ValueError(
            f"{source}: {array.dtype} values need value_range=(low, high) or 'minmax' to map them to [0, 1]"
        )
    if array.size and (np.min(array) < 0.0 or np.max(array) > 1.0):
        raise ValueError(
            f"{source}: expected float values in [0, 1] (or pass value_range=(low, high) or 'minmax'), "
            f"got [{np.min(array):.4g}, {np.max(array):.4g}]"
        )
    return 0.0, 1.0


def _split_indices(
    count: int, seed: int, validation_fraction: float, test_fraction: float, what: str
) -> dict[str, list[int]]:
    """A seeded random partition of range(count) into train / validation / test (each non-empty)."""
    if not (
        0.0 < validation_fraction < 1.0 and 0.0 < test_fraction < 1.0 and validation_fraction + test_fraction < 1.0
    ):
        raise ValueError(
            "validation_fraction and test_fraction must be in (0, 1) with a sum below 1, "
            f"got {validation_fraction}, {test_fraction}"
        )
    n_val, n_test = max(1, round(count * validation_fraction)), max(1, round(count * test_fraction))
    if count - n_val - n_test < 1:
        raise ValueError(f"{what}: {count} sequence(s) are too few for train, validation and test splits")
    order = np.random.default_rng(seed).permutation(count).tolist()
    return {
        "train": sorted(order[n_test + n_val :]),
        "validation": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


# ---------------------------------------------------------------------------------------------------------
# arrays


def _open_array(path: Path, key: str | None) -> np.ndarray:
    """The (N, T, C, H, W) or (N, T, H, W) array in a .npy file, or under `key` in a .npz file."""
    require_file(path, "array task")
    try:
        return _read_array(path, key)
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable {path.suffix} array (empty or truncated?): {error}") from error
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"{path}: not a readable {path.suffix} array (empty or truncated?): {error}") from error


def _read_array(path: Path, key: str | None) -> np.ndarray:
    if path.suffix == ".npy":
        if key is not None:
            raise ValueError(f"{path}: key={key!r} only applies to .npz files")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected a .npy or .npz file")
    with np.load(path, allow_pickle=False) as npz:
        if key is None:
            if len(npz.files) != 1:
                raise ValueError(f"{path}: holds arrays {npz.files}; choose one with key=")
            key = npz.files[0]
        if key not in npz.files:
            raise ValueError(f"{path}: expected an array named {key!r}, found {npz.files}")
        return npz[key]


def _checked_array(path: Path, key: str | None, length: int) -> np.ndarray:
    array = _open_array(path, key)
    source = f"{path}" + (f"[{key!r}]" if key else "")
    if array.ndim not in (4, 5):
        raise ValueError(f"{source}: expected an array of shape (N, T, C, H, W) or (N, T, H, W), got {array.shape}")
    check_dtype(array, source, "uif", "numeric (uint8, int or float)")
    check_finite(array, source)
    if array.shape[1] < length:
        raise ValueError(
            f"{source}: expected at least in_frames + out_frames = {length} frames (axis 1), got {array.shape[1]}"
        )
    return array if array.ndim == 5 else array[:, :, None]


def _generate_array(
    path: str,
    key: str | None,
    indices: list[int],
    in_frames: int,
    out_frames: int,
    window_stride: int | None,
    value_range: tuple[float, float],
) -> Iterator[Example]:
    array = _checked_array(Path(path), key, in_frames + out_frames)
    length = in_frames + out_frames
    for i in indices:
        sequence = array[i]  # (T, C, H, W)
        starts = range(0, sequence.shape[0] - length + 1, window_stride) if window_stride else [0]
        for start in starts:
            clip = to_unit(sequence[start : start + length], value_range).astype(np.float16)
            yield {"inputs": clip[:in_frames], "targets": clip[in_frames:]}


def load_array(
    data_dir: str | None = None,
    seed: int = 0,
    path: str | None = None,
    in_frames: int | None = None,
    out_frames: int | None = None,
    key: str | None = None,
    value_range: ValueRange = None,
    window_stride: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Clips from a .npy / .npz array of sequences (N, T, C, H, W), or (N, T, H, W) for one channel.

    Args:
        data_dir: if given, a relative `path` is taken inside it.
        seed: seed of the random split of the N sequences into train / validation / test.
        path: the .npy or .npz file.
        in_frames, out_frames: observed and predicted frames; a sequence needs in_frames + out_frames of them.
        key: the array's name inside a .npz holding several.
        value_range: how values map to [0, 1] (see the module doc).
        window_stride: None takes the first in_frames + out_frames frames of each sequence; an int cuts every
            window starting each `window_stride` frames (windows of one sequence stay in one split).
        validation_fraction, test_fraction: shares of the sequences in validation and test.
        cache_dir: where `datasets` stores the clips.
    """
    if path is None or in_frames is None or out_frames is None:
        raise ValueError("task 'array' needs path=, in_frames= and out_frames=")
    _check_frames(in_frames, out_frames)
    if window_stride is not None and (not isinstance(window_stride, int) or window_stride < 1):
        raise ValueError(f"window_stride must be None or a positive int, got {window_stride!r}")
    file = Path(path) if data_dir is None or Path(path).is_absolute() else Path(data_dir) / path
    array = _checked_array(file, key, in_frames + out_frames)
    low, high = _resolve_range(array, value_range, str(file))
    splits = _split_indices(len(array), seed, validation_fraction, test_fraction, str(file))
    _, _, C, H, W = array.shape
    common = {
        "path": str(file.resolve()),
        "key": key,
        "in_frames": in_frames,
        "out_frames": out_frames,
        "window_stride": window_stride,
        "value_range": (low, high),
    }
    generators = {split: (_generate_array, {**common, "indices": idx}) for split, idx in splits.items()}
    return build_splits(
        "array",
        generators,
        (in_frames, C, H, W),
        (out_frames, C, H, W),
        VERSION,
        cache_dir,
        {"file": file_signature(file)},
    )


# ---------------------------------------------------------------------------------------------------------
# datasets with a video column


def _column_kind(feature: Any, column: str) -> tuple[str, str | None]:
    """("images" | "arrays", declared numpy dtype or None) of a video column, from its `datasets` feature.

    The declared dtype matters because the numpy formatter of `datasets` returns nested-list and Array3D integers as
    int64: a uint8 column must still be divided by 255, as the docs say.
    """
    inner = feature
    while isinstance(inner, (datasets.List, datasets.LargeList, datasets.Sequence)):
        inner = inner.feature
    if isinstance(inner, datasets.Image):
        return "images", None
    if isinstance(inner, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D, datasets.Value)):
        dtype = str(inner.dtype)
        if dtype.startswith(("int", "uint", "float")):
            return "arrays", dtype
    raise ValueError(
        f"hf_video: column {column!r} holds {feature}; expected one video per example as nested lists of numbers, "
        "an Array3D/Array4D feature, or a list of images (decode other video features to frames first)"
    )


def _detect_layout(shape: tuple[int, ...], column: str) -> str:
    """The layout of one video array: 3 axes are THW; of 4, the channel axis is the shorter of axes 1 and 3."""
    if len(shape) == 3:
        return "THW"
    if len(shape) == 4 and shape[1] != shape[3]:
        return "TCHW" if shape[1] < shape[3] else "THWC"
    if len(shape) == 4:
        raise ValueError(
            f"hf_video: column {column!r}: cannot tell the layout of a video of shape {shape} (axes 1 and 3 are both "
            f"{shape[1]} long); pass layout='TCHW' or layout='THWC'"
        )
    raise ValueError(
        f"hf_video: column {column!r}: expected one video per example with 3 axes (T, H, W) or 4 axes (T, C, H, W) / "
        f"(T, H, W, C), got shape {shape}"
    )


def _as_frames(value: Any, layout: str | None, dtype: str | None = None) -> np.ndarray:
    """One video as a (T, C, H, W) array: from an array-like in `layout` (None: detected), or a list of images.

    Images ("L" grey, "RGB", ...) are read as (T, H, W) or (T, H, W, C), whatever `layout` says. `dtype` is the
    column's declared dtype: integers that the numpy formatter widened to int64 are narrowed back to it.
    """
    if isinstance(value, (list, tuple)) and value and hasattr(value[0], "convert"):  # PIL images, unformatted
        sizes = {image.size for image in value}
        if len(sizes) != 1:
            raise ValueError(f"expected images of one size, got sizes {sorted(sizes)}")
        value = np.stack([np.asarray(image) for image in value])
        layout = "THWC" if value.ndim == 4 else "THW"
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"expected frames of one shape (a regular array), got ragged frames of {len(array)} items")
    if layout is None:
        layout = _detect_layout(array.shape, "video")
    if array.ndim != len(layout):
        raise ValueError(f"expected a video of layout {layout} ({len(layout)} axes), got shape {array.shape}")
    if dtype is not None and array.dtype != np.dtype(dtype) and array.dtype.kind in "iu" and np.dtype(dtype).kind in "iu":
        info = np.iinfo(np.dtype(dtype))
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"values [{array.min()}, {array.max()}] do not fit the declared dtype {dtype}")
        array = array.astype(dtype)
    if layout == "THWC":
        array = array.transpose(0, 3, 1, 2)
    elif layout == "THW":
        array = array[:, None]
    return array


def _video_to_clip(
    batch: dict[str, list],
    indices: list[int],
    column: str,
    in_frames: int,
    out_frames: int,
    layout: str,
    value_range: tuple[float, float] | None,
    frame_shape: tuple[int, int, int],
    dtype: str | None = None,
) -> dict[str, list[np.ndarray]]:
    inputs, targets = [], []
    for index, value in zip(indices, batch[column]):
        source = f"example {index}, column {column!r}"
        try:
            video = _as_frames(value, layout, dtype)
        except ValueError as error:
            raise ValueError(f"hf_video: {source}: {error}") from None
        check_dtype(video, source, "uif", "numeric (uint8, int or float)")
        check_finite(video, source)
        if video.shape[0] < in_frames + out_frames or video.shape[1:] != frame_shape:
            raise ValueError(
                f"{source}: expected at least {in_frames + out_frames} frames of (C, H, W) = {frame_shape} "
                f"(layout {layout}), got {video.shape}"
            )
        if value_range is None and video.dtype.kind in "iu" and video.dtype != np.uint8:
            raise ValueError(f"hf_video: {source}: {video.dtype} values need value_range=(low, high) to map them to "
                             "[0, 1] (only uint8 is divided by 255 by itself)")
        low, high = _resolve_range(video, value_range, source)
        clip = to_unit(video[: in_frames + out_frames], (low, high)).astype(np.float16)
        inputs.append(clip[:in_frames])
        targets.append(clip[in_frames:])
    return {"inputs": inputs, "targets": targets}


def _source_splits(
    dataset: datasets.Dataset | datasets.DatasetDict, seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, datasets.Dataset]:
    """train / validation / test of the source: its own splits where it has them, else seeded random ones."""
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"a DatasetDict needs a 'train' split, got {list(dataset)}")
        splits = dict(dataset)
        if "test" not in splits:
            cut = splits["train"].train_test_split(test_size=test_fraction, seed=seed)
            splits["train"], splits["test"] = cut["train"], cut["test"]
        if "validation" not in splits:
            cut = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
            splits["train"], splits["validation"] = cut["train"], cut["test"]
        return {name: splits[name] for name in ("train", "validation", "test")}
    indices = _split_indices(len(dataset), seed, validation_fraction, test_fraction, "hf_video dataset")
    return {name: dataset.select(idx) for name, idx in indices.items()}


def load_hf_video(
    data_dir: str | None = None,
    seed: int = 0,
    dataset: datasets.Dataset | datasets.DatasetDict | str | None = None,
    column: str = "video",
    in_frames: int | None = None,
    out_frames: int | None = None,
    layout: str | None = None,
    value_range: tuple[float, float] | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Clips from a `datasets` dataset whose `column` holds one video per example.

    Args:
        data_dir: unused.
        seed: seed of the random splits made when the source lacks "validation" or "test".
        dataset: a `Dataset`, a `DatasetDict` (its "train" / "validation" / "test" splits are kept), or the path
            of a folder written by `save_to_disk`.
        column: the video column: arrays (nested lists, `Array4D`/`Array3D`, numpy; uint8 is divided by 255) or
            lists of PIL images (grey "L" as one channel, "RGB" as three).
        in_frames, out_frames: observed and predicted frames (the first in_frames + out_frames are used).
        layout: axes of the arrays, "TCHW", "THWC" or "THW"; None detects it: 3 axes are THW, of 4 the channel axis
            is the shorter of axes 1 and 3 (equal lengths raise, asking for `layout`). Images are always detected.
        value_range: how values map to [0, 1] (see the module doc).
        validation_fraction, test_fraction: shares used when a split must be made.
        cache_dir: folder for the converted arrow files (default: next to the source's cache files, or in
            memory for an in-memory source); a second call with the same source and options reuses them.
    """
    if dataset is None or in_frames is None or out_frames is None:
        raise ValueError("task 'hf_video' needs dataset=, in_frames= and out_frames=")
    _check_frames(in_frames, out_frames)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be None (detect) or one of {LAYOUTS}, got {layout!r}")
    if isinstance(dataset, (str, Path)):
        if not Path(dataset).is_dir():
            raise FileNotFoundError(f"hf_video: expected a folder written by Dataset.save_to_disk at {dataset}")
        dataset = datasets.load_from_disk(str(dataset))
    if not isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        raise ValueError(
            f"dataset must be a datasets.Dataset, DatasetDict or a save_to_disk folder, got {type(dataset).__name__}"
        )
    sources = _source_splits(dataset, seed, validation_fraction, test_fraction)
    for name, source in sources.items():
        if column not in source.column_names:
            raise ValueError(f"hf_video: split {name!r} has no column {column!r}; columns: {source.column_names}")
        if len(source) == 0:
            raise ValueError(f"hf_video: split {name!r} is empty")
    kind, dtype = _column_kind(sources["train"].features[column], column)
    raw = np.asarray(sources["train"].with_format("numpy")[0][column])
    if kind == "images":
        layout = "THWC" if raw.ndim == 4 else "THW"  # what decoded images are, whatever `layout` says
    elif layout is None:
        layout = _detect_layout(raw.shape, column)
    try:
        first = _as_frames(raw, layout, dtype)
    except ValueError as error:
        raise ValueError(f"hf_video: example 0 of split 'train', column {column!r}: {error}") from None
    frame_shape = tuple(int(s) for s in first.shape[1:])
    features = clip_features((in_frames, *frame_shape), (out_frames, *frame_shape))
    fn_kwargs = {
        "column": column,
        "in_frames": in_frames,
        "out_frames": out_frames,
        "layout": layout,
        "value_range": None if value_range is None else tuple(float(v) for v in value_range),
        "frame_shape": frame_shape,
        "dtype": dtype,
    }
    out = {}
    for name, source in sources.items():
        fingerprint = Hasher.hash({"version": VERSION, "source": source._fingerprint, "split": name, **fn_kwargs})
        cache_file = None if cache_dir is None else str(Path(cache_dir) / f"hf_video-{fingerprint}.arrow")
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        out[name] = source.with_format("numpy", columns=[column]).map(
            _video_to_clip,
            with_indices=True,
            batched=True,
            batch_size=16,
            fn_kwargs=fn_kwargs,
            remove_columns=source.column_names,
            features=features,
            cache_file_name=cache_file,
            new_fingerprint=fingerprint,
            desc=f"hf_video ({name})",
        )
    return datasets.DatasetDict(out).with_format("torch")


for _info in (
    TaskInfo(
        name="array",
        spec=None,
        discipline="generic",
        metrics=DEFAULT_METRICS,
        csi_thresholds=(),
        synthetic=False,
        loader=load_array,
        description="any .npy/.npz array of sequences (N, T, C, H, W): path=, in_frames=, out_frames=",
    ),
    TaskInfo(
        name="hf_video",
        spec=None,
        discipline="generic",
        metrics=DEFAULT_METRICS,
        csi_thresholds=(),
        synthetic=False,
        loader=load_hf_video,
        description="any datasets dataset with a video column: dataset=, column=, in_frames=, out_frames=",
    ),
):
    register_task(_info)
