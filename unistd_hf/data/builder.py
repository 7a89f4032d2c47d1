"""Shared plumbing of the loaders: clip features, cached `datasets` builds, and input-file checks."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

__all__ = [
    "SPLITS",
    "build_splits",
    "check_dtype",
    "check_finite",
    "check_shape",
    "clip_features",
    "file_signature",
    "require_file",
    "split_rng",
    "to_unit",
]

SPLITS = ("train", "validation", "test")
STORAGE_DTYPE = "float16"
CHUNK_BYTES = 256 * 2**20  # default memory budget of the clips held before `datasets` writes them
MAX_CHUNK = 1000  # `datasets`' own default writer batch (rows)

Example = dict[str, np.ndarray]


def clip_features(in_shape: Sequence[int], out_shape: Sequence[int]) -> datasets.Features:
    """Fixed-shape float16 columns `inputs` (T, C, H, W) and `targets` (T', C, H, W)."""
    return datasets.Features(
        {
            "inputs": datasets.Array4D(shape=tuple(int(s) for s in in_shape), dtype=STORAGE_DTYPE),
            "targets": datasets.Array4D(shape=tuple(int(s) for s in out_shape), dtype=STORAGE_DTYPE),
        }
    )


def split_rng(seed: int, *key: int | str) -> np.random.Generator:
    """An independent, reproducible random stream for (seed, key...), e.g. (seed, task, split, chunk)."""
    spawn_key = tuple(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key)
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=spawn_key))


def file_signature(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a file's content cheaply (path, size, mtime); part of every cache key built from files."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_splits(
    task: str,
    generators: dict[str, tuple[Callable[..., Iterator[Example]], dict[str, Any]]],
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    version: str,
    cache_dir: str | None = None,
    cache_key: dict[str, Any] | None = None,
    max_chunk: int | None = None,
    streaming: bool = False,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Build (or reuse from the `datasets` cache) one split per `generators[split] = (fn, kwargs)`.

    The cache key is a hash of the task, its generator `version` (bump it when the generating code changes),
    the split, the generator's kwargs and `cache_key` (e.g. file signatures): `datasets` skips generation
    when a build with that key already exists under `cache_dir`.

    Memory: the generators read one clip at a time, and `datasets` holds at most `max_chunk` clips (its
    `writer_batch_size`) before writing them to disk, so a split larger than memory builds with about
    `max_chunk` clips in memory. Default: as many clips as fit in `CHUNK_BYTES` (256 MiB), at most 1,000
    (e.g. 36 SEVIR clips of 25 x 384 x 384). `streaming=True` writes nothing: it returns an
    `IterableDatasetDict` whose splits read the files again on every pass.
    """
    features = clip_features(in_shape, out_shape)
    if max_chunk is not None and (not isinstance(max_chunk, int) or max_chunk < 1):
        raise ValueError(f"max_chunk must be None or a positive int (clips held before writing), got {max_chunk!r}")
    if max_chunk is None:
        clip_bytes = 2 * (int(np.prod(in_shape)) + int(np.prod(out_shape)))  # float16
        max_chunk = max(1, min(MAX_CHUNK, CHUNK_BYTES // clip_bytes))
    # a list in gen_kwargs would be read by `datasets` as shards to split between processes: pass tuples
    generators = {
        split: (generator, {k: tuple(v) if isinstance(v, list) else v for k, v in gen_kwargs.items()})
        for split, (generator, gen_kwargs) in generators.items()
    }
    if streaming:
        return datasets.IterableDatasetDict(
            {
                split: datasets.IterableDataset.from_generator(
                    generator, features=features, gen_kwargs=gen_kwargs, split=datasets.NamedSplit(split)
                )
                for split, (generator, gen_kwargs) in generators.items()
            }
        ).with_format("torch")
    out = {}
    for split, (generator, gen_kwargs) in generators.items():
        fingerprint = Hasher.hash(
            {
                "task": task,
                "version": version,
                "split": split,
                "gen_kwargs": gen_kwargs,
                "key": cache_key or {},
                "features": features.to_dict(),
            }
        )
        try:
            out[split] = datasets.Dataset.from_generator(
                generator,
                features=features,
                cache_dir=cache_dir,
                gen_kwargs=gen_kwargs,
                split=datasets.NamedSplit(split),
                fingerprint=fingerprint,
                writer_batch_size=max_chunk,
            )
        except DatasetGenerationError as error:
            if isinstance(error.__cause__, (ValueError, OSError)):  # a bad input file: show our message, not a wrapper
                raise error.__cause__ from None
            raise
    return datasets.DatasetDict(out).with_format("torch")


def to_unit(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Map values linearly from `value_range` to [0, 1] (float32), clipping what falls outside."""
    low, high = value_range
    return np.clip((np.asarray(array, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def require_file(path: str | os.PathLike, what: str) -> Path:
    """The path if it is a file, else a FileNotFoundError saying what was expected there."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected a file at {path}, found none")
    return path


def check_shape(array: np.ndarray, source: str, expected: Sequence[int | None], layout: str) -> None:
    """Raise ValueError unless `array.shape` matches `expected` (None = any size), naming the layout."""
    ok = array.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, array.shape))
    if not ok:
        wanted = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{source}: expected an array of shape {layout} = {wanted}, got {tuple(array.shape)}")


def check_dtype(array: np.ndarray, source: str, kinds: str, expected: str) -> None:
    """Raise ValueError unless the dtype kind is in `kinds` ("u" unsigned, "i" int, "f" float)."""
    if array.dtype.kind not in kinds:
        raise ValueError(f"{source}: expected {expected} values, got dtype {array.dtype}")


def check_finite(array: np.ndarray, source: str) -> None:
    """Raise ValueError if a float array holds NaN or infinity."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"{source}: expected finite values, found {bad} NaN or infinite value(s)")
