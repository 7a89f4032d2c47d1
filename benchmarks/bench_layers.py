"""Cost of RankMoE next to peft's LoRA on a CLIP-shaped backbone: forward+backward time, inference time, memory.

Variants, built on the same backbone weights:
  (a) peft LoRA rank 8 on q/k/v/out
  (b) RankMoE 6/6/6/2 experts, max rank 8, token router, default init (B = 0, router as nn.Linear)
  (c) (b) after discretize_ranks() (ranks 2..7, mean 4.5)
  (d) RankMoE with init_weights=False (random B, router weights of std 1: very peaked gates)
  (e) (d) after discretize_ranks()
  (f) the frozen backbone alone
The input tokens require grad in every variant (in UniSTD a trainable encoder sits before the backbone, so
backward always runs through it).

How the figures are made reproducible: one run times every variant's training step `--repeats` times, interleaved
and rotated (a b c .., b c .. a, ...), so that load changes hit all variants alike, then its inference the same way,
and keeps each variant's median. The two loops are separate: a RankMoE training step timed right after an inference
pass of the same model (which works on cached matrices of its own) ran ~2 % slower at the tiny size, LoRA's did not,
and no training loop alternates like that. `--runs`
independent runs (fresh processes) follow each other; the table gives the median over runs and, for every ratio
to (a), its spread (max - min) / median over the runs. The machine load (os.getloadavg) is printed before and
after each run. docs/RESULTS.md is written only when every ratio's spread is at most `--max-spread`; otherwise
the script says which ratio moved and by how much, and exits with status 3.
Memory: bytes of the activations autograd keeps for backward on CPU (unique saved tensors, those a custom Function
keeps on its ctx included, parameters excluded); peak allocated memory on CUDA.

    python benchmarks/bench_layers.py --runs 3 --threads 2          # ViT-B/16-shaped, 4 layers, batch 2, CPU
    python benchmarks/bench_layers.py --preset tiny --runs 3 --threads 2 --repeats 601
    python benchmarks/bench_layers.py --device cuda --dtype bfloat16 --batch 32 --layers 12
    python benchmarks/bench_layers.py --compile --no-write          # every variant under torch.compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel

import rankmoe_peft  # noqa: F401  (registers "rankmoe")
from rankmoe_peft import RankMoEConfig
from unistd_hf.peft_integration import PROJECTIONS, expert_pattern

try:
    from _results import write_section
except ImportError:  # run as a module
    from benchmarks._results import write_section

TARGETS = list(PROJECTIONS)
PRESETS = {
    "vit-b16": dict(width=768, heads=12, mlp=3072, tokens=256, layers=4, batch=2),
    "tiny": dict(width=32, heads=4, mlp=64, tokens=16, layers=2, batch=2),
}
REFERENCE = "(a) LoRA r=8"
WORKER_FLAG = "--_one-run"  # internal: the child process that makes one run and prints it as JSON


def build_variants(args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, image_size=32, patch_size=8,
    )
    base = CLIPVisionModel(config).to(args.device, args.dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    variants = {REFERENCE: get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))}
    for init_weights, (searching, discrete) in (
        (True, ("(b) RankMoE, default init", "(c) RankMoE discretized, default init")),
        (False, ("(d) RankMoE, init_weights=False", "(e) RankMoE discretized, init_weights=False")),
    ):
        moe_config = dict(target_modules=TARGETS, num_experts=6, num_experts_pattern={"out_proj": expert_pattern()["out_proj"]}, max_rank=8,
                          init_rank=4.5, router="token", init_weights=init_weights)
        torch.manual_seed(1)
        variants[searching] = get_peft_model(copy.deepcopy(base), RankMoEConfig(**moe_config))
        torch.manual_seed(1)
        moe_discrete = get_peft_model(copy.deepcopy(base), RankMoEConfig(**moe_config))
        with torch.no_grad():  # a spread of ranks like a finished search: mean 4.5
            for rank in moe_discrete.rank_parameters():
                rank.copy_(torch.linspace(2.0, 7.0, rank.numel()))
        moe_discrete.discretize_ranks()
        variants[discrete] = moe_discrete
    variants["(f) frozen backbone"] = base
    return variants


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    inner = model.base_model.model if hasattr(model, "base_model") and hasattr(model.base_model, "model") else model
    return inner.encoder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def train_step(encoder, tokens, clock=time.perf_counter) -> float:
    sync(tokens.device.type)
    start = clock()
    out = encoder(inputs_embeds=tokens).last_hidden_state
    out.float().pow(2).mean().backward()
    sync(tokens.device.type)
    return clock() - start


@torch.no_grad()
def inference_step(encoder, tokens, clock=time.perf_counter) -> float:
    sync(tokens.device.type)
    start = clock()
    encoder(inputs_embeds=tokens)
    sync(tokens.device.type)
    return clock() - start


def saved_bytes(encoder, tokens) -> int:
    """Bytes of the distinct activations autograd keeps for backward after one forward pass: tensors saved through
    `save_for_backward` (seen by saved-tensor hooks) and those a custom Function keeps on its ctx
    (`MixtureOfExperts`' `ctx.kept`, which the hooks do not see); parameters, which exist anyway, excluded."""
    seen: dict[tuple, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in encoder.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = encoder(inputs_embeds=tokens).last_hidden_state.float().pow(2).mean()
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        kept = list(getattr(node, "kept", ()))  # `MixtureOfExperts` keeps tensors and tuples of them
        while kept:
            value = kept.pop()
            if isinstance(value, torch.Tensor):
                pack(value)
            elif isinstance(value, tuple):
                kept.extend(value)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(seen.values())


def peak_cuda_bytes(encoder, tokens) -> int:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train_step(encoder, tokens)
    return torch.cuda.max_memory_allocated() - base


def one_run(args) -> dict:
    """Time every variant `args.repeats` times, interleaved and rotated; medians in seconds, memory in bytes."""
    load_before = os.getloadavg()
    clock = CLOCKS[args.clock]
    variants = build_variants(args)
    encoders = {name: encoder_of(model) for name, model in variants.items()}
    if args.compile:
        encoders = {name: torch.compile(encoder) for name, encoder in encoders.items()}
    tokens = torch.randn(args.batch, args.tokens, args.width, device=args.device, dtype=args.dtype, requires_grad=True)
    names = list(encoders)
    for name in names:  # warm-up: allocator, kernels, caches, compilation
        for _ in range(args.warmup):
            train_step(encoders[name], tokens)
            inference_step(encoders[name], tokens)
    train_times: dict[str, list[float]] = {name: [] for name in names}
    infer_times: dict[str, list[float]] = {name: [] for name in names}
    for step, times in ((train_step, train_times), (inference_step, infer_times)):  # one loop each: see the docstring
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # a b c .., b c .. a, ...
                times[name].append(step(encoders[name], tokens, clock))
    memory = {
        name: peak_cuda_bytes(enc, tokens) if args.device.startswith("cuda") else saved_bytes(enc, tokens)
        for name, enc in encoders.items()
    }
    return {
        "train": {n: statistics.median(t) for n, t in train_times.items()},
        "infer": {n: statistics.median(t) for n, t in infer_times.items()},
        "memory": memory,
        "trainable": {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in variants.items()},
        "load": [load_before, os.getloadavg()],
    }


@dataclass
class Ratio:
    median: float
    low: float
    high: float

    @property
    def spread(self) -> float:
        return (self.high - self.low) / self.median

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}-{self.high:.3f}]"


def ratio_over_runs(runs: list[dict], kind: str, name: str) -> Ratio:
    values = [run[kind][name] / run[kind][REFERENCE] for run in runs]
    return Ratio(statistics.median(values), min(values), max(values))


def table(args, runs: list[dict]) -> tuple[str, list[str]]:
    """The markdown table and the list of ratios whose spread over runs is above `args.max_spread`."""
    names = list(runs[0]["train"])
    memory_kind = "peak CUDA memory" if args.device.startswith("cuda") else "autograd saved tensors"
    rows = [
        f"| variant | train step fwd+bwd (ms) | / (a) [min-max over runs] | inference (ms) | / (a) [min-max] "
        f"| {memory_kind} (MiB) | / (a) | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wide = []
    for name in names:
        cells = []
        for kind in ("train", "infer"):
            ms = 1e3 * statistics.median(run[kind][name] for run in runs)
            ratio = ratio_over_runs(runs, kind, name)
            if ratio.spread > args.max_spread:
                wide.append(f"{name} {kind}: {ratio} spreads {100 * ratio.spread:.1f}%")
            cells += [f"{ms:.2f}", str(ratio)]
        memory = runs[0]["memory"]
        rows.append(
            f"| {name} | {' | '.join(cells)} | {memory[name] / 2**20:.1f} | {memory[name] / memory[REFERENCE]:.3f} "
            f"| {runs[0]['trainable'][name]:,} |"
        )
    dtype_name = str(args.dtype).replace("torch.", "")
    loads = ", ".join(f"{run['load'][0][0]:.2f}->{run['load'][1][0]:.2f}" for run in runs)
    shape = (
        f"Backbone: width {args.width}, {args.heads} heads, MLP {args.mlp}, {args.layers} layers, "
        f"{args.tokens} tokens, batch {args.batch}, {dtype_name} on {args.device}, {args.threads or 'all'} threads"
        f"{', torch.compile' if args.compile else ''}, {args.clock} clock; per run the median of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up steps; {len(runs)} independent runs: time = median over "
        f"runs, ratio = median [min-max] over runs. 1-minute load average before->after each run: {loads}."
    )
    return shape + "\n\n" + "\n".join(rows), wide


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
    for name in ("width", "heads", "mlp", "tokens", "layers", "batch"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant and run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="independent runs (processes); 3 or more to write")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--max-spread", type=float, default=0.05, help="largest (max-min)/median of a ratio to write")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's encoder")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall: elapsed time (the figure users see); cpu: CPU time of this process, less disturbed by other "
        "processes on a shared machine (with several threads it also counts the threads' spin-waiting)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--section", default=None, help="section of docs/RESULTS.md (default: bench_layers-<preset>-<device>-<dtype>)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/RESULTS.md")
    parser.add_argument(WORKER_FLAG, dest="one_run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = getattr(torch, args.dtype)
    return args


def run_in_fresh_process(index: int) -> dict:
    """One run in a child process (its own allocator, caches and thread pool): the runs are independent."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], WORKER_FLAG]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: run {index + 1} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_run:
        print(json.dumps(one_run(args)))
        return
    if not args.no_write and args.runs < 3:
        raise SystemExit("error: docs/RESULTS.md is written from 3 or more runs; pass --runs 3 (or --no-write)")
    runs = []
    for index in range(args.runs):
        print(f"run {index + 1}/{args.runs}: load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores",
              flush=True)
        runs.append(run_in_fresh_process(index))
        load = runs[-1]["load"]
        ratio = runs[-1]["train"]["(b) RankMoE, default init"] / runs[-1]["train"][REFERENCE]
        print(f"  done: load {load[0][0]:.2f} -> {load[1][0]:.2f}; train (b)/(a) {ratio:.3f}", flush=True)
    text, wide = table(args, runs)
    print(text)
    if wide:
        print(
            f"\n{'not written' if not args.no_write else 'would not be written'} to docs/RESULTS.md: ratios moved "
            f"by more than {100 * args.max_spread:.0f}% between runs, so the machine was too busy for reproducible "
            "figures:\n  " + "\n  ".join(wide)
            + "\nRerun on a quiet machine (see the load averages above), or with more --repeats."
        )
    if args.no_write:
        return
    if wide:
        raise SystemExit(3)
    dtype_name = str(args.dtype).replace("torch.", "")
    suffix = "-compile" if args.compile else ""
    section = args.section or f"bench_layers-{args.preset}-{args.device}-{dtype_name}{suffix}"
    path = write_section(section, f"### bench_layers: {args.preset}, {args.device}, {dtype_name}\n\n{text}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
