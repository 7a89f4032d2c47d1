"""Adding a task to a trained model: how good is the new task, and do the old ones stay exactly as they were?

On the four synthetic tasks, at the sizes of benchmarks/study_joint.py (`--batches_per_task` batches of every task
a model trains on), one seed:

  three-task joint         the full method trained on every task but `--new_task`
  + new task (none)        `--init_from` that adapter `--tasks <new task> --adapt_shared none`: only the new task's
                           heads train, for the same batches of the new task as every other row
  + new task (new_experts) the same with `--adapt_shared new_experts`: its heads and 2 experts of its own per layer
  four-task joint          the full method on all four tasks (the study's `joint` row)
  single-task              the full method on the new task alone (the study's `single` row)

The old tasks are evaluated with the three-task adapter and with each extended one on the same test clips; every
number must be identical (the script stops otherwise). With --write-docs the table goes to
docs/RESULTS.md (section "add_task"). Runs whose report matches the arguments are reused from --study_dir (the
study's output folder) or --output_dir, so after the study only three runs are new.

    python benchmarks/add_task.py --study_dir outputs/study --write-docs
    python benchmarks/add_task.py --tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import study_joint as study  # noqa: E402
from _results import write_section  # noqa: E402


def reusable(kwargs: dict[str, Any], folders: list[Path]) -> dict[str, Any] | None:
    """The report of a finished run with exactly these arguments (apart from where it was written), if any."""
    for folder in folders:
        path = folder / "report.json"
        if path.is_file():
            report = json.loads(path.read_text())
            if all(report["arguments"].get(k) == v for k, v in kwargs.items() if k not in ("output_dir", "cache_dir")):
                return report
    return None


def run(kwargs: dict[str, Any], reuse_from: list[Path]) -> dict[str, Any]:
    from unistd_hf.training import TrainingArguments, train

    report = reusable(kwargs, [Path(kwargs["output_dir"])] + reuse_from)
    if report is None:
        report = train(TrainingArguments(**{**kwargs, "overwrite_output_dir": True}))
    return report


def old_task_metrics(before: Path, after: Path, tasks: list[str], common: dict[str, Any], seed: int, cache: str):
    """{task: (metrics with the old adapter, metrics with the extended adapter)} on the same test clips."""
    from unistd_hf.data import load_task
    from unistd_hf.peft_integration import load_unistd_peft_model
    from unistd_hf.training import evaluate_task, task_data

    models = [load_unistd_peft_model(folder).eval() for folder in (before, after)]
    out = {}
    for name in tasks:
        data = load_task(name, seed=seed, cache_dir=cache, num_train=common["num_train"],
                         num_validation=common["num_validation"], num_test=common["num_test"])
        task = task_data(name, data, cache)
        out[name] = tuple(evaluate_task(model, task, batch_size=16)[0] for model in models)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new_task", default="robot_shapes", choices=study.TASKS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "add_task"))
    p.add_argument("--study_dir", default=str(ROOT / "outputs" / "study"), help="Reuse the study's matching runs.")
    p.add_argument("--cache_dir", default=None, help="datasets cache (default: the study's).")
    p.add_argument("--write-docs", "--write_docs", dest="write_docs", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    options = study.parse_args((["--tiny"] if args.tiny else []) + ["--output_dir", args.output_dir,
                               "--cache_dir", args.cache_dir or str(Path(args.study_dir) / "cache")])
    common = study.sizes(options)
    common["random_shape"] = study.random_backbone_shape(options.backbone)
    old_tasks = [t for t in study.TASKS if t != args.new_task]
    out = Path(args.output_dir) / f"seed{args.seed}"
    in_study = Path(args.study_dir) / f"seed{args.seed}"

    three = {**study.run_arguments("joint", old_tasks, args.seed, common, options), "output_dir": str(out / "three_tasks")}
    four = study.run_arguments("joint", study.TASKS, args.seed, common, options)
    single = study.run_arguments("single", [args.new_task], args.seed, common, options)
    reports = {"three": run(three, [])}
    folders = {"none": "added", "new_experts": "added_new_experts"}
    for mode, folder in folders.items():
        added = {**study.run_arguments("joint", [args.new_task], args.seed, common, options), "rank_search_epochs": 0,
                 "init_from": str(out / "three_tasks" / "adapter"), "adapt_shared": mode, "output_dir": str(out / folder)}
        reports[mode] = run(added, [])
    reports["four"] = run(four, [in_study / "joint"])
    reports["single"] = run(single, [in_study / f"single_{args.new_task}"])
    old = {mode: old_task_metrics(out / "three_tasks" / "adapter", out / folder / "adapter", old_tasks, common,
                                  args.seed, options.cache_dir) for mode, folder in folders.items()}
    changed = {(mode, t): [k for k in before if before[k] != after[k]]
               for mode, metrics in old.items() for t, (before, after) in metrics.items()}
    if any(changed.values()):
        raise SystemExit(f"old tasks changed after adding {args.new_task}: {changed}")

    new = args.new_task
    rows = [("four-task joint (all tasks from the start)", reports["four"]),
            ("single-task", reports["single"]),
            (f"three-task joint + {new} added (`--adapt_shared none`)", reports["none"]),
            (f"three-task joint + {new} added (`--adapt_shared new_experts`, 2 per layer)", reports["new_experts"])]
    lines = [f"| model | {new} MSE ×1e3 | PSNR | SSIM | batches of {new} | parameters trained for it | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, report in rows:
        m = report["tasks"][new]["model"]
        lines.append(f"| {label} | {m['mse'] * 1e3:.2f} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{report['batches_per_task'][new]} | {report['parameters']['total']['trainable']:,} | "
                     f"{report['wall_time_s']:.0f} |")
    base = reports["four"]["tasks"][new]["baseline"]
    lines.append(f"| copy-last-frame | {base['mse'] * 1e3:.2f} | {base['psnr']:.2f} | {base['ssim']:.3f} | - | 0 | - |")
    old_lines = ["| old task | PSNR before | after, none | after, new_experts | SSIM before | after, none | "
                 "after, new_experts | metrics that changed |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for task, (before, after) in old["none"].items():
        grown = old["new_experts"][task][1]
        old_lines.append(f"| {task} | {before['psnr']:.4f} | {after['psnr']:.4f} | {grown['psnr']:.4f} | "
                         f"{before['ssim']:.4f} | {after['ssim']:.4f} | {grown['ssim']:.4f} | none of {len(before)} |")
    body = "\n".join([
        f"Seed {args.seed}; sizes of benchmarks/study_joint.py: {common['batches_per_task']} batches of "
        f"{common['batch_size']} clips of every task a model trains on, backbone `{options.backbone}`. The three-task "
        f"model trained on {', '.join(old_tasks)} ({three['max_steps']} batches); adding {new} trained its heads "
        f"(and with new_experts its own experts) for {common['batches_per_task']} batches, every shared tensor frozen. "
        "The parameters column counts what trained in that run (the four-task row: the whole adapter and all heads).",
        "", "### The new task", "", *lines, "",
        f"### The old tasks before and after adding {new} (same test clips; every metric compared for equality)", "",
        *old_lines,
    ])
    print(body)
    if args.write_docs:
        write_section("add_task", body, command="python " + " ".join(["benchmarks/add_task.py"] + sys.argv[1:]))
        print("wrote docs/RESULTS.md")


if __name__ == "__main__":
    main()
