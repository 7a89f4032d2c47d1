"""UniSTD (one joint model) against SimVP and TAU (one model per task), trained by the same loop on the same data.

    python benchmarks/compare_methods.py                    # 2 seeds, the default run's settings; prints the table
    python benchmarks/compare_methods.py --write-docs       # also writes docs/RESULTS.md and docs/compare_methods.*

Every method sees the same batches of each task: the loop's round-robin schedule over the same clips, epochs and
batch size (`batches_per_task` in each report is asserted equal across methods). SimVP/TAU hold one model per task
inside one `ReferenceModel`; their translator sizes are chosen so that the four models together have about as many
trainable parameters as the UniSTD model (the table prints both). Per task: MSE, PSNR, SSIM (Gaussian window),
`ssim_openstl` (OpenSTL's setting); mean and spread (half the range) over the seeds; wall time. Two forecasts that
learn nothing stand beside them, on the same seeds' test clips (mean): copy-last-frame, and the constant-velocity
extrapolation of the last frame
(`unistd_hf.motion.extrapolate`, the residual's base of the extrapolated tasks), so the table shows what training
adds on top of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_section  # noqa: E402

METHODS = ("unistd", "simvp", "tau")
METRICS = ("mse", "psnr", "ssim", "ssim_openstl")
PICTURE = RESULTS.parent / "compare_methods.png"
RAW = RESULTS.parent / "compare_methods.json"


def run_one(method: str, seed: int, output: Path, args: argparse.Namespace) -> dict:
    from unistd_hf.training import TrainingArguments, train

    flags = dict(method=method, seed=seed, output_dir=str(output), epochs=args.epochs, cache_dir=args.cache_dir)
    if method != "unistd":
        flags["translator_channels"], flags["translator_depth"] = getattr(args, f"{method}_size")
    if args.num_train:
        flags["num_train"] = args.num_train
    started = time.time()
    report = train(TrainingArguments(**flags))
    report["wall_time_s"] = round(time.time() - started, 1)
    return report


def predictions_of(method: str, output: Path, tasks: dict) -> dict[str, np.ndarray]:
    """The first test clip of each task, predicted by the saved model (reloaded as a user would)."""
    from unistd_hf.baselines import load_reference_model
    from unistd_hf.peft_integration import load_unistd_peft_model

    model = load_unistd_peft_model(output / "adapter") if method == "unistd" else load_reference_model(output / "model")
    model.eval()
    with torch.no_grad():
        return {name: model(pixel_values=clip[None], task=name).predictions[0].clamp(0, 1).numpy() for name, clip in tasks.items()}


def picture(clips: dict[str, dict], truth: dict[str, np.ndarray], path: Path) -> None:
    """Rows: ground truth, then each method; columns: the first, middle and last predicted frame of each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(truth)
    rows = ["ground truth", *clips]
    figure, axes = plt.subplots(len(rows), 3 * len(names), figsize=(2.0 * 3 * len(names), 2.1 * len(rows)))
    for r, row in enumerate(rows):
        for t, name in enumerate(names):
            frames = truth[name] if row == "ground truth" else clips[row][name]
            for k, index in enumerate((0, len(frames) // 2, len(frames) - 1)):
                image = frames[index]  # (C, H, W)
                image = image[0] if image.shape[0] == 1 else image[:3].transpose(1, 2, 0) if image.shape[0] >= 3 else image.mean(0)
                axis = axes[r, 3 * t + k]
                axis.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
                axis.set_xticks([])
                axis.set_yticks([])
                if r == 0:
                    axis.set_title(f"{name} t+{index + 1}", fontsize=8)
                if t == 0 and k == 0:
                    axis.set_ylabel(row, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def table(results: dict[str, list[dict]]) -> str:
    first = results["unistd"][0]
    tasks = list(first["tasks"])
    lines = ["| task | method | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    for task in tasks:
        for method in METHODS:
            cells = []
            for metric in METRICS:
                values = np.array([r["tasks"][task]["model"][metric] for r in results[method]])
                cells.append(f"{values.mean():.4g} ± {(values.max() - values.min()) / 2:.2g}")
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
        # the forecasts that learn nothing, on the same seeds' test clips
        copies = [r["tasks"][task]["baseline"] for r in results["unistd"]]
        for label, seeds in (("copy-last-frame", copies), ("extrapolation", results["extrapolation"].get(task, []))):
            if seeds:
                cells = [f"{np.mean([m[metric] for m in seeds]):.4g}" for metric in METRICS]
                lines.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| method | trainable parameters | batches per task | wall time per run (s) |", "|---|---:|---|---:|"]
    for method in METHODS:
        reports = results[method]
        wall = np.mean([r["wall_time_s"] for r in reports])
        lines.append(f"| {method} | {reports[0]['parameters']['total']['trainable']:,} | "
                     f"{reports[0]['batches_per_task']} | {wall:.0f} |")
    return "\n".join(lines)


def reading(results: dict[str, list[dict]]) -> str:
    """One line per task, computed: each reference method's PSNR/SSIM against UniSTD's, with the seeds' spread; a
    difference within the summed spreads is reported as none."""
    lines = []
    for task in results["unistd"][0]["tasks"]:
        parts = []
        for metric, unit in (("psnr", " dB"), ("ssim", "")):
            values = {m: np.array([r["tasks"][task]["model"][metric] for r in results[m]]) for m in METHODS}
            spread = {m: (v.max() - v.min()) / 2 for m, v in values.items()}
            for method in ("simvp", "tau"):
                diff = values[method].mean() - values["unistd"].mean()
                noise = spread[method] + spread["unistd"]
                verdict = "no difference" if abs(diff) <= noise else ("better" if diff > 0 else "worse")
                parts.append(f"{method} {metric} {diff:+.3g}{unit} ({verdict}, spread {noise:.2g})")
        lines.append(f"- {task}: " + "; ".join(parts))
    return "Against UniSTD, per task (reference minus UniSTD, mean over seeds):\n" + "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every run (the default run's)")
    parser.add_argument("--num_train", type=int, default=0, help="training clips per task (0: the default run's)")
    parser.add_argument("--simvp_size", type=int, nargs=2, default=[32, 2], metavar=("HID_T", "N_T"),
                        help="SimVP's translator (default: 0.51M parameters over the four tasks)")
    parser.add_argument("--tau_size", type=int, nargs=2, default=[32, 4], metavar=("HID_T", "N_T"),
                        help="TAU's translator (default: 0.52M parameters over the four tasks)")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--from-json", dest="from_json", default=None,
                        help="render the tables from a saved docs/compare_methods.json instead of training")
    parser.add_argument("--write-docs", dest="write_docs", action="store_true",
                        help="write the table into docs/RESULTS.md, the picture and the raw numbers into docs/")
    args = parser.parse_args()

    if args.from_json:  # re-render (the picture stays as the run that wrote the JSON drew it)
        results = json.loads(Path(args.from_json).read_text())
        body = table(results) + "\n\n" + reading(results)
        print(body)
        if args.write_docs:
            write_docs_section(body, f"python benchmarks/compare_methods.py --write-docs, re-rendered by --from-json "
                                     f"{args.from_json}")
        return 0
    from unistd_hf.data import load_task

    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    extrapolation: dict[str, list[dict]] = {}  # task -> metrics per seed
    clips: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in METHODS:
                output = Path(tmp) / f"{method}-{seed}"
                results[method].append(run_one(method, seed, output, args))
                if method == METHODS[0]:  # the seed's test clips, as the runs saw them
                    data = {name: load_task(name, seed=seed, cache_dir=args.cache_dir, **_sizes(results[method][-1], name))
                            for name in results[method][-1]["tasks"]}
                    for name, d in data.items():
                        extrapolation.setdefault(name, []).append(extrapolation_metrics(name, d["test"]))
                if seed == args.seeds[0]:
                    tests = {name: torch.from_numpy(np.asarray(d["test"][0]["inputs"], dtype=np.float32)) for name, d in data.items()}
                    truth = {name: np.asarray(d["test"][0]["targets"], dtype=np.float32) for name, d in data.items()}
                    clips[method] = predictions_of(method, output, tests)
                print(f"{method} seed {seed}: " + ", ".join(
                    f"{t} psnr {v['model']['psnr']:.2f} ssim {v['model']['ssim']:.3f}" for t, v in results[method][-1]["tasks"].items()),
                    flush=True)
    results["extrapolation"] = extrapolation
    counts = {m: results[m][0]["batches_per_task"] for m in METHODS}
    assert len({json.dumps(c, sort_keys=True) for c in counts.values()}) == 1, f"unequal exposure per task: {counts}"
    body = table(results) + "\n\n" + reading(results)
    print(body)
    if args.write_docs:
        picture(clips, truth, PICTURE)
        raw = {m: [{k: r[k] for k in ("tasks", "parameters", "batches_per_task", "wall_time_s")} for r in results[m]]
               for m in METHODS}
        RAW.write_text(json.dumps({**raw, "extrapolation": results["extrapolation"]}, indent=1))
        write_docs_section(body)
    return 0


def write_docs_section(body: str, command: str | None = None) -> None:
    """The section compare_methods of docs/RESULTS.md: the tables, the reading and the picture."""
    write_section("compare_methods", body + f"\n\n![one test clip per task, one row per method]({PICTURE.name})",
                  command=command)


def extrapolation_metrics(name: str, test) -> dict[str, float]:
    """The task's metrics of the constant-velocity extrapolation of the last frame on its test clips."""
    from unistd_hf.data import get_task
    from unistd_hf.metrics import MetricAccumulator
    from unistd_hf.motion import extrapolate

    info = get_task(name)
    accumulator = MetricAccumulator(info.metrics, info.csi_thresholds)
    clips = test.with_format("torch")
    for start in range(0, len(clips), 16):
        batch = clips[start : start + 16]
        targets = batch["targets"].float()
        accumulator.update(extrapolate(batch["inputs"].float(), targets.shape[1]), targets)
    return accumulator.compute()


def _sizes(report: dict, name: str) -> dict:
    """The loader options the run used for `name` (synthetic clip counts), to load the same test clips again."""
    from unistd_hf.data import get_task
    from unistd_hf.training.arguments import parse_clip_counts

    arguments = report["arguments"]
    if not get_task(name).synthetic:
        return {}
    counts = parse_clip_counts(arguments["num_train_per_task"])
    return {"num_train": counts.get(name, arguments["num_train"]), "num_validation": arguments["num_validation"],
            "num_test": arguments["num_test"]}


if __name__ == "__main__":
    sys.exit(main())
