"""Start the two-process training run N times in a row and count failures (the multi-process start race check).

    python benchmarks/stress_two_processes.py --runs 20

Each run: `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo), a tiny two-task model, a fresh
output folder. Prints one line per run and the count of failures; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tasks", "city_traffic", "moving_digits", "--num_train", "32", "--num_train_per_task", "", "--num_validation", "8",
        "--num_test", "16", "--backbone", "random", "--backbone_width", "32", "--backbone_layers", "2",
        "--backbone_heads", "2", "--hidden_channels", "16", "--batch_size", "4", "--eval_batch_size", "8",
        "--epochs", "1", "--log_every", "4", "--cpu"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.runs):
            started = time.time()
            command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "train_unistd.py"),
                       *TINY, "--cache_dir", f"{tmp}/cache", "--output_dir", f"{tmp}/run-{index}"]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            ok = done.returncode == 0 and (Path(tmp) / f"run-{index}" / "report.json").is_file()
            failures += not ok
            print(f"run {index + 1}/{args.runs}: {'ok' if ok else 'FAILED'} in {time.time() - started:.0f} s", flush=True)
            if not ok:
                errors = [line for line in done.stderr.splitlines() if "Error" in line or line.startswith("error")]
                print("    " + "\n    ".join(errors[-6:]), flush=True)
    print(f"{args.runs - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
