"""Cost of RankMoE next to peft's LoRA on a CLIP-shaped backbone: forward+backward time, inference time, memory.

Variants, built on the same backbone weights and run interleaved (a b c d a b c d ...):
  (a) peft LoRA rank 8 on q/k/v/out        (b) RankMoE 6/6/6/2 experts, max rank 8, token router
  (c) RankMoE after discretize_ranks()      (d) the frozen backbone alone
The input tokens require grad in every variant (in UniSTD a trainable encoder sits before the backbone, so
backward always runs through it). Reported: medians over repeats and ratios to (a) from the same run.
Memory: bytes autograd keeps for backward (unique saved tensors) on CPU; peak allocated memory on CUDA.

    python benchmarks/bench_layers.py                        # ViT-B/16-shaped, 4 layers, batch 2, CPU
    python benchmarks/bench_layers.py --preset tiny          # the tiny CLIP of the tests
    python benchmarks/bench_layers.py --device cuda --dtype bfloat16 --batch 32 --layers 12
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel

import rankmoe_peft  # noqa: F401  (registers "rankmoe")
from rankmoe_peft import RankMoEConfig

try:
    from _results import write_section
except ImportError:  # run as a module
    from benchmarks._results import write_section

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PRESETS = {
    "vit-b16": dict(width=768, heads=12, mlp=3072, tokens=256, layers=4, batch=2),
    "tiny": dict(width=32, heads=4, mlp=64, tokens=16, layers=2, batch=2),
}


def build_variants(args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, image_size=32, patch_size=8,
    )
    base = CLIPVisionModel(config).to(args.device, args.dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    moe_config = dict(target_modules=TARGETS, num_experts=6, num_experts_pattern={"out_proj": 2}, max_rank=8,
                      init_rank=4.5, router="token", init_weights=False)
    moe = get_peft_model(copy.deepcopy(base), RankMoEConfig(**moe_config))
    moe_discrete = get_peft_model(copy.deepcopy(base), RankMoEConfig(**moe_config))
    with torch.no_grad():  # a spread of ranks like a finished search: mean 4.5
        for rank in moe_discrete.rank_parameters():
            rank.copy_(torch.linspace(2.0, 7.0, rank.numel()))
    moe_discrete.discretize_ranks()
    return {"(a) LoRA r=8": lora, "(b) RankMoE": moe, "(c) RankMoE discretized": moe_discrete, "(d) frozen backbone": base}


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    inner = model.base_model.model if hasattr(model, "base_model") and hasattr(model.base_model, "model") else model
    return inner.encoder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, tokens) -> float:
    sync(tokens.device.type)
    start = time.perf_counter()
    out = encoder_of(model)(inputs_embeds=tokens).last_hidden_state
    out.float().pow(2).mean().backward()
    sync(tokens.device.type)
    return time.perf_counter() - start


@torch.no_grad()
def inference_step(model, tokens) -> float:
    sync(tokens.device.type)
    start = time.perf_counter()
    encoder_of(model)(inputs_embeds=tokens)
    sync(tokens.device.type)
    return time.perf_counter() - start


def saved_bytes(model, tokens) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder_of(model)(inputs_embeds=tokens).last_hidden_state.float().pow(2).mean()
    return sum(seen.values())


def peak_cuda_bytes(model, tokens) -> int:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train_step(model, tokens)
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
    for name in ("width", "heads", "mlp", "tokens", "layers", "batch"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--section", default=None, help="section of docs/RESULTS.md (default: bench_layers-<preset>-<device>-<dtype>)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/RESULTS.md")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = getattr(torch, args.dtype)

    variants = build_variants(args)
    tokens = torch.randn(args.batch, args.tokens, args.width, device=args.device, dtype=args.dtype, requires_grad=True)
    train_times = {name: [] for name in variants}
    infer_times = {name: [] for name in variants}
    for model in variants.values():  # warm-up: allocator, kernels, caches
        for _ in range(args.warmup):
            train_step(model, tokens)
            inference_step(model, tokens)
    for _ in range(args.repeats):  # interleaved: a b c d a b c d ...
        for name, model in variants.items():
            train_times[name].append(train_step(model, tokens))
            infer_times[name].append(inference_step(model, tokens))
    memory = {
        name: peak_cuda_bytes(model, tokens) if args.device.startswith("cuda") else saved_bytes(model, tokens)
        for name, model in variants.items()
    }
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in variants.items()}

    reference = "(a) LoRA r=8"
    med_train = {n: statistics.median(t) for n, t in train_times.items()}
    med_infer = {n: statistics.median(t) for n, t in infer_times.items()}
    memory_kind = "peak CUDA memory" if args.device.startswith("cuda") else "autograd saved tensors"
    rows = [
        f"| variant | train step fwd+bwd (ms) | / (a) | inference (ms) | / (a) | {memory_kind} (MiB) | / (a) | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in variants:
        rows.append(
            f"| {name} | {1e3 * med_train[name]:.2f} | {med_train[name] / med_train[reference]:.3f} "
            f"| {1e3 * med_infer[name]:.2f} | {med_infer[name] / med_infer[reference]:.3f} "
            f"| {memory[name] / 2**20:.1f} | {memory[name] / memory[reference]:.3f} | {trainable[name]:,} |"
        )
    shape = (
        f"Backbone: width {args.width}, {args.heads} heads, MLP {args.mlp}, {args.layers} layers, "
        f"{args.tokens} tokens, batch {args.batch}, {str(args.dtype).replace('torch.', '')} on {args.device}; "
        f"medians of {args.repeats} interleaved repeats after {args.warmup} warm-up steps."
    )
    table = shape + "\n\n" + "\n".join(rows)
    print(table)
    if not args.no_write:
        dtype_name = str(args.dtype).replace("torch.", "")
        section = args.section or f"bench_layers-{args.preset}-{args.device}-{dtype_name}"
        path = write_section(section, f"### bench_layers: {args.preset}, {args.device}, {dtype_name}\n\n{table}")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
