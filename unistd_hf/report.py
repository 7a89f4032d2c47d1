"""What a training run leaves behind: report.json / report.md, prediction grids, the rank plot, the hub push."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .atomic import write_text_atomically  # noqa: E402
from .modeling_unistd import TASK_HEAD_MODULES  # noqa: E402
from .peft_integration import MODULE_KINDS  # noqa: E402

__all__ = [
    "parameter_report",
    "format_parameter_report",
    "build_report",
    "format_report_markdown",
    "write_outputs",
    "plot_prediction_grid",
    "plot_rank_history",
    "plot_validation_curves",
    "model_card",
    "push_adapter",
]

# Metrics where larger is better; all others (errors) are better when smaller.
HIGHER_IS_BETTER = ("psnr", "ssim", "csi")


# Parts of a UniSTD model in the parameter table.
_PARTS = ("backbone", "rankmoe adapters", "task heads", "temporal adapters", "other")


def _part_of(name: str) -> str:
    parts = name.split(".")
    if any(p.startswith("rankmoe_") for p in parts):
        return "rankmoe adapters"
    if "backbone" in parts:
        return "backbone"
    if any(p in TASK_HEAD_MODULES for p in parts):
        return "task heads"
    if "temporal_adapters" in parts:
        return "temporal adapters"
    return "other"


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per part, for a bare `UniSTDModel` or its peft-wrapped version.

    Parts: "backbone" (CLIP, incl. its unused patch embedding), "rankmoe adapters" (every `rankmoe_*` tensor:
    experts, routers, ranks), "task heads" (encoders, projections, decoders), "temporal adapters" (temporal FFNs
    and the zero base layers of their RankMoE), "other" (only listed when non-empty), and "total".
    Each tensor is counted once. With peft's `modules_to_save`, the frozen `original_module` copies (kept only so
    that `disable_adapter()` can run the untrained heads) are not counted: the trained copies are what the model
    runs, and counting both would double the heads.
    """
    counts = {part: {"trainable": 0, "total": 0} for part in _PARTS}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or "original_module" in name.split("."):
            continue
        seen.add(id(param))
        part = counts[_part_of(name)]
        part["total"] += param.numel()
        if param.requires_grad:
            part["trainable"] += param.numel()
    if not counts["other"]["total"]:
        del counts["other"]
    counts["total"] = {
        "trainable": sum(c["trainable"] for c in counts.values()),
        "total": sum(c["total"] for c in counts.values()),
    }
    return counts


def format_parameter_report(report: dict[str, dict[str, int]]) -> str:
    """Markdown table of a `parameter_report`: part, trainable, total, trainable share of the part."""
    lines = ["| part | trainable | total | trainable % |", "| --- | ---: | ---: | ---: |"]
    for part, c in report.items():
        share = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        label = f"**{part}**" if part == "total" else part
        lines.append(f"| {label} | {c['trainable']:,} | {c['total']:,} | {share:.2f} |")
    return "\n".join(lines)


def _better(metric: str, model: float, baseline: float) -> bool:
    return model > baseline if metric.startswith(HIGHER_IS_BETTER) else model < baseline


def build_report(args, config, model, results: dict, state: dict, seconds: float, processes: int) -> dict[str, Any]:
    """Everything measured in one JSON-able dict."""
    parts = parameter_report(model)
    report: dict[str, Any] = {
        "tasks": {
            name: {**values, "beats_baseline_mse": values["model"]["mse"] < values["baseline"]["mse"]}
            for name, values in results.items()
        },
        "parameters": parts,
        "wall_time_s": round(seconds, 1),
        "steps": state["global_step"],
        "batches_per_task": state.get("task_batches", {}),
        "processes": processes,
        "arguments": dataclasses.asdict(args),
    }
    if hasattr(model, "rank_summary"):
        summary = model.rank_summary()
        report["rank_summary"] = summary
        report["total_rank"] = sum(sum(r) for r in summary.values())
        report["rank_history"] = state["rank_history"]  # the numbers behind ranks.png
    if state.get("validation_history"):
        report["validation_history"] = state["validation_history"]  # the numbers behind validation.png
    return report


def metrics_table(report: dict[str, Any]) -> str:
    """Markdown: one row per task and metric, model vs copy-last-frame baseline."""
    rows = ["| task | metric | model | copy-last-frame | model better |", "|---|---|---|---|---|"]
    for name, values in report["tasks"].items():
        for metric, value in values["model"].items():
            baseline = values["baseline"][metric]
            mark = "yes" if _better(metric, value, baseline) else "no"
            rows.append(f"| {name} | {metric} | {value:.4f} | {baseline:.4f} | {mark} |")
    return "\n".join(rows)


def format_report_markdown(report: dict[str, Any]) -> str:
    per_task = ", ".join(f"{task} {count}" for task, count in report.get("batches_per_task", {}).items())
    lines = [
        "# UniSTD training report",
        "",
        f"{report['steps']} batches ({per_task}) on {report['processes']} process(es) in {report['wall_time_s']:.0f} s.",
        "",
        "## Test metrics (model vs copy-last-frame baseline)",
        "",
        metrics_table(report),
        "",
        "MSE/MAE are per pixel; `mse_openstl`/`mae_openstl` sum over C*H*W and average over clips and frames "
        "(OpenSTL's convention); PSNR and SSIM are per frame, then averaged.",
        "",
        "## Parameters",
        "",
        format_parameter_report(report["parameters"]),
    ]
    if "rank_summary" in report:
        lines += ["", "## Ranks after the search", "", f"Total rank: {report['total_rank']:.0f}", "",
                  "| module | ranks per expert |", "|---|---|"]
        lines += [f"| {name} | {', '.join(f'{r:g}' for r in ranks)} |" for name, ranks in report["rank_summary"].items()]
    if report.get("expert_usage"):
        from .usage import COLLAPSE_SHARE

        lines += ["", "## Expert usage", "", report.get("expert_collapse") or f"No router collapse (no layer sends more "
                  f"than {COLLAPSE_SHARE:.0%} of every task's weight to one expert).", "",
                  "`expert_usage.png`: the mean router weight of every expert per task (numbers: `report.json`, "
                  "`expert_usage`)."]
    return "\n".join(lines) + "\n"


def _frames_as_images(clip: torch.Tensor) -> list[np.ndarray]:
    """(T, C, H, W) in [0, 1] -> T images: gray for 1 channel, RGB for 3, the first channel otherwise."""
    clip = clip.detach().float().clamp(0, 1).cpu()
    if clip.shape[1] == 3:
        return [frame.permute(1, 2, 0).numpy() for frame in clip]
    return [frame[0].numpy() for frame in clip]


def plot_prediction_grid(inputs, targets, predictions, path: str | Path, title: str = "") -> Path:
    """One clip: a row of input frames, a row of targets (if given), a row of predictions."""
    rows = {"input": _frames_as_images(inputs)}
    if targets is not None:
        rows["target"] = _frames_as_images(targets)
    rows["prediction"] = _frames_as_images(predictions)
    columns = max(len(v) for v in rows.values())
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.4 * len(rows)), squeeze=False)
    for row, (label, images) in enumerate(rows.items()):
        for col in range(columns):
            axis = axes[row][col]
            axis.set_xticks([])
            axis.set_yticks([])
            if col < len(images):
                image = images[col]
                axis.imshow(image, cmap=None if image.ndim == 3 else "viridis", vmin=0, vmax=1)
            else:
                axis.axis("off")
            if col == 0:
                axis.set_ylabel(label)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path)


def _module_kind(name: str) -> str:
    for kind in MODULE_KINDS:
        if name.endswith(kind):
            return kind
    return name.rsplit(".", 1)[-1]


def plot_rank_history(history: list[dict], path: str | Path) -> Path:
    """Left: mean rank per module kind over training (min-max band). Right: final rank per module and expert."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.2]})
    steps = [h["step"] for h in history]
    kinds: dict[str, list[list[float]]] = {}
    for entry in history:
        per_kind: dict[str, list[float]] = {}
        for name, ranks in entry["ranks"].items():
            per_kind.setdefault(_module_kind(name), []).extend(ranks)
        for kind, values in per_kind.items():
            kinds.setdefault(kind, []).append(values)
    for kind, series in kinds.items():
        values = np.array(series)  # (steps, experts of that kind)
        left.plot(steps, values.mean(1), label=kind)
        left.fill_between(steps, values.min(1), values.max(1), alpha=0.15)
    left.set_xlabel("batch")
    left.set_ylabel("rank")
    left.set_title("ranks during training (mean, min-max)")
    left.legend()
    final = history[-1]["ranks"]
    width = max(len(r) for r in final.values())
    grid = np.full((len(final), width), np.nan)
    for row, ranks in enumerate(final.values()):
        grid[row, : len(ranks)] = ranks
    image = right.imshow(grid, aspect="auto", cmap="magma", vmin=0)
    right.set_yticks(range(len(final)))
    right.set_yticklabels([n.replace("backbone.encoder.", "").replace("self_attn.", "") for n in final], fontsize=6)
    right.set_xlabel("expert")
    right.set_title("final ranks")
    figure.colorbar(image, ax=right)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path)


def plot_validation_curves(runs: dict[str, list[dict]], path: str | Path, metric: str = "mse") -> Path:
    """One panel per task: validation `metric` against the batches of that task seen so far, one line per run
    (a training run's `validation_history`; several runs compare at equal exposure to each task)."""
    tasks = sorted({key.split("/")[1] for history in runs.values() for record in history for key in record
                    if key.startswith("val/") and key.endswith("/" + metric)})
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for label, history in runs.items():
            points = [(r["task_batches"].get(task, 0), r[f"val/{task}/{metric}"]) for r in history
                      if f"val/{task}/{metric}" in r]
            if points:
                axis.plot(*zip(*points), marker=".", label=label)
        axis.set_title(task)
        axis.set_xlabel(f"batches of {task}")
        axis.set_ylabel(f"validation {metric}")
        if metric == "mse":
            axis.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path)


@torch.no_grad()
def write_outputs(output: Path, report: dict[str, Any], model, tasks: dict, state: dict) -> None:
    """report.json, report.md, predictions_<task>.png, ranks.png, validation.png, expert_usage.png."""
    write_text_atomically(output / "report.json", json.dumps(report, indent=1))
    write_text_atomically(output / "report.md", format_report_markdown(report))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for name, task in tasks.items():
        clip = task.test[0:1]
        inputs = clip["inputs"].to(device).float()
        prediction = model(pixel_values=inputs, task=name).predictions
        plot_prediction_grid(inputs[0], clip["targets"][0], prediction[0], output / f"predictions_{name}.png", name)
    model.train(was_training)
    if state.get("rank_history"):
        plot_rank_history(state["rank_history"], output / "ranks.png")
    if state.get("validation_history"):
        plot_validation_curves({"this run": state["validation_history"]}, output / "validation.png")
    if report.get("expert_usage"):
        from .usage import plot_expert_usage

        plot_expert_usage(report["expert_usage"], report.get("rank_summary"), output / "expert_usage.png")


def model_card(report: dict[str, Any], repo_id: str, backbone: str | None = None, whole_model: bool = False) -> str:
    """The README.md pushed with an adapter: what it was trained on, the two lines that load it, the metrics.

    `backbone` is what the adapter config records (a hub id, the packaged backbone's name, or "./backbone" for the
    folder pushed beside the adapter); a hub id also becomes the card's `base_model`.
    """
    from .peft_integration import SAVED_BACKBONE

    tasks = ", ".join(report["tasks"])
    if whole_model:  # a --method simvp|tau run: one reference model per task, saved whole
        return (
            f"---\nlibrary_name: transformers\ntags:\n- unistd\n- spatio-temporal-forecasting\n---\n\n# {repo_id}\n\n"
            f"A reference model (SimVP/TAU, one per task) trained on: {tasks}. Load it with:\n\n"
            "```python\nfrom huggingface_hub import snapshot_download\nfrom unistd_hf.baselines import load_reference_model\n"
            f"model = load_reference_model(snapshot_download(\"{repo_id}\"))\n```\n\n"
            f"## Test metrics\n\n{metrics_table(report)}\n"
        )
    base_model = f"base_model: {backbone}\n" if backbone and backbone != SAVED_BACKBONE and "/" in backbone else ""
    if backbone == SAVED_BACKBONE:
        where = "the CLIP backbone it was trained on is in this repo's `backbone/` folder (safetensors)"
    elif backbone:
        where = f"its frozen backbone is `{backbone}`"
    else:
        where = "its frozen backbone is named in `adapter_config.json` (`base_model_config.backbone`)"
    return (
        f"---\nlibrary_name: peft\n{base_model}tags:\n- rankmoe\n- unistd\n- spatio-temporal-forecasting\n---\n\n"
        f"# {repo_id}\n\nA UniSTD RankMoE adapter trained jointly on: {tasks}; {where}.\n\n"
        "Load it (the adapter, the task heads and the backbone) with:\n\n"
        f"```python\nimport unistd_hf\nmodel = unistd_hf.load_unistd_peft_model(\"{repo_id}\")\n```\n\n"
        f"## Test metrics\n\n{metrics_table(report)}\n"
    )


def push_adapter(adapter_dir: str | Path, repo_id: str, report: dict[str, Any], token: str | None = None) -> str:
    """Upload the saved adapter folder (with its `backbone/` folder, when the adapter records one) and a model card
    that carries the report table and the two lines that load it."""
    from huggingface_hub import HfApi

    from .peft_integration import SAVED_BACKBONE

    adapter_dir = Path(adapter_dir)
    backbone = None
    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        backbone = (json.loads(config_file.read_text()).get("base_model_config") or {}).get("backbone")
        if isinstance(backbone, dict):
            backbone = None
        if backbone == SAVED_BACKBONE and not (adapter_dir / "backbone" / "config.json").is_file():
            raise ValueError(f"{str(config_file)!r} records its backbone as saved beside it, but "
                             f"{str(adapter_dir / 'backbone')!r} is missing; save with unistd_hf.save_unistd_peft_model")
    card = model_card(report, repo_id, backbone, whole_model=not config_file.is_file())
    write_text_atomically(adapter_dir / "README.md", card)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=str(adapter_dir), commit_message="Upload UniSTD adapter")
    return repo_id
