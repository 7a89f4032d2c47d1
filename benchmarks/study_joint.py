"""The paper's four claims, compute-fair, with a control that removes the Transformer.

Every row is trained by `unistd_hf.training.train` on the four synthetic tasks (moving_digits, city_traffic,
rain_nowcast, robot_shapes) at **equal exposure per task**: each row sees `--batches_per_task` batches of every
task (the joint models 4x that in total, round-robin; a single-task model that many of its one task, so it costs
4x less than a joint row). Rows (`ROWS`; what each answers):

  joint                   joint UniSTD, full method (RankMoE + rank search + temporal adapter), pretrained backbone
  single                  one full-method model per task                  claim 1: joint ~ single-task
  joint_no_transformer    heads only: same encoders, decoders, residual   control: does the shared part earn its cost
  joint_no_adapter        frozen backbone, no adapter (heads + temporal)  do the experts earn their parameters
  joint_lora              one expert at rank 8 (= LoRA)                   claim 2: rank-adaptive experts > LoRA
  joint_fixed_rank        the experts at fixed rank, no search            claim 2: the search itself
  joint_no_temporal       the full method without temporal adapters       claim 3: the temporal adapter
  joint_random_backbone   the full method on a random CLIP of the same shape   claim 4: pretraining (Table 5)
  simvp, tau              SimVP / TAU, one model per task, same loop      the paper's baselines (Table 2)
  joint_full_ft           backbone fine-tuned, no adapter (not run by default)
  copy-last-frame         the floor, in every report

The backbone is the pretrained one shipped with the package (`unistd-hf/clip-mae-tiny`, docs/PRETRAINING.md) unless
`--backbone` names another; the random-backbone row gets a random CLIP of exactly its shape. The rank search covers
the first `--search_fraction` of the epochs, the same number of batches per task in single-task and joint models.
Every run evaluates its validation clips `--curve_points` times: the curves (mean over seeds) go to
`docs/study_joint_curves.png`, so a reader sees whether training has flattened. Seeds change data, initialisation,
random backbone and task order; a seed's rows share all of them.

Reported per task: MSE, PSNR, SSIM, ssim_openstl (and CSI, mean over the six SEVIR VIL thresholds, for rain_nowcast),
trainable parameters and wall time, mean ± sample std over seeds; final ranks of the full method; and findings per
claim computed from the numbers, paired by seed: a difference whose 95 % confidence interval (Student's t over the
per-seed differences) includes 0 is reported as no difference. With --write-docs the tables go to docs/RESULTS.md
(section "study_joint"), the raw numbers to docs/study_joint.json and the curves to docs/study_joint_curves.png;
without it, everything stays in --output_dir.

    python benchmarks/study_joint.py --jobs 2 --write-docs     # the default study: 133 min on 2 CPU cores
    python benchmarks/study_joint.py --tiny                    # smoke test, a few minutes
    python benchmarks/study_joint.py --scale 8 --device auto --backbone openai/clip-vit-base-patch16  # a GPU
    python benchmarks/study_joint.py --rows joint joint_no_transformer --seeds 0 1 2
    python benchmarks/study_joint.py --from_json docs/study_joint.json --notes notes.md --write-docs  # re-render

Runs execute one after the other in this process, or with `--jobs N` in N fresh Python processes side by side
(`--threads` torch threads each). A run's folder is deleted before it starts (no stale checkpoint is picked up);
`--reuse` keeps a finished run whose arguments match, to finish an interrupted study.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from unistd_hf.pretrain import PACKAGED_BACKBONE  # noqa: E402

TASKS = list_tasks(synthetic=True)
DOCS = ROOT / "docs"
BASELINE_LABEL = "copy-last-frame"
METRICS = ("mse", "psnr", "ssim", "ssim_openstl", "csi")
# Student's t, 97.5 % quantile, by degrees of freedom (seeds - 1): the 95 % interval of a paired mean difference.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Row:
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    per_task: bool = False  # one run per task (single-task models); else one run on all tasks
    default: bool = True


FULL = {"adapter": "rankmoe"}
ROWS: dict[str, Row] = {
    "joint": Row("joint, full method", FULL),
    "single": Row("single-task, full method", FULL, per_task=True),
    "joint_no_transformer": Row("joint, no Transformer (heads only)",
                                {"adapter": "none", "use_backbone": False, "use_temporal_adapter": False}),
    "joint_no_adapter": Row("joint, frozen backbone, no adapter", {"adapter": "none"}),
    "joint_lora": Row("joint, plain LoRA r=8", {"adapter": "lora", "max_rank": 8}),
    "joint_fixed_rank": Row("joint, experts at fixed rank", {"adapter": "fixed_rank"}),
    "joint_no_temporal": Row("joint, no temporal adapter", {**FULL, "use_temporal_adapter": False}),
    "joint_random_backbone": Row("joint, random backbone", {**FULL, "backbone": "random"}),
    "simvp": Row("SimVP, one model per task", {"method": "simvp"}),
    "tau": Row("TAU, one model per task", {"method": "tau"}),
    "joint_full_ft": Row("joint, backbone fine-tuned", {"adapter": "none", "finetune_backbone": True}, default=False),
}
DEFAULT_ROWS = [name for name, row in ROWS.items() if row.default]


# ---------------------------------------------------------------------------------------------------------------------
# Sizes and the arguments of each run


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields every run shares, after --tiny / --scale and explicit overrides."""
    if args.tiny:
        base = {"batches_per_task": 2, "num_train": 8, "batch_size": 4, "num_test": 4, "num_validation": 4,
                "hidden_channels": 8, "curve_points": 2}
    else:
        base = {"batches_per_task": 256, "num_train": 512, "batch_size": 8, "num_test": 64, "num_validation": 16,
                "hidden_channels": 16, "curve_points": 8}
    if args.scale != 1:  # a GPU: more batches and clips, wider heads (the backbone is --backbone's)
        base["batches_per_task"] *= args.scale
        base["num_train"] *= args.scale
        base["num_test"] = min(base["num_test"] * args.scale, 512)
        base["hidden_channels"] *= 2
    for key in base:
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    return base


def random_backbone_shape(backbone: str) -> dict[str, int]:
    """backbone_width/layers/heads of the pretrained backbone: the random-backbone row gets the same shape."""
    from transformers import CLIPVisionConfig

    from unistd_hf.pretrain import resolve_backbone

    config = CLIPVisionConfig.from_pretrained(resolve_backbone(backbone))
    return {"backbone_width": config.hidden_size, "backbone_layers": config.num_hidden_layers,
            "backbone_heads": config.num_attention_heads}


def run_arguments(row: str, tasks: list[str], seed: int, common: dict[str, Any], args) -> dict[str, Any]:
    """TrainingArguments fields of one run: `batches_per_task` batches of each of `tasks` (round-robin over equal
    clip counts gives exactly that), the search over the first `search_fraction` of the epochs."""
    spec = ROWS[row]
    per_epoch = common["num_train"] // common["batch_size"]  # batches of each task per epoch
    epochs = math.ceil(common["batches_per_task"] / per_epoch)
    steps = common["batches_per_task"] * len(tasks)
    searching = spec.overrides.get("adapter") == "rankmoe" and "method" not in spec.overrides
    name = row if not spec.per_task else f"{row}_{tasks[0]}"
    kwargs = dict(
        tasks=tasks, seed=seed, epochs=epochs, max_steps=steps, num_train=common["num_train"], num_train_per_task="",
        num_test=common["num_test"], num_validation=common["num_validation"], batch_size=common["batch_size"],
        hidden_channels=common["hidden_channels"], backbone=args.backbone, **common["random_shape"],
        rank_search_epochs=max(round(args.search_fraction * epochs), 1) if searching else 0,
        eval_every=max(steps // common["curve_points"], 1), log_every=max(steps // 20, 1),
        output_dir=str(Path(args.output_dir) / f"seed{seed}" / name), cache_dir=args.cache_dir,
        cpu=args.device == "cpu", mixed_precision=args.mixed_precision, keep_checkpoints=1,
    )
    kwargs.update(spec.overrides)
    return kwargs


def planned_runs(rows: list[str], seeds: list[int], common: dict[str, Any], args) -> list[tuple[int, str, dict]]:
    """(seed, row, kwargs) of every run, seed after seed (an interrupted study has whole seeds first)."""
    plan = []
    for seed in seeds:
        for row in rows:
            for tasks in ([[t] for t in TASKS] if ROWS[row].per_task else [TASKS]):
                plan.append((seed, row, run_arguments(row, tasks, seed, common, args)))
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Running


def prepare_data(seeds: list[int], common: dict[str, Any], cache_dir: str) -> None:
    """Generate every task's clips once per seed, before runs share the cache side by side (as `train()` loads them)."""
    from unistd_hf.data import load_task

    for seed in seeds:
        for task in TASKS:
            load_task(task, seed=seed, cache_dir=cache_dir, num_train=common["num_train"],
                      num_validation=common["num_validation"], num_test=common["num_test"])


def run_one(kwargs: dict[str, Any], args) -> dict[str, Any]:
    output = Path(kwargs["output_dir"])
    report_path = output / "report.json"
    if args.reuse and report_path.exists():
        report = json.loads(report_path.read_text())
        if {k: report["arguments"].get(k) for k in kwargs} == kwargs:
            return report
    shutil.rmtree(output, ignore_errors=True)  # no stale checkpoint, log or backbone from an older run
    if args.jobs > 1:
        code = ("import json,sys,torch; from unistd_hf.training import TrainingArguments, train; "
                f"torch.set_num_threads({args.threads}); train(TrainingArguments(**json.loads(sys.argv[1])))")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output.parent / f"{output.name}.log", "w") as log:  # the run's warnings and errors
            subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True, cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=log)
        report = json.loads(report_path.read_text())
    else:
        from unistd_hf.training import TrainingArguments, train

        report = train(TrainingArguments(**kwargs))
    report["_search_ranks"] = ranks_before_rounding(output)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)  # the adapter and report are what we keep
    return report


def ranks_before_rounding(output: Path) -> dict[str, Any] | None:
    """The last logged continuous ranks before discretization (kept only in the checkpoint's trainer state)."""
    states = sorted((output / "checkpoints").glob("step-*/trainer_state.json"))
    if not states:
        return None
    history = json.loads(states[-1].read_text()).get("rank_history", [])
    continuous = [h for h in history if any(r != round(r) for ranks in h["ranks"].values() for r in ranks)]
    if not continuous:
        return None
    values = [r for ranks in continuous[-1]["ranks"].values() for r in ranks]
    return {"step": continuous[-1]["step"], "min": min(values), "max": max(values), "total": sum(values)}


def summarize_run(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "tasks": {name: {"model": v["model"], "baseline": v["baseline"]} for name, v in report["tasks"].items()},
        "trainable_parameters": report["parameters"]["total"]["trainable"],
        "parameters": report["parameters"],
        "wall_time_s": report["wall_time_s"],
        "steps": report["steps"],
        "batches_per_task": report["batches_per_task"],
        "validation_history": report.get("validation_history", []),
        "rank_summary": report.get("rank_summary"),
        "total_rank": report.get("total_rank"),
        "ranks_before_rounding": report.get("_search_ranks"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation


def task_metrics(metrics: dict[str, float]) -> dict[str, float]:
    out = {k: metrics[k] for k in METRICS if k in metrics}
    csi = [v for k, v in metrics.items() if k.startswith("csi@")]
    if csi:
        out["csi"] = sum(csi) / len(csi)
    return out


def row_parts(runs: dict[str, Any], row: str) -> list[dict[str, Any]]:
    """The runs of one row in one seed: four for a single-task row, else one."""
    entry = runs[row]
    return [entry[t] for t in TASKS if t in entry] if ROWS[row].per_task else [entry]


def run_for(runs: dict[str, Any], row: str, task: str) -> dict[str, Any] | None:
    entry = runs.get(row)
    if entry is None:
        return None
    return entry.get(task) if ROWS[row].per_task else entry


def collect(runs: dict[int, dict[str, Any]], rows: list[str]) -> dict[str, Any]:
    """table[row] = metrics[task][metric] -> per-seed list, params/time per task and per row; table["_baseline"]."""
    table: dict[str, Any] = {}
    for row in rows:
        entry = {"seeds": [], "metrics": {t: {} for t in TASKS}, "params_task": {t: [] for t in TASKS},
                 "time_task": {t: [] for t in TASKS}, "params_row": [], "time_row": []}
        for seed in sorted(runs):
            if row not in runs[seed] or (ROWS[row].per_task and len(runs[seed][row]) < len(TASKS)):
                continue
            parts = row_parts(runs[seed], row)
            entry["seeds"].append(seed)
            entry["params_row"].append(sum(p["trainable_parameters"] for p in parts))
            entry["time_row"].append(sum(p["wall_time_s"] for p in parts))
            for task in TASKS:
                run = run_for(runs[seed], row, task)
                for metric, value in task_metrics(run["tasks"][task]["model"]).items():
                    entry["metrics"][task].setdefault(metric, []).append(value)
                entry["params_task"][task].append(run["trainable_parameters"])
                entry["time_task"][task].append(run["wall_time_s"])
        table[row] = entry
    baseline: dict[str, dict[str, list[float]]] = {t: {} for t in TASKS}
    for seed in sorted(runs):
        for task in TASKS:
            source = next((run_for(runs[seed], r, task) for r in runs[seed] if run_for(runs[seed], r, task)), None)
            if source:
                for metric, value in task_metrics(source["tasks"][task]["baseline"]).items():
                    baseline[task].setdefault(metric, []).append(value)
    table["_baseline"] = baseline
    return table


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], metric: str) -> str:
    mean, std = spread(values)
    if metric == "mse":
        return f"{mean * 1e3:.2f} ± {std * 1e3:.2f}"
    digits = 2 if metric == "psnr" else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def params_str(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{int(statistics.fmean(values)):,}" if len(set(values)) == 1 else f"{min(values):,}–{max(values):,}"


def ready(table: dict[str, Any], rows: list[str]) -> list[str]:
    return [r for r in rows if table[r]["params_row"]]


def row_label(row: str) -> str:
    return ROWS[row].label + (" (4 models)" if ROWS[row].per_task else "")


def summary_table(table: dict[str, Any], rows: list[str], metric: str) -> str:
    head = f"| configuration | {' | '.join(TASKS)} | trainable params | wall time (s) |"
    lines = [head, "|---" + "|---:" * (len(TASKS) + 2) + "|"]
    for row in ready(table, rows):
        cells = [fmt(table[row]["metrics"][t][metric], metric) for t in TASKS]
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + f" | {params_str(table[row]['params_row'])} | "
                     f"{statistics.fmean(table[row]['time_row']):.0f} |")
    base = table["_baseline"]
    lines.append(f"| {BASELINE_LABEL} | " + " | ".join(fmt(base[t][metric], metric) for t in TASKS) + " | 0 | - |")
    return "\n".join(lines)


def task_table(table: dict[str, Any], rows: list[str], task: str) -> str:
    metrics = [m for m in METRICS if m in table["_baseline"][task]]
    names = {"mse": "MSE ×1e3 ↓", "psnr": "PSNR ↑", "ssim": "SSIM ↑", "ssim_openstl": "SSIM (OpenSTL) ↑",
             "csi": "CSI (mean of 6 thr.) ↑"}
    lines = [f"| configuration | {' | '.join(names[m] for m in metrics)} | trainable params | wall time (s) |",
             "|---" + "|---:" * (len(metrics) + 2) + "|"]
    for row in ready(table, rows):
        m = table[row]["metrics"][task]
        lines.append(f"| {ROWS[row].label} | " + " | ".join(fmt(m[k], k) for k in metrics)
                     + f" | {params_str(table[row]['params_task'][task])}"
                     + f" | {statistics.fmean(table[row]['time_task'][task]):.0f} |")
    base = table["_baseline"][task]
    lines.append(f"| {BASELINE_LABEL} | " + " | ".join(fmt(base[k], k) for k in metrics) + " | 0 | - |")
    return "\n".join(lines)


def rank_pattern(summaries: list[dict[str, list[float]]]) -> tuple[str, dict[str, Any]]:
    """Total rank per layer and module kind (mean over seeds), experts at rank 0, and the totals."""
    per_cell: dict[tuple[int, str], list[float]] = {}
    experts: dict[str, int] = {}
    for summary in summaries:
        for name, ranks in summary.items():
            kind = next((k for k in MODULE_KINDS if name.endswith(k)), name.rsplit(".", 1)[-1])
            layer = int(re.search(r"(?:layers|temporal_adapters)\.(\d+)\.", name).group(1))
            per_cell.setdefault((layer, kind), []).append(sum(ranks))
            experts[kind] = len(ranks)
    layers = sorted({layer for layer, _ in per_cell})
    kinds = [k for k in MODULE_KINDS if k in experts]
    lines = ["| layer | " + " | ".join(f"{k} ({experts[k]} exp.)" for k in kinds) + " | layer total |",
             "|---" + "|---:" * (len(kinds) + 1) + "|"]
    for layer in layers:
        cells = [statistics.fmean(per_cell.get((layer, k), [0.0])) for k in kinds]
        lines.append(f"| {layer} | " + " | ".join(f"{c:g}" for c in cells) + f" | {sum(cells):g} |")
    totals = [sum(statistics.fmean(per_cell.get((layer, k), [0.0])) for layer in layers) for k in kinds]
    lines.append("| **all** | " + " | ".join(f"{c:g}" for c in totals) + f" | {sum(totals):g} |")
    data = {"per_layer_kind": {f"{layer}/{k}": v for (layer, k), v in per_cell.items()},
            "total_rank_per_seed": [sum(sum(r) for r in s.values()) for s in summaries],
            "zero_rank_experts_per_seed": [sum(1 for r in s.values() for x in r if x == 0) for s in summaries],
            "experts": sum(len(r) for r in summaries[0].values())}
    return "\n".join(lines), data


# ---------------------------------------------------------------------------------------------------------------------
# Findings


def verdict(table: dict[str, Any], a: str, b: str, task: str, metric: str) -> tuple[float, float, str]:
    """(difference, spread, 'better' | 'worse' | 'no difference' | 'one seed') of row a against row b; for MSE lower
    is better. Paired by seed (a seed's rows share data, backbone and initialisation, so the seeds' different data do
    not count as noise): the difference is the mean over seeds of a - b, the spread the half-width of its 95 %
    confidence interval (Student's t, n-1 degrees of freedom: 12.7 x std / sqrt(2) for two seeds). A difference
    within the spread is no difference; one seed gives no verdict."""
    def by_seed(row: str) -> dict[int, float]:
        return dict(zip(table[row]["seeds"], table[row]["metrics"][task][metric]))

    values_a, values_b = by_seed(a), by_seed(b)
    diffs = [values_a[s] - values_b[s] for s in sorted(set(values_a) & set(values_b))]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), 0.0, "one seed"
    diff = statistics.fmean(diffs)
    noise = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    if abs(diff) <= noise:
        return diff, noise, "no difference"
    return diff, noise, "better" if (diff < 0 if metric == "mse" else diff > 0) else "worse"


def comparison(table: dict[str, Any], a: str, b: str) -> tuple[str, dict[str, int]]:
    """One sentence: a against b per task (PSNR and SSIM), and the count of verdicts over both metrics."""
    counts = {"better": 0, "worse": 0, "no difference": 0, "one seed": 0}
    parts = []
    for task in TASKS:
        cells = []
        for metric, unit in (("psnr", " dB"), ("ssim", "")):
            diff, noise, word = verdict(table, a, b, task, metric)
            counts[word] += 1
            cells.append(f"{metric.upper()} {diff:+.{2 if metric == 'psnr' else 3}f}{unit} ({word})")
        parts.append(f"{task} " + ", ".join(cells))
    return "; ".join(parts), counts


def overall(counts: dict[str, int]) -> str:
    n = sum(counts.values())
    if counts["one seed"]:
        return f"one seed only on {counts['one seed']} of {n} task-metrics, so no verdict"
    if counts["better"] and not counts["worse"]:
        return f"better on {counts['better']} of {n} task-metrics, never worse"
    if counts["worse"] and not counts["better"]:
        return f"worse on {counts['worse']} of {n} task-metrics, never better"
    if not counts["better"] and not counts["worse"]:
        return f"no difference on any of the {n} task-metrics"
    return f"better on {counts['better']}, worse on {counts['worse']}, no difference on {counts['no difference']} of {n}"


# (label, row a, row b, what a against b answers); a is the subject of the sentence
CLAIMS = (
    ("Control (the shared Transformer)", "joint", "joint_no_transformer",
     "the full model against the same heads with no Transformer at all"),
    ("Claim 1 (joint ~ single-task)", "joint", "single", "one joint model against one model per task"),
    ("Claim 2 (rank-adaptive experts > LoRA)", "joint", "joint_lora", "the full method against plain LoRA r=8"),
    ("Claim 2 (the rank search)", "joint", "joint_fixed_rank", "the full method against the same experts at fixed rank"),
    ("Claim 3 (temporal adapter)", "joint", "joint_no_temporal", "the full method against it without temporal adapters"),
    ("The experts' parameters", "joint", "joint_no_adapter", "the full method against the frozen backbone with no adapter"),
    ("Claim 4 (pretraining)", "joint", "joint_random_backbone",
     "the full method on the pretrained backbone against a random one of the same shape"),
    ("Baselines", "joint", "simvp", "the full method against SimVP, one model per task"),
    ("Baselines", "joint", "tau", "the full method against TAU, one model per task"),
)


def findings(table: dict[str, Any], rows: list[str]) -> str:
    """A paragraph per claim computed from the numbers, so the text cannot drift from the tables."""
    have = set(ready(table, rows))
    lines = []
    for label, a, b, question in CLAIMS:
        if a in have and b in have:
            text, counts = comparison(table, a, b)
            lines.append(f"- **{label}**: {question}: {overall(counts)}. {text}.")
    if {"joint", "joint_no_transformer"} <= have:
        _, counts = comparison(table, "joint", "joint_no_transformer")
        if not counts["better"] and not counts["one seed"]:
            lines.insert(0, "**The no-Transformer control matches or beats the full model** (no task-metric where the "
                         "full model is better beyond the spread): at this scale the per-task heads and the residual "
                         "to the last frame do the work, and the shared backbone with its adapters does not earn its "
                         "cost.\n")
    base = table["_baseline"]
    for row in sorted(have):
        below = [t for t in TASKS if statistics.fmean(table[row]["metrics"][t]["ssim"]) < statistics.fmean(base[t]["ssim"])]
        if below:
            lines.append(f"- {ROWS[row].label} stays below copy-last-frame SSIM on {', '.join(below)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Curves and rendering


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Seeds' validation histories averaged record by record (runs of one row log at the same steps)."""
    length = min(len(h) for h in histories)
    out = []
    for records in zip(*(h[:length] for h in histories)):
        merged = {"task_batches": records[0]["task_batches"]}
        for key in records[0]:
            if key.startswith("val/") and all(key in r for r in records):
                merged[key] = statistics.fmean(r[key] for r in records)
        out.append(merged)
    return out


def row_history(runs: dict[str, Any], row: str) -> list[dict]:
    """A row's validation history in one seed; a single-task row's four histories are merged record by record."""
    histories = [part["validation_history"] for part in row_parts(runs, row)]
    merged = []
    for records in zip(*histories):
        record = {"task_batches": {}}
        for part in records:
            record["task_batches"].update(part["task_batches"] if len(histories) == 1 else
                                          {t: n for t, n in part["task_batches"].items() if n})
            record.update({k: v for k, v in part.items() if k.startswith("val/")})
        merged.append(record)
    return merged


def plot_curves(runs: dict[int, dict[str, Any]], rows: list[str], path: Path) -> Path:
    from unistd_hf.report import plot_validation_curves

    curves = {}
    for row in rows:
        per_seed = [row_history(runs[s], row) for s in sorted(runs) if row in runs[s]]
        per_seed = [h for h in per_seed if h]
        if per_seed:
            curves[ROWS[row].label] = mean_history(per_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_validation_curves(curves, path)


def render(raw: dict[str, Any], notes: str = "", curves: str | None = None) -> str:
    runs = {int(s): v for s, v in raw["runs"].items()}
    rows = [r for r in ROWS if r in raw["rows"]]
    common, seeds = raw["sizes"], raw["seeds"]
    table = collect(runs, rows)
    parts = [
        f"Four synthetic tasks. **Equal exposure per task**: every row sees {common['batches_per_task']} batches of "
        f"{common['batch_size']} clips of each task (a joint row {common['batches_per_task'] * len(TASKS)} batches in "
        f"total, round-robin; each single-task model {common['batches_per_task']} of its own task, so a single-task "
        f"model costs {len(TASKS)}x less; the single-task, SimVP and TAU rows are four models whose parameters and "
        f"wall times are summed). Frozen backbone `{raw['backbone']}` (random-backbone row: a random CLIP of the same "
        f"shape, {common['random_shape']}), C'={common['hidden_channels']}, {common['num_train']} training, "
        f"{common['num_validation']} validation and {common['num_test']} test clips per task, AdamW lr 3e-3 with "
        f"cosine decay and the library's default loss (MSE + L1) for every row; rank search over the first "
        f"{raw['search_fraction']:.0%} of the epochs. Seeds {seeds}: mean ± sample std over seeds (the seeds differ in "
        f"data, so the std mostly shows how hard each seed's clips are). Findings compare two rows paired by seed: "
        f"the mean of the per-seed differences with its 95 % confidence interval (Student's t); a difference whose "
        f"interval includes 0 is reported as no difference, and with two seeds only a large, consistent difference "
        f"passes. Wall time: seconds per row inside `train()` "
        f"({raw['jobs']} run(s) side by side with {raw['threads']} torch thread(s) each, so it is indicative only). "
        f"Whole study: {raw['total_wall_time_s'] / 60:.0f} min. Raw numbers: `docs/study_joint.json`."
        + (" **Partial: not every run finished.**" if raw.get("partial") else ""),
        "\n### PSNR per task (dB)\n", summary_table(table, rows, "psnr"),
        "\n### SSIM per task\n", summary_table(table, rows, "ssim"),
    ]
    if curves:
        parts += [f"\n![validation MSE against the batches of each task, mean over seeds]({curves})"]
    for task in TASKS:
        parts += [f"\n### {task}\n", task_table(table, rows, task)]
    with_joint = [s for s in runs if runs[s].get("joint", {}).get("rank_summary")]
    if with_joint:
        text, data = rank_pattern([runs[s]["joint"]["rank_summary"] for s in with_joint])
        parts += ["\n### Final ranks of the joint full method (sum of expert ranks per layer and projection, mean "
                  "over seeds)\n", text,
                  f"\nTotal rank per seed: {data['total_rank_per_seed']} over {data['experts']} experts; experts at "
                  f"rank 0 per seed: {data['zero_rank_experts_per_seed']}."]
        before = {s: runs[s]["joint"].get("ranks_before_rounding") for s in with_joint}
        if any(before.values()):
            parts.append("Continuous ranks at the end of the search, before rounding: " + "; ".join(
                f"seed {s}: {b['min']:.2f}–{b['max']:.2f}, total {b['total']:.1f}" for s, b in before.items() if b) + ".")
    parts += ["\n### Findings (computed)\n", findings(table, rows)]
    if notes.strip():
        parts += ["\n### Reading\n", notes.strip()]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds; every row runs once per seed.")
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS), help="Configurations to run.")
    p.add_argument("--scale", type=int, default=1, help="Multiply batches and clips by this and double C' (a GPU).")
    p.add_argument("--tiny", action="store_true", help="Smoke-test size (a few minutes on a CPU).")
    p.add_argument("--backbone", default=PACKAGED_BACKBONE, help="The pretrained backbone (hub id or folder).")
    p.add_argument("--device", choices=["auto", "cpu"], default="cpu",
                   help="'cpu' forces the CPU; 'auto' lets Accelerate take a GPU when present.")
    p.add_argument("--jobs", type=int, default=1, help="Runs side by side, each in its own Python process.")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (on a shared 2-core machine more "
                   "threads than cores ran 2-10x slower).")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--search_fraction", type=float, default=0.5, help="Fraction of the epochs spent on rank search.")
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "study"), help="One sub-folder per seed and run.")
    p.add_argument("--cache_dir", default=str(ROOT / "outputs" / "study" / "data-cache"), help="Shared datasets cache.")
    for key in ("batches_per_task", "num_train", "num_test", "num_validation", "batch_size", "hidden_channels",
                "curve_points"):
        p.add_argument(f"--{key}", type=int, default=None, help="Override the size preset.")
    p.add_argument("--reuse", action="store_true", help="Keep finished runs whose arguments match.")
    p.add_argument("--write-docs", "--write_docs", dest="write_docs", action="store_true",
                   help="Write docs/RESULTS.md, docs/study_joint.json and docs/study_joint_curves.png.")
    p.add_argument("--notes", default=None, help="A text file added as the reading of the findings.")
    p.add_argument("--from_json", default=None, help="Render from a saved JSON instead of training.")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    return args


def publish(raw: dict[str, Any], args, notes: str) -> None:
    """Tables and curves: into docs/ with --write-docs, else beside the runs."""
    target = DOCS if args.write_docs else Path(args.output_dir)
    curves = plot_curves({int(s): v for s, v in raw["runs"].items()}, [r for r in ROWS if r in raw["rows"]],
                         target / "study_joint_curves.png")
    body = render(raw, notes, curves.name)
    print(body)
    if args.write_docs:
        (DOCS / "study_joint.json").write_text(json.dumps(raw, indent=1))
        write_section("study_joint", body, command=raw["command"])
        print("wrote docs/RESULTS.md, docs/study_joint.json, docs/study_joint_curves.png")


def main(argv=None) -> None:
    args = parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.from_json:
        publish(json.loads(Path(args.from_json).read_text()), args, notes)
        return
    import torch

    torch.set_num_threads(args.threads)
    common = sizes(args)
    common["random_shape"] = random_backbone_shape(args.backbone)
    plan = planned_runs(args.rows, args.seeds, common, args)
    started = time.time()
    prepare_data(args.seeds, common, args.cache_dir)
    runs: dict[int, dict[str, Any]] = {seed: {} for seed in args.seeds}
    raw_path = Path(args.output_dir) / "study_joint.json"

    def finished(seed: int, row: str, kwargs: dict, report: dict) -> None:
        summary = summarize_run(report)
        if ROWS[row].per_task:
            runs[seed].setdefault(row, {})[kwargs["tasks"][0]] = summary
        else:
            runs[seed][row] = summary
        print(f"[{(time.time() - started) / 60:5.1f} min] seed {seed} {ROWS[row].label} {kwargs['tasks']}: "
              f"{report['wall_time_s']:.0f} s; PSNR " + ", ".join(
                  f"{t}={v['model']['psnr']:.2f}" for t, v in report["tasks"].items()), flush=True)
        save_raw(raw_path, args, common, runs, time.time() - started, partial=True)

    print(f"{len(plan)} runs, {args.jobs} side by side", flush=True)
    if args.jobs == 1:
        for seed, row, kwargs in plan:
            finished(seed, row, kwargs, run_one(kwargs, args))
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [(seed, row, kwargs, pool.submit(run_one, kwargs, args)) for seed, row, kwargs in plan]
            for seed, row, kwargs, future in futures:
                finished(seed, row, kwargs, future.result())
    raw = save_raw(raw_path, args, common, runs, time.time() - started, partial=False)
    publish(raw, args, notes)
    print(f"\ntotal wall time {raw['total_wall_time_s'] / 60:.0f} min; raw numbers in {raw_path}")


def save_raw(path: Path, args, common, runs, total: float, partial: bool) -> dict[str, Any]:
    """All raw numbers; written after every run so an interrupted study can be rendered with --from_json."""
    raw = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "sizes": common, "seeds": args.seeds, "rows": {r: ROWS[r].label for r in args.rows},
        "search_fraction": args.search_fraction, "total_wall_time_s": round(total, 1), "backbone": args.backbone,
        "jobs": args.jobs, "threads": args.threads, "partial": partial,
        "runs": {str(s): v for s, v in runs.items() if v},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1))
    return raw


if __name__ == "__main__":
    main()
