"""Save a picture with one clip of each synthetic task (inputs, then targets), generated on the spot.

    python examples/show_tasks.py --output outputs/tasks.png

Rows: moving_digits, city_traffic (inflow and outflow as two rows), rain_nowcast, robot_shapes. The red line
separates the observed frames from the frames to predict.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from unistd_hf.data import get_task, list_tasks, load_task  # noqa: E402


def clip_rows(name: str, seed: int, cache_dir: str) -> list[tuple[str, np.ndarray, int]]:
    """(row label, frames (T + T', H, W) or (T + T', H, W, 3), number of input frames) for one test clip.

    Of the first 8 test clips, the one whose targets vary most is shown (a rain clip can be nearly dry).
    """
    ds = load_task(name, seed=seed, cache_dir=cache_dir, num_train=1, num_validation=1, num_test=8)
    targets = ds["test"][:]["targets"]  # (8, T', C, H, W)
    clip = ds["test"][int(targets.flatten(1).std(dim=1).argmax())]
    frames = np.concatenate([clip["inputs"].numpy(), clip["targets"].numpy()])  # (T + T', C, H, W)
    in_frames = clip["inputs"].shape[0]
    if frames.shape[1] == 3:
        return [(name, frames.transpose(0, 2, 3, 1), in_frames)]
    if frames.shape[1] == 2:
        return [(f"{name}\ninflow", frames[:, 0], in_frames), (f"{name}\noutflow", frames[:, 1], in_frames)]
    return [(name, frames[:, 0], in_frames)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/tasks.png", help="where to save the PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="datasets cache (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name in list_tasks(synthetic=True) for row in clip_rows(name, args.seed, args.cache_dir or tmp)]
    columns = max(frames.shape[0] for _, frames, _ in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.9, len(rows) * 1.05), squeeze=False)
    for ax_row, (label, frames, in_frames) in zip(axes, rows):
        for t, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if t >= frames.shape[0]:
                ax.axis("off")
                continue
            cmap = None if frames.ndim == 4 else ("magma" if "rain" in label else "gray")
            ax.imshow(frames[t], cmap=cmap, vmin=0.0, vmax=1.0 if "traffic" not in label else 0.5)
            if t == in_frames:
                for side in ("left",):
                    ax.spines[side].set_color("red")
                    ax.spines[side].set_linewidth(2.5)
        ax_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    spec_line = ", ".join(
        f"{n}: {get_task(n).spec.in_frames}->{get_task(n).spec.out_frames}" for n in list_tasks(synthetic=True)
    )
    fig.suptitle(f"One test clip per synthetic task (seed {args.seed}); {spec_line}", fontsize=9)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
