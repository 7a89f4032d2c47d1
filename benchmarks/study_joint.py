"""Does one jointly trained UniSTD model hold up against one model per task? Ablations of the full method.

On the four synthetic tasks (moving_digits, city_traffic, rain_nowcast, robot_shapes), every row is trained by
`unistd_hf.training.train` with the same seed(s), the same hyperparameters and the same number of optimizer
steps (`--max_steps`, one batch = one task = one step):

  single-task, full method   one model per task; EACH of the four models gets the full --max_steps steps
                             (so every single-task model sees 4x the batches of its task that the joint
                             model does, and the four together cost 4x the joint compute: the generous
                             baseline that "lossless joint training" has to match)
  joint, full method         RankMoE experts (6 on q/k/v, 2 on out_proj and the temporal adapters),
                             rank search for the first half of the steps, temporal adapters
  joint, plain LoRA          adapter "lora": one expert at fixed rank 8 (= LoRA) on q/k/v/out
  joint, fixed-rank experts  adapter "fixed_rank": the same experts, ranks fixed (no search)
  joint, no temporal adapter the full method without the temporal adapters
  joint, backbone fine-tuned adapter "none" with finetune_backbone=True (the whole CLIP backbone trained)
  copy-last-frame            the baseline every report carries (identical in all rows of a seed)

The rank search covers the same fraction of steps in every row that has one (`--search_fraction`, 0.5 by
default): the script sets `epochs` and `rank_search_epochs` per row from the batches per epoch (4x more in
the joint model than in a single-task one), so both search for the same number of steps. Seeds change the
data, the random backbone, the initialisation and the task order; each seed's rows share all of them.

Reported per task: MSE, PSNR, SSIM (and CSI, averaged over the six SEVIR VIL thresholds, for rain_nowcast),
the copy-last-frame baseline, trainable parameters and wall time, as mean +- sample std over the seeds;
plus the final rank pattern of the joint full method (total rank per module kind and per layer). The tables
are printed; with --write-docs they are also written to docs/RESULTS.md (section "study_joint") and all raw
numbers to docs/study_joint.json (without it the raw numbers go to OUTPUT_DIR/study_joint.json and docs/ is left
alone, so running the script never overwrites the published results by accident).
Each run leaves its own folder under --output_dir (report.json, pictures, adapter).

    python benchmarks/study_joint.py                          # default size, 2 seeds, ~45 min on 2 CPU cores
    python benchmarks/study_joint.py --write-docs             # the same, and update docs/RESULTS.md + docs/study_joint.json
    python benchmarks/study_joint.py --tiny                   # smoke test, a few minutes
    python benchmarks/study_joint.py --scale 8 --device auto  # GPU: 8x steps and data, a bigger backbone
    python benchmarks/study_joint.py --rows joint joint_lora --seeds 0 1 2
    python benchmarks/study_joint.py --from_json docs/study_joint.json --notes notes.md --write-docs  # re-render

Runs execute in this process one after the other (each `train()` builds its own Accelerator and calls
set_seed; the script checks nothing leaks by construction: it deletes a row's folder before running it, so
no stale checkpoint or log is picked up). `--subprocess` runs each in a fresh Python process instead.
`--reuse` keeps the report of a finished run whose arguments match, to finish an interrupted study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from _results import write_section
except ImportError:  # run as a module
    from benchmarks._results import write_section

from unistd_hf.data import list_tasks  # noqa: E402
from unistd_hf.peft_integration import MODULE_KINDS  # noqa: E402

TASKS = list_tasks(synthetic=True)
JSON_PATH = ROOT / "docs" / "study_joint.json"

# name -> (label, TrainingArguments overrides, one model per task?)
ROWS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "single": ("single-task, full method", {"adapter": "rankmoe"}, True),
    "joint": ("joint, full method", {"adapter": "rankmoe"}, False),
    "joint_lora": ("joint, plain LoRA r=8", {"adapter": "lora", "max_rank": 8}, False),
    "joint_fixed_rank": ("joint, fixed-rank experts", {"adapter": "fixed_rank"}, False),
    "joint_no_temporal": ("joint, no temporal adapter", {"adapter": "rankmoe", "use_temporal_adapter": False}, False),
    "joint_full_ft": ("joint, backbone fine-tuned", {"adapter": "none", "finetune_backbone": True}, False),
}
BASELINE_LABEL = "copy-last-frame"
KINDS = MODULE_KINDS


# ---------------------------------------------------------------------------------------------------------------------
# Sizes


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The shared TrainingArguments fields, after --tiny / --scale and explicit overrides."""
    if args.tiny:
        base = {"backbone_width": 64, "backbone_layers": 2, "backbone_heads": 4, "hidden_channels": 8, "batch_size": 4,
                    "num_train": 16, "num_test": 8, "max_steps": 16}
    else:
        base = {"backbone_width": 96, "backbone_layers": 3, "backbone_heads": 4, "hidden_channels": 16, "batch_size": 8,
                    "num_train": 160, "num_test": 32, "max_steps": 160}
    s = args.scale
    if s != 1:  # steps and data x s; width x s (heads of 64 channels), layers x s up to 12; C' doubled
        base["max_steps"] *= s
        base["num_train"] *= s
        base["num_test"] = min(base["num_test"] * s, 200)
        base["backbone_width"] = int(base["backbone_width"] * s) // 32 * 32 or 32
        base["backbone_heads"] = max(base["backbone_width"] // 64, 1)
        base["backbone_layers"] = min(base["backbone_layers"] * s, 12)
        base["hidden_channels"] = base["hidden_channels"] * (2 if s >= 2 else 1)
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    base["num_train_per_task"] = args.num_train_per_task  # "" = the same clips for every task
    base["max_steps"] = int(base["max_steps"])
    base["num_train"] = int(base["num_train"])
    return base


def train_clips(common: dict[str, Any], task: str) -> int:
    """Training clips of one task: --num_train unless --num_train_per_task overrides it."""
    from unistd_hf.training import parse_clip_counts

    return parse_clip_counts(common.get("num_train_per_task", "")).get(task, int(common["num_train"]))


def schedule_for(common: dict[str, Any], tasks: list[str], search_fraction: float, adapter: str) -> dict[str, int]:
    """epochs and rank_search_epochs so that `max_steps` steps are run and the search covers the same number of
    steps in a single-task and a joint model (train() counts the search in epochs; with the round-robin schedule
    an epoch is every batch of every task once)."""
    per_epoch = sum(train_clips(common, t) // common["batch_size"] for t in tasks)
    epochs = math.ceil(common["max_steps"] / per_epoch)
    search = round(search_fraction * common["max_steps"] / per_epoch) if adapter == "rankmoe" else 0
    return {"epochs": max(epochs, 1), "rank_search_epochs": search, "steps_per_epoch": per_epoch,
                "search_steps": min(search * per_epoch, common["max_steps"])}


# ---------------------------------------------------------------------------------------------------------------------
# Running one configuration


def training_arguments(row: str, tasks: list[str], seed: int, common: dict[str, Any], args) -> dict[str, Any]:
    _, overrides, _ = ROWS[row]
    plan = schedule_for(common, tasks, args.search_fraction, overrides.get("adapter", "rankmoe"))
    name = row if len(tasks) > 1 else f"{row}_{tasks[0]}"
    return dict(
        **common, **overrides, tasks=tasks, seed=seed, epochs=plan["epochs"],
        rank_search_epochs=plan["rank_search_epochs"],
        output_dir=str(Path(args.output_dir) / f"seed{seed}" / name), cache_dir=args.cache_dir,
        num_validation=8, log_every=max(common["max_steps"] // 20, 1), cpu=args.device == "cpu",
        mixed_precision=args.mixed_precision, keep_checkpoints=1, backbone=args.backbone,
    ), plan


def run_one(kwargs: dict[str, Any], args) -> dict[str, Any]:
    output = Path(kwargs["output_dir"])
    report_path = output / "report.json"
    if args.reuse and report_path.exists():
        report = json.loads(report_path.read_text())
        saved = {k: report["arguments"].get(k) for k in kwargs}
        if saved == kwargs:
            print(f"  reusing {report_path}")
            return report
    shutil.rmtree(output, ignore_errors=True)  # no stale checkpoint, log or backbone from an older run
    if args.subprocess:
        code = ("import json,sys,torch; from unistd_hf.training import TrainingArguments, train; "
                f"torch.set_num_threads({torch_threads()}); train(TrainingArguments(**json.loads(sys.argv[1])))")
        subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True, cwd=ROOT)
        report = json.loads(report_path.read_text())
    else:
        from unistd_hf.training import TrainingArguments, train

        report = train(TrainingArguments(**kwargs))
    report["_search_ranks"] = ranks_before_rounding(output)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)  # the adapter and report are what we keep
    return report


def ranks_before_rounding(output: Path) -> dict[str, Any] | None:
    """The last logged continuous ranks before discretization (train() keeps the rank history only in the
    checkpoints' trainer_state.json, not in report.json), to show how far the search moved them."""
    states = sorted((output / "checkpoints").glob("step-*/trainer_state.json"))
    if not states:
        return None
    history = json.loads(states[-1].read_text()).get("rank_history", [])
    continuous = [h for h in history if any(r != round(r) for ranks in h["ranks"].values() for r in ranks)]
    if not continuous:
        return None
    last = continuous[-1]
    values = [r for ranks in last["ranks"].values() for r in ranks]
    return {"step": last["step"], "ranks": last["ranks"], "min": min(values), "max": max(values),
            "total": sum(values)}


def summarize_run(report: dict[str, Any], plan: dict[str, int]) -> dict[str, Any]:
    return {
        "tasks": {name: {"model": v["model"], "baseline": v["baseline"]} for name, v in report["tasks"].items()},
        "trainable_parameters": report["parameters"]["total"]["trainable"],
        "total_parameters": report["parameters"]["total"]["total"],
        "parameters": report["parameters"],
        "wall_time_s": report["wall_time_s"],
        "steps": report["steps"],
        "search_steps": plan["search_steps"],
        "rank_summary": report.get("rank_summary"),
        "total_rank": report.get("total_rank"),
        "ranks_before_rounding": report.get("_search_ranks"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and tables


def csi_mean(metrics: dict[str, float]) -> float | None:
    values = [v for k, v in metrics.items() if k.startswith("csi@")]
    return sum(values) / len(values) if values else None


def task_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {k: metrics[k] for k in ("mse", "psnr", "ssim")}
    csi = csi_mean(metrics)
    if csi is not None:
        out["csi"] = csi
    return out


def spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], metric: str) -> str:
    mean, std = spread(values)
    digits = {"mse": 4, "psnr": 2, "ssim": 3, "csi": 3}.get(metric, 2)
    if metric == "mse":
        return f"{mean * 1e3:.2f} ± {std * 1e3:.2f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect(runs: dict[int, dict[str, Any]], rows: list[str]) -> dict[str, Any]:
    """values[row][task][metric] -> list over seeds; also parameters and wall time (per task and per row)."""
    seeds = sorted(runs)
    table: dict[str, Any] = {}
    for row in rows:
        per_task: dict[str, dict[str, list[float]]] = {t: {} for t in TASKS}
        params_task: dict[str, list[int]] = {t: [] for t in TASKS}
        time_task: dict[str, list[float]] = {t: [] for t in TASKS}
        params_row, time_row = [], []
        for seed in seeds:
            if row not in runs[seed]:
                continue
            entry = runs[seed][row]
            parts = entry.values() if ROWS[row][2] else [entry]
            params_row.append(sum(p["trainable_parameters"] for p in parts))
            time_row.append(sum(p["wall_time_s"] for p in parts))
            for task in TASKS:
                run = entry[task] if ROWS[row][2] else entry
                for metric, value in task_metrics(run["tasks"][task]["model"]).items():
                    per_task[task].setdefault(metric, []).append(value)
                params_task[task].append(run["trainable_parameters"])
                time_task[task].append(run["wall_time_s"])
        table[row] = {"metrics": per_task, "params_task": params_task, "time_task": time_task,
                      "params_row": params_row, "time_row": time_row}
    baseline: dict[str, dict[str, list[float]]] = {t: {} for t in TASKS}
    for seed in seeds:
        for task in TASKS:
            source = None
            for row, entry in runs[seed].items():
                run = entry.get(task) if ROWS[row][2] else entry
                if run and task in run["tasks"]:
                    source = run
                    break
            if source:
                for metric, value in task_metrics(source["tasks"][task]["baseline"]).items():
                    baseline[task].setdefault(metric, []).append(value)
    table["_baseline"] = baseline
    return table


def params_str(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{int(statistics.fmean(values)):,}" if len(set(values)) == 1 else f"{min(values):,}–{max(values):,}"


def time_str(values: list[float]) -> str:
    return f"{statistics.fmean(values):.0f}" if values else "-"


def summary_table(table: dict[str, Any], rows: list[str]) -> str:
    columns = " | ".join(f"{t} PSNR" for t in TASKS)
    head = f"| configuration | {columns} | mean PSNR | trainable params | wall time (s) |"
    lines = [head, "|---" + "|---:" * (len(TASKS) + 3) + "|"]
    for row in rows:
        m = table[row]["metrics"]
        if not table[row]["params_row"]:
            continue
        cells = [fmt(m[t]["psnr"], "psnr") for t in TASKS]
        seeds = len(m[TASKS[0]]["psnr"])
        means = [statistics.fmean(m[t]["psnr"][i] for t in TASKS) for i in range(seeds)]
        label = ROWS[row][0] + (" (sum of 4 models)" if ROWS[row][2] else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(means, 'psnr')} | "
                     f"{params_str(table[row]['params_row'])} | {time_str(table[row]['time_row'])} |")
    b = table["_baseline"]
    seeds = len(b[TASKS[0]]["psnr"])
    means = [statistics.fmean(b[t]["psnr"][i] for t in TASKS) for i in range(seeds)]
    lines.append(f"| {BASELINE_LABEL} | " + " | ".join(fmt(b[t]["psnr"], "psnr") for t in TASKS)
                 + f" | {fmt(means, 'psnr')} | 0 | - |")
    return "\n".join(lines)


def task_table(table: dict[str, Any], rows: list[str], task: str) -> str:
    metrics = ["mse", "psnr", "ssim"] + (["csi"] if "csi" in table["_baseline"][task] else [])
    names = {"mse": "MSE ×1e3 ↓", "psnr": "PSNR ↑", "ssim": "SSIM ↑", "csi": "CSI (mean of 6 thr.) ↑"}
    lines = [f"| configuration | {' | '.join(names[m] for m in metrics)} | trainable params | wall time (s) |",
             "|---" + "|---:" * (len(metrics) + 2) + "|"]
    for row in rows:
        m = table[row]["metrics"][task]
        if not m:
            continue
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(fmt(m[k], k) for k in metrics)
                     + f" | {params_str(table[row]['params_task'][task])}"
                     + f" | {time_str(table[row]['time_task'][task])} |")
    b = table["_baseline"][task]
    lines.append(f"| {BASELINE_LABEL} | " + " | ".join(fmt(b[k], k) for k in metrics) + " | 0 | - |")
    return "\n".join(lines)


def rank_pattern(summaries: list[dict[str, list[float]]], label: str) -> tuple[str, dict[str, Any]]:
    """Total rank per layer and module kind (mean over seeds), experts at rank 0, and the initial total."""
    per_cell: dict[tuple[int, str], list[float]] = {}
    experts: dict[str, int] = {}
    zeros = []
    totals = []
    for summary in summaries:
        totals.append(sum(sum(r) for r in summary.values()))
        zeros.append(sum(1 for r in summary.values() for x in r if x == 0))
        for name, ranks in summary.items():
            kind = next((k for k in KINDS if name.endswith(k)), name.rsplit(".", 1)[-1])
            layer = int(re.search(r"(?:layers|temporal_adapters)\.(\d+)\.", name).group(1))
            per_cell.setdefault((layer, kind), []).append(sum(ranks))
            experts[kind] = len(ranks)
    layers = sorted({layer for layer, _ in per_cell})
    kinds = [k for k in KINDS if k in experts]
    head = "| layer | " + " | ".join(f"{k} ({experts[k]} exp.)" for k in kinds) + " | layer total |"
    lines = [head, "|---" + "|---:" * (len(kinds) + 1) + "|"]
    for layer in layers:
        cells = [statistics.fmean(per_cell.get((layer, k), [0.0])) for k in kinds]
        lines.append(f"| {layer} | " + " | ".join(f"{c:g}" for c in cells) + f" | {sum(cells):g} |")
    kind_totals = [sum(statistics.fmean(per_cell.get((layer, k), [0.0])) for layer in layers) for k in kinds]
    lines.append("| **all** | " + " | ".join(f"{c:g}" for c in kind_totals) + f" | {sum(kind_totals):g} |")
    data = {"label": label, "per_layer_kind": {f"{layer}/{k}": v for (layer, k), v in per_cell.items()},
            "experts_per_kind": experts, "total_rank_per_seed": totals, "zero_rank_experts_per_seed": zeros}
    return "\n".join(lines), data


# ---------------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds; every row runs once per seed.")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="Configurations to run.")
    p.add_argument("--scale", type=int, default=1, help="Multiply steps and data by this, and grow the backbone "
                   "(width x scale, layers x scale up to 12, C' doubled); for a GPU, e.g. --scale 8.")
    p.add_argument("--tiny", action="store_true", help="Smoke-test size (a few minutes on a CPU).")
    p.add_argument("--device", choices=["auto", "cpu"], default="cpu",
                   help="'cpu' forces the CPU; 'auto' lets Accelerate take a GPU when present.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1; on a 2-core "
                   "machine shared with other jobs, 2 threads ran 2-10x slower than 1 from oversubscription).")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--search_fraction", type=float, default=0.5, help="Fraction of the steps spent on rank search.")
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "study"), help="One sub-folder per seed and run.")
    p.add_argument("--cache_dir", default=str(ROOT / "outputs" / "study" / "data-cache"),
                   help="Shared datasets cache (data are generated once per seed and size).")
    for key, kind in (("max_steps", int), ("num_train", int), ("num_test", int), ("batch_size", int),
                      ("backbone_width", int), ("backbone_layers", int), ("backbone_heads", int),
                      ("hidden_channels", int)):
        p.add_argument(f"--{key}", type=kind, default=None, help="Override the size preset.")
    p.add_argument("--backbone", default=None, help="Hub id or folder of a pretrained CLIP (default: a random CLIP of "
                   "the preset's size; with a checkpoint the backbone_* sizes are ignored).")
    p.add_argument("--num_train_per_task", default="", help="'task=clips,...' overrides of --num_train (default: "
                   "none, every task the same clips; the library's own default gives city_traffic 1024, which with "
                   "round-robin batches makes the joint model's later steps city_traffic only).")
    p.add_argument("--subprocess", action="store_true", help="Run each configuration in a fresh Python process.")
    p.add_argument("--reuse", action="store_true", help="Keep finished runs whose arguments match.")
    p.add_argument("--write-docs", "--write_docs", dest="write_docs", action="store_true",
                   help="Also write the tables to docs/RESULTS.md and the raw numbers to docs/study_joint.json "
                   "(default: print only, docs/ untouched).")
    p.add_argument("--no_write", action="store_true", help=argparse.SUPPRESS)  # the old opt-out; now the default
    p.add_argument("--json", default=None, help="Where the raw numbers go (default: OUTPUT_DIR/study_joint.json, or "
                   "docs/study_joint.json with --write-docs).")
    p.add_argument("--notes", default=None, help="A text file whose content is added as the interpretation.")
    p.add_argument("--from_json", default=None, help="Render the tables from a saved JSON instead of training.")
    args = p.parse_args(argv)
    if args.write_docs and args.no_write:
        p.error("--write-docs and --no_write contradict each other")
    return args


def findings(table: dict[str, Any], rows: list[str]) -> str:
    """Plain comparisons computed from the numbers (PSNR means over seeds), so the text cannot drift from them."""
    def mean_psnr(row: str, task: str) -> float:
        return statistics.fmean(table[row]["metrics"][task]["psnr"])

    have = [r for r in rows if table[r]["params_row"]]
    out = []
    best = {t: max(have, key=lambda r: mean_psnr(r, t)) for t in TASKS}
    out.append("Best PSNR per task: " + "; ".join(f"{t}: {ROWS[r][0]}" for t, r in best.items()) + ".")
    base = {t: statistics.fmean(table["_baseline"][t]["psnr"]) for t in TASKS}
    for row in have:
        below = [t for t in TASKS if mean_psnr(row, t) < base[t]]
        if below:
            out.append(f"{ROWS[row][0]} stays below copy-last-frame PSNR on {', '.join(below)}.")
    if "joint" in have:
        for other in [r for r in have if r != "joint"]:
            diffs = {t: mean_psnr("joint", t) - mean_psnr(other, t) for t in TASKS}
            wins = [t for t, d in diffs.items() if d > 0]
            out.append(f"Joint full method vs {ROWS[other][0]}: PSNR difference "
                       + ", ".join(f"{t} {d:+.2f} dB" for t, d in diffs.items())
                       + f" (ahead on {len(wins)} of {len(TASKS)}).")
    return " ".join(out)


def render(raw: dict[str, Any], notes: str = "") -> str:
    runs = {int(s): v for s, v in raw["runs"].items()}
    rows = [r for r in ROWS if r in raw["rows"]]
    common, seeds = raw["sizes"], raw["seeds"]
    table = collect(runs, rows)
    parts = [
        f"Four synthetic tasks; every row: {common['max_steps']} optimizer steps (batches of {common['batch_size']} "
        f"clips, one task per batch), seeds {seeds}, "
        + (f"frozen backbone `{raw['backbone']}`, " if raw.get("backbone") else
           f"a random frozen CLIP backbone (width {common['backbone_width']}, {common['backbone_layers']} layers, "
           f"{common['backbone_heads']} heads), ")
        + f"C'={common['hidden_channels']}, "
        f"{common['num_train']} training and {common['num_test']} test clips per task, AdamW lr 3e-3 with cosine "
        f"decay for every row. Single-task: one model per task, each given the same {common['max_steps']} steps as "
        f"the joint model (4x the joint compute in total; its parameters and times are summed in the first table). "
        f"Rank search (full method): the first {raw['search_fraction']:.0%} of the steps in single-task and joint "
        f"models alike. Spread: mean ± sample std over {len(seeds)} seeds (seeds change data, backbone, "
        f"initialisation). Wall time (s, mean over seeds) includes data loading, evaluation and writing outputs, "
        f"on a 2-core machine shared with other jobs, so it is noisy. Raw numbers: `docs/study_joint.json`; "
        f"whole study: {raw['total_wall_time_s'] / 60:.0f} min.",
        "\n### PSNR per task (dB), trainable parameters, wall time\n",
        summary_table(table, rows),
    ]
    for task in TASKS:
        parts += [f"\n### {task}\n", task_table(table, rows, task)]
    if raw.get("rank_pattern"):
        with_joint = [s for s in runs if "joint" in runs[s]]
        text, data = rank_pattern([runs[s]["joint"]["rank_summary"] for s in with_joint], "joint, full method")
        parts += ["\n### Final rank pattern of the joint full method (sum of expert ranks, mean over seeds)\n", text,
                  (f"\nTotal rank per seed: {data['total_rank_per_seed']} (before the search: "
                  f"{4.5 * sum(len(r) for r in runs[with_joint[0]]['joint']['rank_summary'].values()):g}"
                  f" = 4.5 per expert); experts at rank 0 per seed: "
                  f"{data['zero_rank_experts_per_seed']}.")]
        before = {s: runs[s]["joint"].get("ranks_before_rounding") for s in with_joint}
        before = {s: b for s, b in before.items() if b}
        if before:
            parts.append("Continuous ranks at the end of the search, before rounding (floor(r + 0.5)): " + "; ".join(
                f"seed {s}: {b['min']:.2f}–{b['max']:.2f}, total {b['total']:.1f}" for s, b in before.items()) + ".")
    if "single" in rows:
        totals = {t: [runs[s]["single"][t]["total_rank"] for s in runs if "single" in runs[s]] for t in TASKS}
        parts.append("Total rank of the single-task full-method models, per seed: "
                     + "; ".join(f"{t} {v}" for t, v in totals.items()) + ".")
    parts += ["\n### Findings (computed)\n", findings(table, rows)]
    if notes.strip():
        parts += ["\n### Interpretation\n", notes.strip()]
    return "\n".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.from_json:  # re-render tables (and new notes) from a finished study
        raw = json.loads(Path(args.from_json).read_text())
        if raw.get("torch_threads"):  # the machine stamp reports the threads the study ran with
            import torch

            torch.set_num_threads(raw["torch_threads"])
        body = render(raw, notes)
        print(body)
        if args.write_docs:
            write_section("study_joint", body, command=raw["command"])
            print("wrote docs/RESULTS.md")
        return
    if args.json is None:
        args.json = str(JSON_PATH) if args.write_docs else str(Path(args.output_dir) / "study_joint.json")
    common = sizes(args)
    rows = args.rows
    if args.threads or args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads or 1)
    started = time.time()
    runs: dict[int, dict[str, Any]] = {}
    plans: dict[str, Any] = {}
    for seed in args.seeds:  # one seed after the other: an interrupted study has whole seeds
        runs[seed] = {}
        for row in rows:
            label, _, per_task = ROWS[row]
            groups = [[t] for t in TASKS] if per_task else [TASKS]
            results = {}
            for tasks in groups:
                kwargs, plan = training_arguments(row, tasks, seed, common, args)
                plans[f"{row}/{'+'.join(tasks) if per_task else 'joint'}"] = plan
                t0 = time.time()
                print(f"[{time.time() - started:6.0f}s] seed {seed} {label} {tasks if per_task else ''}: "
                      f"{common['max_steps']} steps, {plan['epochs']} epochs, search {plan['search_steps']} steps",
                      flush=True)
                report = run_one(kwargs, args)
                print(f"         done in {time.time() - t0:.0f}s; PSNR " + ", ".join(
                    f"{t}={v['model']['psnr']:.2f}" for t, v in report["tasks"].items()), flush=True)
                results[tasks[0]] = summarize_run(report, plan)
            runs[seed][row] = results if per_task else results[TASKS[0]]
            save_raw(args, common, rows, plans, runs, time.time() - started, partial=True)
    total = time.time() - started
    raw = save_raw(args, common, rows, plans, runs, total, partial=False)
    body = render(raw, notes)
    print(body)
    print(f"\ntotal wall time {total:.0f}s; raw numbers in {args.json}")
    if args.write_docs:
        write_section("study_joint", body, command=raw["command"])
        print("wrote docs/RESULTS.md")
    else:
        print("docs/ left untouched (pass --write-docs to update docs/RESULTS.md and docs/study_joint.json)")


def save_raw(args, common, rows, plans, runs, total: float, partial: bool) -> dict[str, Any]:
    """All raw numbers; written after every row so an interrupted study can be rendered with --from_json."""
    runs = {s: v for s, v in runs.items() if v}
    raw = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "sizes": common, "seeds": args.seeds, "rows": {r: ROWS[r][0] for r in rows},
        "search_fraction": args.search_fraction, "plans": plans, "total_wall_time_s": round(total, 1),
        "backbone": args.backbone, "partial": partial, "torch_threads": torch_threads(),
        "runs": {str(s): v for s, v in runs.items()},
    }
    with_joint = [s for s in runs if "joint" in runs[s]]
    if with_joint:
        summaries = [runs[s]["joint"]["rank_summary"] for s in with_joint]
        raw["rank_pattern"] = rank_pattern(summaries, "joint, full method")[1]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(raw, indent=1))
    return raw


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
