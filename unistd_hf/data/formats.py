"""Readers of the published file formats (HDF5/hickle, TFRecord, NetCDF), lazy and without pickle.

Optional libraries (h5py, tfrecord) are imported on first use; a missing one raises an ImportError that names the
extra to install (`pip install "unistd-hf[data]"`).
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "DATA_EXTRA",
    "iter_tfrecord_examples",
    "open_hdf5",
    "read_hickle_array",
    "read_hickle_strings",
    "close_netcdf",
    "read_netcdf_variable",
    "require",
]

DATA_EXTRA = 'pip install "unistd-hf[data]"'
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NETCDF3_MAGIC = (b"CDF\x01", b"CDF\x02")


def require(module: str, task: str) -> ModuleType:
    """Import an optional library, or raise ImportError naming the task and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"task {task!r} needs the optional library {module!r}: {DATA_EXTRA}") from error


def open_hdf5(path: Path, task: str, what: str) -> Any:
    """An open read-only `h5py.File`; a missing, truncated or non-HDF5 file raises an error naming it."""
    h5py = require("h5py", task)
    if not path.is_file():
        raise FileNotFoundError(f"{task}: expected {what} at {path}, found none")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: expected a readable HDF5 file ({what}), but it cannot be opened: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# hickle (.hkl): HDF5 files written by the hickle package. PredNet's files come from hickle 2/3, which store the
# dumped object as the dataset `/data_0`; hickle 4/5 store it as `/data`. A list of strings is one dataset of
# byte strings in hickle 2/3 and a group of one dataset per item (`data0`, `data1`, ...) in hickle 4/5.


def _hickle_payload(h5: Any, path: Path) -> Any:
    for name in ("data_0", "data"):
        if name in h5:
            return h5[name]
    raise ValueError(f"{path}: expected a hickle file holding '/data_0' (hickle 2/3) or '/data' (hickle 4/5), "
                     f"found {sorted(h5.keys())}")


def read_hickle_array(h5: Any, path: Path) -> Any:
    """The array a hickle file holds, as a lazy `h5py.Dataset` (slice it to read)."""
    payload = _hickle_payload(h5, path)
    if not hasattr(payload, "shape"):
        raise ValueError(f"{path}: expected a hickle-dumped numpy array, found a group {payload.name}")
    return payload


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf8")
    if isinstance(value, np.ndarray):  # hickle 4/5: a (1, n) array of single bytes
        return b"".join(value.reshape(-1).tolist()).decode("utf8") if value.dtype.kind == "S" else str(value)
    return str(value)


def read_hickle_strings(h5: Any, path: Path) -> list[str]:
    """The list of strings a hickle file holds (hickle 2/3 or 4/5 layout)."""
    payload = _hickle_payload(h5, path)
    if hasattr(payload, "shape"):
        if payload.ndim != 1 or payload.dtype.kind not in "SOU":
            raise ValueError(
                f"{path}: expected a list of strings, got a {payload.dtype} array of shape {payload.shape}"
            )
        return [_as_text(v) for v in payload[()]]
    items = sorted(payload.keys(), key=lambda k: int(re.sub(r"\D", "", k) or 0))
    return [_as_text(payload[k][()]) for k in items]


# ---------------------------------------------------------------------------------------------------------
# TFRecord: records framed as (uint64 length, uint32 crc, bytes, uint32 crc), each a tf.train.Example protobuf.


def iter_tfrecord_examples(path: Path, task: str) -> Iterator[dict[str, Any]]:
    """The features of each tf.train.Example in a .tfrecords file, one record at a time (no TensorFlow).

    Values: bytes features as a list of bytes, float/int64 features as numpy arrays.
    """
    reader = require("tfrecord", task)
    example_pb2 = importlib.import_module("tfrecord.example_pb2")
    index = 0
    try:
        for record in reader.tfrecord_iterator(str(path)):
            example = example_pb2.Example()
            example.ParseFromString(bytes(record))
            features = {}
            for key, feature in example.features.feature.items():
                kind = feature.WhichOneof("kind")
                values = getattr(feature, kind).value if kind else []
                features[key] = list(values) if kind == "bytes_list" else np.asarray(values)
            yield features
            index += 1
    except (RuntimeError, OSError) as error:  # the tfrecord package raises RuntimeError on a short read
        raise ValueError(
            f"{path}: expected TFRecord framing, record {index} is truncated or corrupt ({error})"
        ) from None
    except Exception as error:  # protobuf's DecodeError
        if type(error).__name__ != "DecodeError":
            raise
        raise ValueError(f"{path}: record {index} is not a tf.train.Example protobuf ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# NetCDF: NetCDF-4 files are HDF5 (read with h5py, variables are datasets, dimensions are dimension scales);
# classic NetCDF-3 files are read with scipy (memory-mapped).


def _hdf5_dims(dataset: Any) -> tuple[str, ...]:
    names = []
    for i, dim in enumerate(dataset.dims):
        names.append(dim[0].name.rsplit("/", 1)[-1] if len(dim) else f"dim{i}")
    return tuple(names)


def read_netcdf_variable(path: Path, name: str, task: str) -> tuple[np.ndarray | Any, tuple[str, ...], Any]:
    """(lazy array, dimension names, handle to close) of variable `name` in a NetCDF-3 or NetCDF-4 file."""
    if not path.is_file():
        raise FileNotFoundError(f"{task}: expected a NetCDF file at {path}, found none")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:4] in _NETCDF3_MAGIC:
        from scipy.io import netcdf_file

        handle = netcdf_file(str(path), "r", mmap=True)
        if name not in handle.variables:
            raise ValueError(f"{path}: expected a variable {name!r}, found {sorted(handle.variables)}")
        variable = handle.variables[name]
        return variable.data, tuple(variable.dimensions), handle
    if magic != _HDF5_MAGIC:
        raise ValueError(f"{path}: expected a NetCDF file (NetCDF-3 'CDF' or NetCDF-4/HDF5 signature), got {magic!r}")
    handle = open_hdf5(path, task, "a NetCDF-4 file")
    if name not in handle:
        keys = sorted(handle.keys())
        handle.close()
        raise ValueError(f"{path}: expected a variable {name!r}, found {keys}")
    return handle[name], _hdf5_dims(handle[name]), handle


def close_netcdf(handle: Any) -> None:
    """Close a handle of `read_netcdf_variable`. A memory-mapped NetCDF-3 file whose arrays are still referenced
    somewhere warns that it cannot unmap yet; the map is released with the last array, so that warning is muted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot close a netcdf_file opened with mmap=True")
        handle.close()
