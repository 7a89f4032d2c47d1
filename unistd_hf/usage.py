"""Which experts serve which task: mean router weights per task, the heat map `expert_usage.png`, a collapse check.

    python -m unistd_hf.usage --adapter outputs/unistd/adapter --output_dir outputs/usage   # tasks of the adapter

For every adapted layer and task, the mean (and spread) over the task's test clips of each expert's router weight:
averaged over tokens for the token router, over sequences for the sequence router (`rankmoe_peft.ExpertUsage`).
A layer has *collapsed* when every task sends more than `COLLAPSE_SHARE` of its weight to one expert.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rankmoe_peft import ExpertUsage, RouterRecorder  # noqa: E402

from .atomic import write_text_atomically  # noqa: E402
from .peft_integration import MODULE_KINDS  # noqa: E402

__all__ = ["expert_usage", "collapsed_layers", "collapse_warning", "plot_expert_usage", "COLLAPSE_SHARE", "main"]

COLLAPSE_SHARE = 0.9


@torch.no_grad()
def expert_usage(model: torch.nn.Module, tasks: dict, batch_size: int = 16, max_clips: int | None = 64) -> dict[str, Any]:
    """{"mean": {task: {layer: [weight per expert]}}, "std": {...}, "clips": {task: n}} of a RankMoE UniSTD model
    over the first `max_clips` test clips of each task (`tasks`: name -> `TaskData`)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # layer names as rank_summary's
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"mean": {}, "std": {}, "clips": {}}
    with RouterRecorder(model) as recorder:
        for name, task in tasks.items():
            usage = ExpertUsage()
            count = len(task.test) if max_clips is None else min(max_clips, len(task.test))
            for start in range(0, count, batch_size):
                batch = task.test[start : min(start + batch_size, count)]
                model(pixel_values=batch["inputs"].to(device).float(), task=name)
                usage.update(recorder)
            out["mean"][name], out["std"][name], out["clips"][name] = usage.mean(), usage.std(), count
    model.train(was_training)
    return out


def collapsed_layers(usage: dict[str, Any], share: float = COLLAPSE_SHARE) -> list[str]:
    """Layers (with more than one expert) where every task sends more than `share` of its weight to one expert."""
    per_task = list(usage["mean"].values())
    layers = per_task[0] if per_task else {}
    return [layer for layer, weights in layers.items()
            if len(weights) > 1 and all(max(task[layer]) > share for task in per_task)]


def collapse_warning(usage: dict[str, Any], share: float = COLLAPSE_SHARE) -> str | None:
    layers = collapsed_layers(usage, share)
    if not layers:
        return None
    return (f"warning: router collapse in {len(layers)} layer(s) (every task sends > {share:.0%} of its weight to one "
            f"expert): {', '.join(short_name(n) for n in layers[:6])}{' ...' if len(layers) > 6 else ''}")


def short_name(layer: str) -> str:
    """'base_model.model.backbone.encoder.layers.3.self_attn.q_proj' -> 'L3 q_proj'."""
    match = re.search(r"(?:layers|temporal_adapters)\.(\d+)\.", layer)
    kind = next((k for k in MODULE_KINDS if layer.endswith(k)), layer.rsplit(".", 1)[-1])
    return f"L{match.group(1)} {kind}" if match else kind


def _rank_of(ranks: dict[str, list[float]], layer: str) -> list[float] | None:
    return next((r for name, r in ranks.items() if layer.endswith(name) or name.endswith(layer)), None)


def plot_expert_usage(usage: dict[str, Any], ranks: dict[str, list[float]] | None, path: str | Path) -> Path:
    """One heat map per projection kind: rows = layer x expert, columns = tasks, colour and number = mean router
    weight; the expert's final rank is written in its row label (r=...)."""
    tasks = list(usage["mean"])
    layers = list(usage["mean"][tasks[0]])
    kinds = [k for k in MODULE_KINDS if any(layer.endswith(k) for layer in layers)]
    heights = [sum(len(usage["mean"][tasks[0]][layer]) for layer in layers if layer.endswith(k)) for k in kinds]
    figure, axes = plt.subplots(1, len(kinds), figsize=(2.4 + 1.1 * len(tasks) * len(kinds), 1.2 + 0.22 * max(heights)),
                                squeeze=False, gridspec_kw={"wspace": 0.6})
    for axis, kind in zip(axes[0], kinds):
        rows, labels = [], []
        for layer in (name for name in layers if name.endswith(kind)):
            rank = _rank_of(ranks or {}, layer)
            for expert in range(len(usage["mean"][tasks[0]][layer])):
                rows.append([usage["mean"][task][layer][expert] for task in tasks])
                label = f"{short_name(layer).split()[0]} e{expert}"
                labels.append(label + (f" (r={rank[expert]:g})" if rank else ""))
        grid = np.array(rows)  # (layers x experts, tasks)
        image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for (row, column), value in np.ndenumerate(grid):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if value < 0.6 else "black")
        axis.set_xticks(range(len(tasks)))
        axis.set_xticklabels(tasks, rotation=30, ha="right", fontsize=7)
        axis.set_yticks(range(len(labels)))
        axis.set_yticklabels(labels, fontsize=6)
        axis.set_title(kind, fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean router weight")
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m unistd_hf.usage`: the usage map and numbers of a saved adapter on its tasks' data."""
    from .data import get_task, load_task
    from .peft_integration import load_unistd_peft_model
    from .training.schedule import task_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="A saved UniSTD RankMoE adapter (folder or hub id).")
    parser.add_argument("--tasks", nargs="+", default=None, help="Tasks to measure (default: all of the adapter's).")
    parser.add_argument("--output_dir", required=True, help="Where expert_usage.png and expert_usage.json go.")
    parser.add_argument("--data_dir", default=None, help="Folder of the real data sets (docs/DATA.md).")
    parser.add_argument("--num_test", type=int, default=64, help="Test clips per task (synthetic tasks: generated).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic clips and splits.")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        model = load_unistd_peft_model(args.adapter).eval()
        base = model.get_base_model()
        names = args.tasks or list(base.task_specs)
        unknown = [t for t in names if t not in base.task_specs]
        if unknown:
            raise ValueError(f"the adapter was trained for tasks {list(base.task_specs)}, not {unknown}")
        tasks = {}
        for name in names:
            options = {"num_train": 1, "num_validation": 1, "num_test": args.num_test} if get_task(name).synthetic else {}
            tasks[name] = task_data(name, load_task(name, data_dir=args.data_dir, seed=args.seed, **options))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    usage = expert_usage(model, tasks, args.batch_size, args.num_test)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    ranks = model.rank_summary()
    warning = collapse_warning(usage)
    write_text_atomically(output / "expert_usage.json", json.dumps({**usage, "ranks": ranks, "collapse": warning}, indent=1))
    plot_expert_usage(usage, ranks, output / "expert_usage.png")
    print(warning or "no router collapse")
    print(f"wrote {output / 'expert_usage.png'} and {output / 'expert_usage.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
