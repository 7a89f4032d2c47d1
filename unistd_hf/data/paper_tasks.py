"""The paper's ten tasks: shapes and frames of its Table 1, encoder depth `num_downsample` of its Table 8.

One `TaskSpec` per registered loader name; the loaders' defaults produce exactly these shapes. Differences from
the printed tables (see docs/DATA.md): ENSO is 24 x 48 (Table 8 and Earthformer's grid; Table 1 prints 48 x 48).
"""

from __future__ import annotations

from ..configuration_unistd import TaskSpec

__all__ = ["ENSO_SST_RANGE", "PAPER_TASKS", "PAPER_TASK_NAMES"]

# Earthformer's ICAR-ENSO scaling: SST anomalies (deg C) between the extremes of its CMIP5 and CMIP6 data.
ENSO_SST_RANGE = (-16.549121856689453, 10.198975563049316)

PAPER_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("kitticaltech", 10, 10, 3, 128, 160, num_downsample=3, value_range=(0, 255), discipline="driving"),
        TaskSpec("bair", 2, 10, 3, 64, 64, num_downsample=2, value_range=(0, 255), discipline="robot action"),
        TaskSpec("cityscapes", 2, 5, 3, 128, 128, num_downsample=3, value_range=(0, 255), discipline="driving"),
        TaskSpec("taxibj", 4, 4, 2, 32, 32, num_downsample=2, value_range=(-1, 1), discipline="traffic"),
        TaskSpec("sevir", 13, 12, 1, 384, 384, num_downsample=4, value_range=(0, 255), discipline="weather"),
        TaskSpec("mmnist", 10, 10, 1, 64, 64, num_downsample=3, value_range=(0, 255), discipline="trajectory"),
        TaskSpec("kth", 10, 10, 1, 128, 128, num_downsample=3, value_range=(0, 255), discipline="human motion"),
        TaskSpec("human", 4, 4, 3, 256, 256, num_downsample=4, value_range=(0, 255), discipline="human motion"),
        TaskSpec("traffic4cast", 9, 3, 8, 128, 112, num_downsample=3, value_range=(0, 255), discipline="traffic"),
        TaskSpec("enso", 12, 14, 1, 24, 48, num_downsample=1, value_range=ENSO_SST_RANGE, discipline="weather"),
    )
}
PAPER_TASK_NAMES = tuple(PAPER_TASKS)
