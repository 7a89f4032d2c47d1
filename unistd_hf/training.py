"""Joint multi-task training of UniSTD with Accelerate: the loop behind `examples/train_unistd.py`.

One batch is one task (shapes differ between tasks). The task schedule is drawn from a generator seeded
with (seed, epoch), so every process runs the same task at the same step. Weights are trained by AdamW
(cosine schedule with warm-up), ranks by SGD with Nesterov momentum; the loss is MSE plus the rank budget
term while ranks are searched (the first `rank_search_epochs`), then ranks are discretized and frozen.
Each process reads its own shard of every task; a batch is fully determined by (seed, epoch, task, index),
which is what makes a resumed run end where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel, get_cosine_schedule_with_warmup

from .configuration_unistd import TaskSpec, UniSTDConfig
from .data import get_task, list_tasks, load_task, spec_for
from .metrics import MetricAccumulator, copy_last_frame_baseline

__all__ = ["TrainingArguments", "train", "validate_arguments", "task_schedule", "evaluate_task", "latest_checkpoint"]

SYNTHETIC_TASKS = ["moving_digits", "city_traffic", "rain_nowcast", "robot_shapes"]
SCHEDULES = ("round_robin", "proportional", "temperature")
ADAPTERS = ("rankmoe", "lora", "fixed_rank", "none")
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainingArguments:
    """Everything `train()` needs; each field is also a command-line flag of examples/train_unistd.py."""

    tasks: list[str] = field(default_factory=lambda: list(SYNTHETIC_TASKS), metadata={"help": "Tasks to train jointly."})
    output_dir: str = field(default="outputs/unistd", metadata={"help": "Where the adapter, report and checkpoints go."})
    data_dir: str | None = field(default=None, metadata={"help": "OpenSTL data folder for real tasks (mmnist, taxibj, kth)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder (default: HF datasets cache)."})
    num_train: int = field(default=256, metadata={"help": "Training clips per synthetic task."})
    num_train_per_task: str = field(
        default="city_traffic=1024",
        metadata={
            "help": "Overrides of num_train for single synthetic tasks, as 'task=clips,task=clips'. The default gives "
            "city_traffic (32x32 frames: a batch costs ~1/5 of the 64x64 tasks) more batches per epoch: it needs "
            "~300 batches to get below the copy-last-frame error, the others fewer."
        },
    )
    num_validation: int = field(default=32, metadata={"help": "Validation clips per synthetic task."})
    num_test: int = field(default=64, metadata={"help": "Test clips per synthetic task."})
    backbone: str | None = field(
        default=None, metadata={"help": "Hub id or directory of a CLIP checkpoint; None: a small random CLIP."}
    )
    backbone_width: int = field(default=128, metadata={"help": "Width of the random CLIP (when backbone is None)."})
    backbone_layers: int = field(default=4, metadata={"help": "Layers of the random CLIP."})
    backbone_heads: int = field(default=4, metadata={"help": "Attention heads of the random CLIP."})
    hidden_channels: int = field(default=16, metadata={"help": "C', channels of the per-frame conv encoders."})
    use_temporal_adapter: bool = field(default=True, metadata={"help": "Temporal adapters after self-attention."})
    temporal_gate: str = field(default="scaled", metadata={"help": "'scaled' (identity at init) or 'additive'."})
    residual_to_last_frame: bool = field(
        default=True,
        metadata={"help": "Predict the change from the last observed frame (off in the paper; see UniSTDConfig)."},
    )
    adapter: str = field(
        default="rankmoe",
        metadata={
            "help": "'rankmoe' (experts + rank search), 'fixed_rank' (experts, ranks fixed at round(init_rank)), "
            "'lora' (one expert at rank max_rank, i.e. LoRA), 'none' (no adapter; see finetune_backbone)."
        },
    )
    finetune_backbone: bool = field(default=False, metadata={"help": "Train the whole backbone (with adapter='none')."})
    num_experts: int = field(default=6, metadata={"help": "Experts on q/k/v."})
    out_proj_experts: int = field(default=2, metadata={"help": "Experts on out_proj and the temporal adapters."})
    max_rank: int = field(default=8, metadata={"help": "Largest rank per expert."})
    init_rank: float = field(default=4.5, metadata={"help": "Initial rank per expert."})
    rank_budget: float | None = field(default=None, metadata={"help": "C; None: the initial total rank."})
    budget_weight: float = field(default=1e-2, metadata={"help": "beta of beta * |C - sum(ranks)|."})
    rank_grad_scale: float = field(
        default=1e5,
        metadata={
            "help": "gamma of the rank gradient. A per-pixel MSE gives rank gradients of ~1e-7 on these models, so "
            "gamma ~1e5 lets SGD at lr 0.05 move ranks by O(1) during the search (gamma=1 leaves them still)."
        },
    )
    router: str = field(default="token", metadata={"help": "'token' or 'sequence'."})
    epochs: int = field(default=4, metadata={"help": "Passes over every task's training split."})
    rank_search_epochs: int = field(default=2, metadata={"help": "Epochs of rank search before discretization."})
    batch_size: int = field(default=8, metadata={"help": "Clips per batch and process."})
    eval_batch_size: int = field(default=16, metadata={"help": "Clips per evaluation batch."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the weights."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of optimizer steps of linear warm-up."})
    rank_learning_rate: float = field(default=0.05, metadata={"help": "SGD learning rate of the ranks."})
    rank_momentum: float = field(default=0.9, metadata={"help": "SGD (Nesterov) momentum of the ranks."})
    schedule: str = field(default="round_robin", metadata={"help": "'round_robin', 'proportional' or 'temperature'."})
    temperature: float = field(default=2.0, metadata={"help": "Temperature of the 'temperature' schedule."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (through Accelerate)."})
    seed: int = field(default=0, metadata={"help": "Seed of data, initialisation and task schedule."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many batches (0: run all epochs)."})
    checkpoint_every: int = field(default=0, metadata={"help": "Also checkpoint every N batches (0: epoch ends only)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder or 'latest'."})
    log_every: int = field(default=10, metadata={"help": "Log (JSON lines) every N batches."})
    report_to: str = field(default="jsonl", metadata={"help": "'jsonl' or 'tensorboard' (JSON lines are always written)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the adapter and its model card to the hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository id for --push_to_hub."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is present."})
    fail_at_step: int = field(default=0, metadata={"help": "Testing aid: raise a non-finite loss at this step."})


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks, before anything expensive


def validate_arguments(args: TrainingArguments) -> None:
    """Raise ValueError with a clear message for arguments that cannot work, before any data or model is built."""
    if not args.tasks:
        raise ValueError("--tasks is empty; name at least one task")
    known = list_tasks()
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; registered tasks: {known}")
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError(f"--tasks names a task twice: {args.tasks}")
    choices = {"schedule": SCHEDULES, "adapter": ADAPTERS, "mixed_precision": ("no", "fp16", "bf16"),
               "report_to": ("jsonl", "tensorboard"), "router": ("token", "sequence"),
               "temporal_gate": ("scaled", "additive")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"--{name} must be one of {allowed}, got {getattr(args, name)!r}")
    positive = ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_train", "num_test",
                "backbone_width", "backbone_layers", "backbone_heads", "hidden_channels", "max_rank", "keep_checkpoints")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    train_clip_overrides(args.num_train_per_task)
    if args.rank_search_epochs < 0:  # >= epochs: search throughout, discretize before the final evaluation
        raise ValueError(f"--rank_search_epochs must be >= 0, got {args.rank_search_epochs}")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/unistd-rankmoe)")
    if args.finetune_backbone and args.adapter != "none":
        raise ValueError("--finetune_backbone trains the whole backbone; use it with --adapter none")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder")
    output = Path(args.output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir {str(output)!r} is not writable: {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Data: per-process shards, batches fixed by (seed, epoch, task, index), and the task schedule


@dataclass
class TaskData:
    name: str
    spec: TaskSpec
    train: Any  # datasets.Dataset in torch format
    test: Any
    metrics: tuple[str, ...]
    csi_thresholds: tuple[float, ...]


def train_clip_overrides(text: str) -> dict[str, int]:
    """'a=10,b=20' -> {'a': 10, 'b': 20}, with a clear error for anything else."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, count = item.partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--num_train_per_task expects 'task=clips,...' with clips >= 1, got {item!r}")
        overrides[name.strip()] = int(count)
    unknown = sorted(set(overrides) - set(list_tasks()))
    if unknown:
        raise ValueError(f"--num_train_per_task names unknown task(s) {unknown}; registered tasks: {list_tasks()}")
    return overrides


def load_tasks(args: TrainingArguments, accelerator: Accelerator) -> dict[str, TaskData]:
    tasks = {}
    for name in args.tasks:
        info = get_task(name)
        options: dict[str, Any] = {}
        if args.cache_dir:
            options["cache_dir"] = args.cache_dir
        if info.synthetic:
            num_train = train_clip_overrides(args.num_train_per_task).get(name, args.num_train)
            options.update(num_train=num_train, num_validation=args.num_validation, num_test=args.num_test)
        with accelerator.main_process_first():  # one process generates, the others read the cache
            data = load_task(name, data_dir=args.data_dir, seed=args.seed, **options)
        tasks[name] = TaskData(
            name, spec_for(name, data), data["train"].with_format("torch"), data["test"].with_format("torch"),
            info.metrics, info.csi_thresholds,
        )
    return tasks


def batch_counts(tasks: dict[str, TaskData], batch_size: int, world_size: int) -> dict[str, int]:
    """Full batches per epoch of each task on each process (every process gets the same number)."""
    return {name: (len(task.train) // world_size) // batch_size for name, task in tasks.items()}


def epoch_order(num_clips: int, seed: int, epoch: int, task_index: int, rank: int, world_size: int) -> np.ndarray:
    """This process's clip indices for one epoch: a seeded permutation, cut into equal per-process shards."""
    permutation = np.random.default_rng([seed, epoch, task_index]).permutation(num_clips)
    per_process = num_clips // world_size
    return permutation[rank * per_process : (rank + 1) * per_process]


def task_schedule(counts: dict[str, int], schedule: str, seed: int, epoch: int, temperature: float = 2.0) -> list[str]:
    """The task of each batch of an epoch; identical on every process for the same (seed, epoch).

    round_robin: tasks in turn until each has used its batches; proportional: every batch of every task once,
    in a seeded random order; temperature: sum(counts) draws with p(task) ~ count^(1/T) (a task may repeat
    batches or leave some unused; its batch index wraps around).
    """
    names = [n for n in counts if counts[n] > 0]
    rng = np.random.default_rng([seed, epoch, 7919])
    if schedule == "round_robin":
        order, remaining = [], dict(counts)
        while any(remaining[n] for n in names):
            for name in names:
                if remaining[name]:
                    order.append(name)
                    remaining[name] -= 1
        return order
    if schedule == "proportional":
        order = [name for name in names for _ in range(counts[name])]
        return [order[i] for i in rng.permutation(len(order))]
    if schedule == "temperature":
        weights = np.array([counts[n] ** (1.0 / temperature) for n in names], dtype=np.float64)
        picks = rng.choice(len(names), size=sum(counts.values()), p=weights / weights.sum())
        return [names[i] for i in picks]
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def epoch_batches(
    tasks: dict[str, TaskData], args: TrainingArguments, epoch: int, rank: int, world_size: int
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(task, batch) for every step of the epoch, in schedule order."""
    counts = batch_counts(tasks, args.batch_size, world_size)
    schedule = task_schedule(counts, args.schedule, args.seed, epoch, args.temperature)
    orders = {n: epoch_order(len(t.train), args.seed, epoch, i, rank, world_size) for i, (n, t) in enumerate(tasks.items())}
    used = dict.fromkeys(tasks, 0)
    for name in schedule:
        index = used[name] % counts[name]
        used[name] += 1
        clip_ids = orders[name][index * args.batch_size : (index + 1) * args.batch_size]
        yield name, tasks[name].train[clip_ids.tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# Model


def build_model(args: TrainingArguments, specs: list[TaskSpec], accelerator: Accelerator) -> tuple[torch.nn.Module, UniSTDConfig]:
    """The UniSTD model, adapted as `args.adapter` says. A random backbone is saved to output_dir/backbone first
    and loaded from there, so the saved adapter plus that folder are all a reload needs."""
    from .modeling_unistd import UniSTDModel, default_rankmoe_config, get_unistd_peft_model

    backbone = args.backbone
    if backbone is None:
        backbone = str((Path(args.output_dir) / "backbone").resolve())
        if accelerator.is_main_process and not (Path(backbone) / "config.json").exists():
            torch.manual_seed(args.seed)
            clip = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=args.backbone_width, intermediate_size=4 * args.backbone_width,
                num_hidden_layers=args.backbone_layers, num_attention_heads=args.backbone_heads,
            ))
            save_atomically(Path(backbone), clip.save_pretrained)
        accelerator.wait_for_everyone()
    config = UniSTDConfig(
        backbone=backbone, tasks=specs, hidden_channels=args.hidden_channels,
        temporal_gate=args.temporal_gate, use_temporal_adapter=args.use_temporal_adapter,
        residual_to_last_frame=args.residual_to_last_frame,
        freeze_backbone=not args.finetune_backbone,
    )
    set_seed(args.seed)
    if args.adapter == "none":
        return UniSTDModel(config), config
    overrides: dict[str, Any] = dict(
        max_rank=args.max_rank, init_rank=args.init_rank, rank_budget=args.rank_budget,
        budget_weight=args.budget_weight, rank_grad_scale=args.rank_grad_scale, router=args.router,
        num_experts=args.num_experts,
        num_experts_pattern={"out_proj": args.out_proj_experts, "temporal_moe": args.out_proj_experts},
    )
    if args.adapter == "lora":
        overrides.update(num_experts=1, num_experts_pattern={}, init_rank=float(args.max_rank))
    model = get_unistd_peft_model(config, default_rankmoe_config(config, **overrides))
    return model, config


def has_ranks(model: torch.nn.Module) -> bool:
    return hasattr(model, "rank_parameters")


def weight_and_rank_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    ranks = list(model.rank_parameters()) if has_ranks(model) else []
    rank_ids = {id(p) for p in ranks}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in rank_ids]
    return weights, [p for p in ranks if p.requires_grad]


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: processes that stayed in step have identical fingerprints."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed, so a crash leaves the last good one intact


def save_atomically(target: Path, write) -> None:
    """Call `write(tmp_dir)` and rename tmp_dir to `target` (replacing an older `target`)."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (a folder only exists once fully written)."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(accelerator: Accelerator, args: TrainingArguments, state: dict[str, Any]) -> None:
    folder = Path(args.output_dir) / "checkpoints"
    target = folder / f"{CHECKPOINT_PREFIX}{state['global_step']:08d}"
    tmp = folder / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # the checkpoint appears complete or not at all
        kept = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)
        for old in kept[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_task(
    model: torch.nn.Module, task: TaskData, batch_size: int, accelerator: Accelerator | None = None, max_clips: int | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics of the model and of the copy-last-frame baseline on the task's test split (sharded over processes,
    exact sums combined by one all-reduce)."""
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    count = len(task.test) if max_clips is None else min(max_clips, len(task.test))
    mine = list(range(rank, count, world))
    accumulators = {k: MetricAccumulator(task.metrics, task.csi_thresholds, device=device) for k in ("model", "baseline")}
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), batch_size):
        batch = task.test[mine[start : start + batch_size]]
        inputs, targets = batch["inputs"].to(device).float(), batch["targets"].to(device).float()
        predictions = model(pixel_values=inputs, task=task.name).predictions.float()
        accumulators["model"].update(predictions, targets)
        accumulators["baseline"].update(copy_last_frame_baseline(inputs, task.spec.out_frames), targets)
    model.train(was_training)
    reduce_fn = (lambda t: accelerator.reduce(t, "sum")) if accelerator and world > 1 else None
    return accumulators["model"].compute(reduce_fn), accumulators["baseline"].compute(reduce_fn)


# ---------------------------------------------------------------------------------------------------------------------
# The loop


class NonFiniteLossError(RuntimeError):
    pass


def train(args: TrainingArguments) -> dict[str, Any]:
    """Train, evaluate and write everything to `args.output_dir`; returns the report dict."""
    from . import report as reporting

    validate_arguments(args)
    started = time.time()
    output = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=str(output),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # other tasks' heads idle
    )
    set_seed(args.seed)
    tasks = load_tasks(args, accelerator)
    model, config = build_model(args, [t.spec for t in tasks.values()], accelerator)
    base_model = model
    weights, ranks = weight_and_rank_parameters(model)
    weight_optimizer = torch.optim.AdamW(weights, lr=args.learning_rate, weight_decay=args.weight_decay)
    rank_optimizer = torch.optim.SGD(ranks, lr=args.rank_learning_rate, momentum=args.rank_momentum, nesterov=True) if ranks else None
    world = accelerator.num_processes
    per_epoch = sum(batch_counts(tasks, args.batch_size, world).values())  # every schedule has this length
    if per_epoch == 0:
        raise ValueError(f"no full batch of {args.batch_size} clips per process in some task; lower --batch_size")
    total_steps = per_epoch * args.epochs if not args.max_steps else min(args.max_steps, per_epoch * args.epochs)
    optimizer_steps = math.ceil(total_steps / args.gradient_accumulation_steps)
    scheduler = get_cosine_schedule_with_warmup(weight_optimizer, int(args.warmup_ratio * optimizer_steps), optimizer_steps)
    prepared = accelerator.prepare(model, weight_optimizer, *([rank_optimizer] if rank_optimizer else []))
    model, weight_optimizer = prepared[0], prepared[1]
    rank_optimizer = prepared[2] if rank_optimizer else None

    state = {"global_step": 0, "optimizer_steps": 0, "discretized": False, "rank_history": [], "log": []}
    resume = latest_checkpoint(output) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    if resume:
        saved = json.loads((Path(resume) / "trainer_state.json").read_text())
        if saved["discretized"]:
            base_model.discretize_ranks()  # frozen flags first, then the saved integer ranks are loaded
        accelerator.load_state(str(resume))
        if saved["discretized"]:
            base_model.discretize_ranks()  # rank_pattern from the loaded ranks
        state = saved
        for _ in range(state["optimizer_steps"]):
            scheduler.step()
        accelerator.print(f"resumed from {resume} at step {state['global_step']}")
    if args.report_to == "tensorboard":
        accelerator.init_trackers("unistd", config={k: str(v) for k, v in dataclasses.asdict(args).items()})

    log_path = output / "logs.jsonl"
    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process,
                    desc="training", unit="batch")
    model.train()
    running: dict[str, list[float]] = {}
    step = state["global_step"]
    start_epoch = step // per_epoch
    search_epochs = args.rank_search_epochs if args.adapter == "rankmoe" else 0  # lora / fixed_rank: never searched
    for epoch in range(start_epoch, args.epochs):
        if has_ranks(base_model) and epoch >= search_epochs and not state["discretized"]:
            pattern = base_model.discretize_ranks()
            state["discretized"] = True
            accelerator.print(f"epoch {epoch}: ranks discretized ({sum(map(sum, pattern.values()))} in total)")
        skip = step - epoch * per_epoch  # batches of this epoch already done before a resume
        for index, (task_name, batch) in enumerate(epoch_batches(tasks, args, epoch, accelerator.process_index, world)):
            if index < skip:
                continue
            if step >= total_steps:
                break
            inputs = batch["inputs"].to(accelerator.device).float()
            targets = batch["targets"].to(accelerator.device).float()
            with accelerator.accumulate(model):
                output_ = model(pixel_values=inputs, task=task_name, labels=targets)
                loss = output_.loss
                searching = has_ranks(base_model) and not state["discretized"]
                budget = base_model.rank_budget_loss() if searching else torch.zeros((), device=loss.device)
                total = loss + budget
                if args.fail_at_step and step + 1 == args.fail_at_step:
                    total = total * float("nan")
                if not torch.isfinite(total):
                    raise NonFiniteLossError(
                        f"non-finite loss ({total.item()}) at step {step + 1}, epoch {epoch}, task {task_name!r}: "
                        "lower --learning_rate, check the task's data for NaNs, or use --max_grad_norm"
                    )
                accelerator.backward(total)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(weights, args.max_grad_norm)
                weight_optimizer.step()
                if searching and rank_optimizer is not None:
                    rank_optimizer.step()
                weight_optimizer.zero_grad(set_to_none=True)
                if rank_optimizer is not None:
                    rank_optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    scheduler.step()
                    state["optimizer_steps"] += 1
                    if searching:
                        base_model.clamp_ranks_()
            step += 1
            state["global_step"] = step
            running.setdefault(task_name, []).append(loss.item())
            progress.update(1)
            progress.set_postfix(task=task_name, loss=f"{loss.item():.4f}")
            if step % args.log_every == 0 or step == total_steps:
                record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "budget_loss": budget.item(),
                          **{f"loss/{n}": float(np.mean(v)) for n, v in running.items()}}
                if has_ranks(base_model):
                    record["total_rank"] = base_model.total_rank().detach().item()
                    state["rank_history"].append({"step": step, "ranks": base_model.rank_summary()})
                state["log"].append(record)
                running = {}
                if accelerator.is_main_process:
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                accelerator.log(record, step=step)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint(accelerator, args, state)
        if step >= total_steps:
            break
        save_checkpoint(accelerator, args, state)
    progress.close()

    if has_ranks(base_model) and not state["discretized"]:
        base_model.discretize_ranks()
        state["discretized"] = True
    results = {}
    for name, task in tasks.items():
        model_metrics, baseline_metrics = evaluate_task(base_model, task, args.eval_batch_size, accelerator)
        results[name] = {"model": model_metrics, "baseline": baseline_metrics}
    report = reporting.build_report(args, config, base_model, results, state, time.time() - started, world)
    report["parameter_fingerprints"] = gather_object([parameter_fingerprint(base_model)])  # equal if DDP kept step
    if accelerator.is_main_process:
        save_atomically(output / "adapter", base_model.save_pretrained)
        reporting.write_outputs(output, report, base_model, tasks, state)
        if args.push_to_hub:
            reporting.push_adapter(output / "adapter", args.hub_model_id, report)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report
