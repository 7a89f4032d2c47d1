"""The task registry: a name -> `TaskInfo` table, and `load_task`, the one entry point to every data set."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from ..configuration_unistd import TaskSpec

__all__ = ["TaskInfo", "get_task", "list_tasks", "load_task", "register_task", "spec_for"]


@dataclass(frozen=True)
class TaskInfo:
    """What the rest of the library needs to know about a task.

    Args:
        name: registry name, also the `TaskSpec.name` of the data the loader returns.
        spec: the shapes with the loader's default options; None when the data decides (generic loaders).
            Use `spec_for(name, dataset)` to get the spec of data loaded with other options.
        discipline: "trajectory", "traffic", "weather", "driving", "robot action", "human motion" or "generic".
        metrics: metric names for `unistd_hf.metrics.MetricAccumulator`.
        csi_thresholds: CSI thresholds in [0, 1] (empty if CSI is not meaningful for the task).
        synthetic: True when generated locally (no files needed).
        loader: `loader(data_dir=None, seed=0, **options) -> DatasetDict`.
        description: one line for listings.
    """

    name: str
    spec: TaskSpec | None
    discipline: str
    metrics: tuple[str, ...]
    csi_thresholds: tuple[float, ...]
    synthetic: bool
    loader: Callable[..., datasets.DatasetDict]
    description: str = ""


_TASKS: dict[str, TaskInfo] = {}


def register_task(info: TaskInfo) -> TaskInfo:
    """Add a task to the registry (a name may be registered once)."""
    if info.name in _TASKS:
        raise ValueError(f"task {info.name!r} is already registered")
    _TASKS[info.name] = info
    return info


def list_tasks(synthetic: bool | None = None) -> list[str]:
    """Registered task names, sorted; `synthetic=True/False` keeps only generated / file-based ones."""
    return sorted(name for name, info in _TASKS.items() if synthetic is None or info.synthetic == synthetic)


def get_task(name: str) -> TaskInfo:
    """The `TaskInfo` of a registered task."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {list_tasks()}")
    return _TASKS[name]


def load_task(name: str, data_dir: str | None = None, seed: int = 0, **options) -> datasets.DatasetDict:
    """Load a task as a `DatasetDict` with splits "train", "validation", "test".

    Each split has columns `inputs` (T, C, H, W) and `targets` (T', C, H, W), stored as float16 in [0, 1]
    and returned in torch format: `ds["train"][0]["inputs"]` is a float32 tensor in [0, 1] (the torch formatter of
    `datasets` widens float16; docs/DATA.md's example prints the dtype and tests/test_docs.py checks it).
    Results are cached by `datasets` (pass `cache_dir=` to choose where); the same name, seed, options and
    input files load from the cache instead of being built again.

    Args:
        name: a name from `list_tasks()`.
        data_dir: the folder holding the data sets' files in their published layouts (`moving_mnist/`, `taxibj/`,
            `kth/`, `kitti_hkl/`, `softmotion30_44k/`, `human/`, `cityscapes/`, `sevir/`, `traffic4cast/`, `enso/`;
            see docs/DATA.md); unused by synthetic and generic tasks.
        seed: seed of every random choice (synthetic clips, generated training clips, random splits).
        options: task-specific options; see the loader's docstring (`get_task(name).loader`) or docs/DATA.md.
    """
    info = get_task(name)
    accepted = [p for p in inspect.signature(info.loader).parameters if p not in ("data_dir", "seed")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} does not accept option(s) {unknown}; accepted options: {accepted}")
    return info.loader(data_dir=data_dir, seed=seed, **options)


def spec_for(name: str, dataset: datasets.DatasetDict | datasets.Dataset, discipline: str | None = None) -> TaskSpec:
    """The `TaskSpec` of loaded data: shapes read from its features, the rest from the registry.

    Use this instead of `get_task(name).spec` when a loader's options change the shapes (e.g. KTH's
    `image_size`, or the generic "array" and "hf_video" loaders). Frames of the registered size keep the registered
    encoder depth (`PAPER_TASKS`: the paper's Table 8); other frames of 64 pixels or less get 2 stride-2 encoder
    blocks, larger ones 3 (a 16x16 token grid for 128x128), fewer when the size is not divisible.
    """
    split = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    in_shape = split.features["inputs"].shape
    out_shape = split.features["targets"].shape
    if in_shape[1:] != out_shape[1:]:
        raise ValueError(f"inputs {in_shape} and targets {out_shape} must share (C, H, W)")
    info = _TASKS.get(name)
    T, C, H, W = in_shape
    if info is not None and info.spec is not None and (info.spec.height, info.spec.width) == (H, W):
        wanted = info.spec.num_downsample  # the registered depth (the paper's Table 8 for its ten tasks)
    else:
        wanted = 2 if max(H, W) <= 64 else 3
    num_downsample = next(n for n in range(wanted, -1, -1) if H % 2**n == 0 and W % 2**n == 0)
    return TaskSpec(
        name=name,
        in_frames=T,
        out_frames=out_shape[0],
        channels=C,
        height=H,
        width=W,
        num_downsample=num_downsample,
        value_range=info.spec.value_range if info is not None and info.spec is not None else (0.0, 1.0),
        discipline=discipline or (info.discipline if info is not None else "generic"),
    )
