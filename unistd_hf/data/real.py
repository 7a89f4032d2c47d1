"""Loaders for the files OpenSTL users already have, found under `data_dir` with OpenSTL's names.

- "mmnist": `data_dir/moving_mnist/mnist_test_seq.npy` (20, N, 64, 64) uint8, the fixed test set (first 10
  frames in, last 10 out); train and validation clips are generated, as OpenSTL does, by bouncing two digits
  of `data_dir/moving_mnist/train-images-idx3-ubyte[.gz]` (MNIST idx3) with a seeded random stream.
- "taxibj": `data_dir/taxibj/dataset.npz` with X_train, Y_train, X_test, Y_test of shape (N, T, 2, 32, 32),
  values in [-1, 1] mapped to [0, 1] by (x + 1) / 2 as OpenSTL; validation is the chronological tail of train.
- "kth": `data_dir/kth/<action>/<person??_action_d?_uncomp>/image_0001.png ...` (KTH frames as OpenSTL expects),
  grayscale, resized to `image_size`, persons 01-16 train and 17-25 test as OpenSTL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

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
    split_rng,
    to_unit,
)
from .paper_tasks import PAPER_TASKS
from .registry import TaskInfo, register_task
from .synthetic import CHUNK, mnist_file, read_idx_images, render_moving_digits

__all__ = ["KTH_ACTIONS", "load_kth", "load_mmnist", "load_taxibj"]

VERSION = "1"


def _need_data_dir(task: str, data_dir: str | None, layout: str) -> Path:
    if data_dir is None:
        raise ValueError(f"task {task!r} reads files: pass data_dir=<folder> holding {layout}")
    return Path(data_dir)


# ---------------------------------------------------------------------------------------------------------
# Moving MNIST


def _read_mmnist_test(path: Path) -> np.ndarray:
    """mnist_test_seq.npy as a checked, memory-mapped (20, N, 64, 64) uint8 array."""
    array = np.load(require_file(path, "Moving MNIST test set"), mmap_mode="r")
    check_shape(array, str(path), (20, None, 64, 64), "(frames, sequences, height, width)")
    check_dtype(array, str(path), "u", "uint8 (0-255)")
    return array


def _generate_mmnist_train(idx_path: str, seed: int, split: str, num_clips: int) -> Iterator[Example]:
    digits = read_idx_images(idx_path).astype(np.float32) / 255.0
    for chunk, begin in enumerate(range(0, num_clips, CHUNK)):
        count = min(CHUNK, num_clips - begin)
        clips = render_moving_digits(split_rng(seed, "mmnist", split, chunk), digits, count, 20, 2, 64)
        for clip in clips.astype(np.float16):
            yield {"inputs": clip[:10], "targets": clip[10:]}


def _generate_mmnist_test(path: str, num_clips: int) -> Iterator[Example]:
    array = _read_mmnist_test(Path(path))
    for i in range(num_clips):
        clip = (array[:, i, None].astype(np.float32) / 255.0).astype(np.float16)  # (20, 1, 64, 64)
        yield {"inputs": clip[:10], "targets": clip[10:]}


def load_mmnist(
    data_dir: str | None = None,
    seed: int = 0,
    num_train: int = 10000,
    num_validation: int = 1000,
    num_test: int | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Moving MNIST as in OpenSTL, 10 -> 10 frames of 1x64x64, values / 255.

    Args:
        data_dir: folder holding `moving_mnist/mnist_test_seq.npy` and `moving_mnist/train-images-idx3-ubyte[.gz]`.
        seed: seed of the generated train and validation clips.
        num_train, num_validation: generated clips (OpenSTL draws 10,000 fresh ones per epoch).
        num_test: first clips of the fixed test set to keep (default: all).
        cache_dir: where `datasets` stores the clips.
    """
    folder = _need_data_dir("mmnist", data_dir, "moving_mnist/mnist_test_seq.npy") / "moving_mnist"
    test_path = folder / "mnist_test_seq.npy"
    test = _read_mmnist_test(test_path)
    idx_path = mnist_file(folder)
    read_idx_images(idx_path)  # checks the magic number and size now
    available = test.shape[1]
    num_test = available if num_test is None else int(num_test)
    if not 1 <= num_test <= available:
        raise ValueError(f"num_test must be in [1, {available}] for {test_path}, got {num_test}")
    for name, count in (("num_train", num_train), ("num_validation", num_validation)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"mmnist: {name} must be a positive int, got {count!r}")
    generators = {
        "train": (
            _generate_mmnist_train,
            {"idx_path": str(idx_path), "seed": int(seed), "split": "train", "num_clips": num_train},
        ),
        "validation": (
            _generate_mmnist_train,
            {"idx_path": str(idx_path), "seed": int(seed), "split": "validation", "num_clips": num_validation},
        ),
        "test": (_generate_mmnist_test, {"path": str(test_path), "num_clips": num_test}),
    }
    key = {"idx": file_signature(idx_path), "test": file_signature(test_path)}
    return build_splits("mmnist", generators, (10, 1, 64, 64), (10, 1, 64, 64), VERSION, cache_dir, key)


# ---------------------------------------------------------------------------------------------------------
# TaxiBJ

_TAXIBJ_KEYS = ("X_train", "Y_train", "X_test", "Y_test")


def _read_taxibj(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of dataset.npz, checked: (N, T, 2, 32, 32), float, finite, in [-1, 1]."""
    with np.load(require_file(path, "TaxiBJ"), allow_pickle=False) as npz:
        missing = [k for k in _TAXIBJ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: expected arrays {list(_TAXIBJ_KEYS)}, missing {missing} (found {npz.files})")
        arrays = {k: npz[k] for k in _TAXIBJ_KEYS}
    for key, array in arrays.items():
        source = f"{path}[{key!r}]"
        check_shape(array, source, (None, None, 2, 32, 32), "(clips, frames, 2 flows, 32, 32)")
        check_dtype(array, source, "f", "float (in [-1, 1])")
        check_finite(array, source)
        if array.size and (array.min() < -1.0 - 1e-3 or array.max() > 1.0 + 1e-3):
            raise ValueError(f"{source}: expected values in [-1, 1], got [{array.min():.4g}, {array.max():.4g}]")
    for x, y in (("X_train", "Y_train"), ("X_test", "Y_test")):
        if len(arrays[x]) != len(arrays[y]):
            raise ValueError(f"{path}: {x} has {len(arrays[x])} clips but {y} has {len(arrays[y])}")
    if (
        arrays["X_train"].shape[1:] != arrays["X_test"].shape[1:]
        or arrays["Y_train"].shape[1:] != arrays["Y_test"].shape[1:]
    ):
        raise ValueError(f"{path}: train and test clips must have the same number of frames")
    return arrays


def _generate_taxibj(path: str, split: str, validation_fraction: float) -> Iterator[Example]:
    arrays = _read_taxibj(Path(path))
    x, y = (arrays["X_test"], arrays["Y_test"]) if split == "test" else (arrays["X_train"], arrays["Y_train"])
    if split != "test":
        cut = len(x) - _num_validation(len(x), validation_fraction)
        x, y = (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])
    for xi, yi in zip(x, y):
        yield {
            "inputs": to_unit(xi, (-1.0, 1.0)).astype(np.float16),
            "targets": to_unit(yi, (-1.0, 1.0)).astype(np.float16),
        }


def _num_validation(total: int, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    count = max(1, int(round(total * fraction)))
    if count >= total:
        raise ValueError(f"validation_fraction={fraction} leaves no training clips out of {total}")
    return count


def load_taxibj(
    data_dir: str | None = None, seed: int = 0, validation_fraction: float = 0.1, cache_dir: str | None = None
) -> datasets.DatasetDict:
    """TaxiBJ as in OpenSTL: in/out flows, 4 -> 4 frames of 2x32x32, (x + 1) / 2.

    Args:
        data_dir: folder holding `taxibj/dataset.npz` (X_train, Y_train, X_test, Y_test).
        seed: unused (the splits are chronological).
        validation_fraction: the last part of the training clips held out for validation (OpenSTL
            validates on the test set; set this small to stay close to its training set).
        cache_dir: where `datasets` stores the clips.
    """
    path = _need_data_dir("taxibj", data_dir, "taxibj/dataset.npz") / "taxibj" / "dataset.npz"
    arrays = _read_taxibj(path)
    _num_validation(len(arrays["X_train"]), validation_fraction)
    in_shape, out_shape = arrays["X_train"].shape[1:], arrays["Y_train"].shape[1:]
    generators = {
        split: (
            _generate_taxibj,
            {"path": str(path), "split": split, "validation_fraction": float(validation_fraction)},
        )
        for split in ("train", "validation", "test")
    }
    return build_splits("taxibj", generators, in_shape, out_shape, VERSION, cache_dir, {"file": file_signature(path)})


# ---------------------------------------------------------------------------------------------------------
# KTH

KTH_ACTIONS = ("boxing", "handclapping", "handwaving", "walking", "jogging", "running")
_KTH_FAST_ACTIONS = ("jogging", "running")  # OpenSTL starts a new window every 3 frames for these
_KTH_TRAIN_PERSONS = tuple(f"{i:02d}" for i in range(1, 17))
_KTH_TEST_PERSONS = tuple(f"{i:02d}" for i in range(17, 26))
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_PERSON = re.compile(r"person(\d+)")
_FRAME_NUMBER = re.compile(r"(\d+)$")


def _kth_sequences(root: Path) -> list[tuple[str, str, list[Path]]]:
    """(action, person, frame files sorted by number) for every sequence folder under `root`."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"KTH: expected a folder {root} with <action>/<personNN_action_dN_uncomp>/image_NNNN.png"
        )
    out = []
    for action_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for seq_dir in sorted(p for p in action_dir.iterdir() if p.is_dir()):
            match = _PERSON.search(seq_dir.name)
            if match is None:
                raise ValueError(f"KTH: sequence folder {seq_dir} must be named like person01_boxing_d1_uncomp")
            frames = []
            for file in seq_dir.iterdir():
                number = _FRAME_NUMBER.search(file.stem)
                if file.suffix.lower() in _IMAGE_SUFFIXES and number is not None:
                    frames.append((int(number.group(1)), file))
            frames.sort()
            out.append((action_dir.name, f"{int(match.group(1)):02d}", [f for _, f in frames]))
    if not out:
        raise FileNotFoundError(
            f"KTH: no sequence folders under {root} (expected <action>/<personNN_...>/image_NNNN.png)"
        )
    return out


def _kth_windows(
    sequences: list[tuple[str, str, list[Path]]],
    persons: Sequence[str],
    length: int,
    frame_stride: int,
    window_stride: int | None,
) -> list[list[Path]]:
    """Clips of `length` frames (every `frame_stride`-th image) from the sequences of `persons`."""
    windows = []
    for action, person, frames in sequences:
        if person not in persons:
            continue
        sampled = frames[::frame_stride]
        step = window_stride or (3 if action in _KTH_FAST_ACTIONS else length)
        windows += [sampled[i : i + length] for i in range(0, len(sampled) - length + 1, step)]
    return windows


def _read_frame(path: Path, size: int) -> np.ndarray:
    """One KTH frame: grayscale, resized (bilinear) to size x size, in [0, 1] (size, size) float32."""
    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((size, size), Image.BILINEAR)
    except OSError as error:
        raise ValueError(f"KTH: cannot read image {path}: {error}") from error
    return np.asarray(gray, dtype=np.float32) / 255.0


def _generate_kth(windows: list[list[str]], in_frames: int, image_size: int) -> Iterator[Example]:
    for window in windows:
        clip = np.stack([_read_frame(Path(p), image_size) for p in window])[:, None].astype(np.float16)  # (T, 1, S, S)
        yield {"inputs": clip[:in_frames], "targets": clip[in_frames:]}


def load_kth(
    data_dir: str | None = None,
    seed: int = 0,
    in_frames: int = 10,
    out_frames: int = 10,
    image_size: int = 128,
    frame_stride: int = 1,
    window_stride: int | None = None,
    validation_persons: Sequence[str] = ("16",),
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """KTH human actions as in OpenSTL: grayscale frames, 10 -> 10 at 128x128 by default (the paper's Table 1).

    Args:
        data_dir: folder holding `kth/<action>/<personNN_action_dN_uncomp>/image_NNNN.png` (any image format;
            the frame number is the trailing number of the file name).
        seed: unused (the splits are by person).
        in_frames, out_frames: frames per clip (the paper: 10 -> 10; OpenSTL: 10 -> 20, out_frames=20).
        image_size: side of the square frames after resizing (128 as OpenSTL, 64 for a lighter task).
        frame_stride: keep every `frame_stride`-th frame (temporal subsampling).
        window_stride: frames between the starts of two clips of a sequence; default as OpenSTL:
            `in_frames + out_frames` for boxing, handclapping, handwaving, walking and 3 for jogging, running.
        validation_persons: training persons (01-16) held out for validation; test persons are 17-25.
        cache_dir: where `datasets` stores the clips.
    """
    root = _need_data_dir("kth", data_dir, "kth/<action>/<person...>/image_NNNN.png") / "kth"
    for name, value in (
        ("in_frames", in_frames),
        ("out_frames", out_frames),
        ("image_size", image_size),
        ("frame_stride", frame_stride),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"kth: {name} must be a positive int, got {value!r}")
    validation_persons = tuple(f"{int(p):02d}" for p in validation_persons)
    if not set(validation_persons) <= set(_KTH_TRAIN_PERSONS) or not validation_persons:
        raise ValueError(f"kth: validation_persons must be a non-empty subset of {_KTH_TRAIN_PERSONS}")
    sequences = _kth_sequences(root)
    length = in_frames + out_frames
    persons = {
        "train": tuple(p for p in _KTH_TRAIN_PERSONS if p not in validation_persons),
        "validation": validation_persons,
        "test": _KTH_TEST_PERSONS,
    }
    generators, files_used = {}, set()
    for split, who in persons.items():
        windows = _kth_windows(sequences, who, length, frame_stride, window_stride)
        if not windows:
            raise ValueError(f"KTH: no {split} clip of {length} frames (persons {list(who)}) under {root}")
        files = [[str(p) for p in window] for window in windows]
        generators[split] = (_generate_kth, {"windows": files, "in_frames": in_frames, "image_size": image_size})
        files_used.update(p for window in windows for p in window)
    shape = (1, image_size, image_size)
    signature = Hasher.hash([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files_used)])
    return build_splits(
        "kth", generators, (in_frames, *shape), (out_frames, *shape), VERSION, cache_dir, {"files": signature}
    )


# ---------------------------------------------------------------------------------------------------------

for _info in (
    TaskInfo(
        name="mmnist",
        spec=PAPER_TASKS["mmnist"],
        discipline="trajectory",
        metrics=DEFAULT_METRICS,
        csi_thresholds=(),
        synthetic=False,
        loader=load_mmnist,
        description="Moving MNIST (OpenSTL files under data_dir/moving_mnist/)",
    ),
    TaskInfo(
        name="taxibj",
        spec=PAPER_TASKS["taxibj"],
        discipline="traffic",
        metrics=DEFAULT_METRICS,
        csi_thresholds=(),
        synthetic=False,
        loader=load_taxibj,
        description="TaxiBJ crowd flows (OpenSTL's data_dir/taxibj/dataset.npz)",
    ),
    TaskInfo(
        name="kth",
        spec=PAPER_TASKS["kth"],
        discipline="human motion",
        metrics=DEFAULT_METRICS,
        csi_thresholds=(),
        synthetic=False,
        loader=load_kth,
        description="KTH actions (frames under data_dir/kth/<action>/<person...>/)",
    ),
):
    register_task(_info)
