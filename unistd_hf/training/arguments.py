"""The arguments of a training run: one dataclass (each field is a flag of examples/train_unistd.py) and its checks.

RankMoE and rank-search settings default to `RankMoEConfig`'s and `RankSearch`'s own defaults, so a flag never
disagrees with the library it configures.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rankmoe_peft import RankMoEConfig, RankSearch
from rankmoe_peft.config import ROUTERS

from ..atomic import check_writable
from ..baselines import METHODS
from ..configuration_unistd import GATE_MODES
from ..data import list_tasks
from ..pretrain import PACKAGED_BACKBONE

__all__ = ["TrainingArguments", "validate_arguments", "check_init_from", "parse_clip_counts", "parse_task_options", "SCHEDULES", "ADAPTERS"]

SCHEDULES = ("round_robin", "proportional", "temperature")
ADAPTERS = ("rankmoe", "lora", "fixed_rank", "none")
ADAPT_SHARED = ("none", "new_experts")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("jsonl", "tensorboard")
RANDOM_BACKBONE = "random"
_RANKMOE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RankMoEConfig)}
_SEARCH_DEFAULTS = {name: p.default for name, p in inspect.signature(RankSearch).parameters.items()}


@dataclass
class TrainingArguments:
    """Everything `train()` needs; each field is also a command-line flag of examples/train_unistd.py."""

    tasks: list[str] = field(default_factory=lambda: list_tasks(synthetic=True), metadata={"help": "Tasks to train jointly."})
    output_dir: str = field(default="outputs/unistd", metadata={"help": "Where the adapter, report and checkpoints go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start a new run in an output_dir that holds another one (which is moved aside)."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "OpenSTL data folder for real tasks (mmnist, taxibj, kth)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder (default: HF datasets cache)."})
    num_train: int = field(default=256, metadata={"help": "Training clips per synthetic task."})
    num_train_per_task: str = field(
        default="city_traffic=1024,moving_digits=512",
        metadata={
            "help": "Overrides of num_train for single synthetic tasks, as 'task=clips,task=clips'. The default gives "
            "city_traffic (32x32 frames: a batch costs ~1/5 of the 64x64 tasks; it needs ~300 batches to get below "
            "the copy-last-frame error) and moving_digits (whose SSIM needs ~250 batches to pass copy-last-frame) "
            "more batches per epoch."
        },
    )
    task_options: str | None = field(
        default=None,
        metadata={"help": "Loader options per task, as JSON (or a mapping in a --config file), e.g. "
                  "'{\"kth\": {\"out_frames\": 20}, \"sevir\": {\"max_chunk\": 32}}' (see docs/DATA.md)."},
    )
    num_validation: int = field(default=32, metadata={"help": "Validation clips per synthetic task."})
    num_test: int = field(default=64, metadata={"help": "Test clips per synthetic task."})
    backbone: str = field(
        default=PACKAGED_BACKBONE,
        metadata={"help": f"Hub id or folder of a CLIP checkpoint; {PACKAGED_BACKBONE!r}: the pretrained backbone shipped "
                  f"with the package (docs/PRETRAINING.md); {RANDOM_BACKBONE!r}: a randomly initialised CLIP."},
    )
    backbone_width: int = field(default=128, metadata={"help": "Width of the random CLIP (--backbone random)."})
    backbone_layers: int = field(default=4, metadata={"help": "Layers of the random CLIP."})
    backbone_heads: int = field(default=4, metadata={"help": "Attention heads of the random CLIP."})
    hidden_channels: int = field(default=16, metadata={"help": "C', channels of the per-frame conv encoders."})
    use_temporal_adapter: bool = field(default=True, metadata={"help": "Temporal adapters after self-attention."})
    use_backbone: bool = field(
        default=True,
        metadata={"help": "False: the no-Transformer control of studies (heads only: the tokens skip the backbone; use "
                  "with --adapter none --use_temporal_adapter false)."},
    )
    temporal_gate: str = field(default="scaled", metadata={"help": f"One of {GATE_MODES}; 'scaled' is an identity at init."})
    residual_to_last_frame: bool = field(
        default=True,
        metadata={"help": "Predict the change from the last observed frame (off in the paper; see UniSTDConfig)."},
    )
    extrapolated_tasks: str = field(
        default="auto",
        metadata={"help": "Comma-separated tasks whose residual starts from a constant-velocity extrapolation of the "
                  "last frame (UniSTDConfig.extrapolated_tasks); 'auto': the tasks of discipline 'trajectory' or "
                  "'weather' (moving objects, advected fields); 'none': every task starts from the still last frame."},
    )
    method: str = field(
        default="unistd",
        metadata={"help": f"'unistd' (one shared model), or a reference method trained as one model per task in the same "
                  f"loop: {METHODS} (unistd_hf/baselines.py; sizes: --hidden_channels, --translator_channels, "
                  "--translator_depth; the backbone and adapter flags do not apply)."},
    )
    translator_channels: int = field(default=64, metadata={"help": "hid_T of --method simvp/tau (OpenSTL's paper size: 512)."})
    translator_depth: int = field(default=4, metadata={"help": "N_T of --method simvp/tau (OpenSTL's paper size: 8)."})
    decoder_skip: bool = field(default=True, metadata={"help": "SimVP's first-stage skip into each decoder (UniSTDConfig.decoder_skip)."})
    loss_l1_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of an L1 term added to the MSE loss (0: the paper's plain MSE). MSE alone makes a "
                  "blurred mean the easy minimum; L1 keeps backgrounds exact and edges sharp (UniSTDConfig)."},
    )
    loss_gdl_weight: float = field(default=0.0, metadata={"help": "Weight of a gradient difference term added to the loss."})
    adapter: str = field(
        default="rankmoe",
        metadata={
            "help": "'rankmoe' (experts + rank search), 'fixed_rank' (experts, ranks fixed at round(init_rank)), "
            "'lora' (one expert at rank max_rank, i.e. LoRA), 'none' (no adapter; see finetune_backbone)."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "A trained UniSTD adapter folder (a run's output_dir/adapter): add --tasks to that model as new "
                  "tasks and train only their heads; the backbone, experts, routers, ranks and temporal adapters stay "
                  "frozen, so the old tasks' predictions stay bit-identical. The architecture comes from the adapter "
                  "(its backbone and adapter flags are ignored); the saved adapter serves old and new tasks."},
    )
    adapt_shared: str = field(
        default="none",
        metadata={"help": "With --init_from: what of the shared model the new tasks may adapt. 'none': nothing (only "
                  "their heads train); 'new_experts': each adapted layer gets --new_experts experts of the new task's "
                  "own, active in its forward passes only. The old tasks stay bit-identical with either."},
    )
    new_experts: int = field(default=2, metadata={"help": "Experts per adapted layer and new task (--adapt_shared new_experts)."})
    finetune_backbone: bool = field(default=False, metadata={"help": "Train the whole backbone (with adapter='none')."})
    num_experts: int = field(default=_RANKMOE_DEFAULTS["num_experts"], metadata={"help": "Experts on q/k/v."})
    out_proj_experts: int = field(default=2, metadata={"help": "Experts on out_proj and the temporal adapters."})
    max_rank: int = field(default=_RANKMOE_DEFAULTS["max_rank"], metadata={"help": "Largest rank per expert."})
    init_rank: float = field(default=_RANKMOE_DEFAULTS["init_rank"], metadata={"help": "Initial rank per expert."})
    rank_budget: float | None = field(default=None, metadata={"help": "C; None: the initial total rank."})
    budget_weight: float = field(default=_RANKMOE_DEFAULTS["budget_weight"], metadata={"help": "beta of beta * |C - sum(ranks)|."})
    rank_grad_scale: float = field(
        default=_RANKMOE_DEFAULTS["rank_grad_scale"],
        metadata={"help": "gamma of the rank gradient (its overall scale is normalised by the search, see rankmoe_peft/search.py)."},
    )
    router: str = field(default=_RANKMOE_DEFAULTS["router"], metadata={"help": f"One of {ROUTERS}."})
    load_balancing_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the routers' Switch load-balancing loss E*sum(f_e*p_e) added to the training loss "
                  "(rankmoe_peft.load_balancing_loss; 0: off, the paper's setting)."},
    )
    epochs: int = field(default=4, metadata={"help": "Passes over every task's training split."})
    rank_search_epochs: int = field(default=2, metadata={"help": "Epochs of rank search before discretization."})
    batch_size: int = field(default=8, metadata={"help": "Clips per batch and process."})
    eval_batch_size: int = field(default=16, metadata={"help": "Clips per evaluation batch."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the weights."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of optimizer steps of linear warm-up."})
    rank_learning_rate: float = field(default=_SEARCH_DEFAULTS["lr"], metadata={"help": "SGD learning rate of the ranks."})
    rank_momentum: float = field(default=_SEARCH_DEFAULTS["momentum"], metadata={"help": "SGD (Nesterov) momentum of the ranks."})
    schedule: str = field(default="round_robin", metadata={"help": "'round_robin', 'proportional' or 'temperature'."})
    temperature: float = field(default=2.0, metadata={"help": "Temperature of the 'temperature' schedule."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (through Accelerate)."})
    seed: int = field(default=0, metadata={"help": "Seed of data, initialisation and task schedule."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many batches (0: run all epochs)."})
    checkpoint_every: int = field(default=0, metadata={"help": "Also checkpoint every N batches (0: epoch ends only)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, 'latest' (the run's newest checkpoint; an error if there is none) or "
                  "'auto' (the newest checkpoint if there is one, else a new run)."},
    )
    log_every: int = field(default=10, metadata={"help": "Log (JSON lines) every N batches."})
    eval_every: int = field(
        default=0,
        metadata={"help": "Every N batches, evaluate each task on its validation clips (--num_validation) and log it: "
                  "the validation curves of validation.png and report.json (0: off)."},
    )
    report_to: str = field(default="jsonl", metadata={"help": "'jsonl' or 'tensorboard' (JSON lines are always written)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the adapter and its model card to the hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository id for --push_to_hub."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is present."})
    fail_at_step: int = field(default=0, metadata={"help": "Testing aid: raise a non-finite loss at this step."})


def validate_arguments(args: TrainingArguments) -> None:
    """Raise ValueError with a clear message for arguments that cannot work or cannot take effect, before any data
    or model is built and before anything is written."""
    if not isinstance(args.tasks, list) or not args.tasks or not all(isinstance(t, str) for t in args.tasks):
        raise ValueError(f"--tasks must be a non-empty list of task names (in a config file: a YAML/JSON list), got {args.tasks!r}")
    known = list_tasks()
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; registered tasks: {known}")
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError(f"--tasks names a task twice: {args.tasks}")
    choices = {"method": ("unistd",) + METHODS, "schedule": SCHEDULES, "adapter": ADAPTERS, "mixed_precision": MIXED_PRECISION,
               "report_to": REPORT_TO, "router": ROUTERS, "temporal_gate": GATE_MODES}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"--{name} must be one of {allowed}, got {getattr(args, name)!r}")
    at_least = {1: ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_train", "num_test",
                    "backbone_width", "backbone_layers", "backbone_heads", "hidden_channels", "max_rank",
                    "keep_checkpoints", "log_every", "new_experts", "num_experts", "out_proj_experts", "translator_channels",
                    "translator_depth"),
                0: ("num_validation", "eval_every", "max_steps", "checkpoint_every", "rank_search_epochs", "max_grad_norm",
                    "weight_decay", "budget_weight", "fail_at_step", "load_balancing_weight", "loss_l1_weight",
                    "loss_gdl_weight")}
    for low, names in at_least.items():
        for name in names:
            if getattr(args, name) < low:
                raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    positive = ("learning_rate", "rank_learning_rate", "temperature", "rank_grad_scale")  # divisors, step sizes, gamma
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio <= 1:
        raise ValueError(f"--warmup_ratio is a fraction of the optimizer steps and must lie in [0, 1], got {args.warmup_ratio}")
    if not 0 <= args.rank_momentum < 1:
        raise ValueError(f"--rank_momentum must lie in [0, 1), got {args.rank_momentum}")
    if not 0 <= args.init_rank <= args.max_rank:
        raise ValueError(f"--init_rank must lie in [0, --max_rank={args.max_rank}], got {args.init_rank}")
    if args.rank_budget is not None and args.rank_budget < 0:
        raise ValueError(f"--rank_budget must be >= 0, got {args.rank_budget}")
    parse_clip_counts(args.num_train_per_task)
    parse_task_options(args.task_options, args.tasks)
    if args.mixed_precision == "fp16" and (args.cpu or not torch.cuda.is_available()):
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU (none is used here); use 'no' or 'bf16'")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/unistd-rankmoe)")
    if args.method != "unistd" and (args.adapter != "rankmoe" or args.finetune_backbone):
        raise ValueError(f"--method {args.method} trains its own model per task: --adapter and --finetune_backbone "
                         "apply to --method unistd only")
    if not args.use_backbone and (args.adapter != "none" or args.finetune_backbone or args.use_temporal_adapter):
        raise ValueError("--use_backbone false skips the Transformer, so nothing on it can train: use it with "
                         "--adapter none --use_temporal_adapter false (and without --finetune_backbone)")
    if args.load_balancing_weight and (args.method != "unistd" or args.adapter not in ("rankmoe", "fixed_rank")):
        raise ValueError("--load_balancing_weight balances the routers of RankMoE experts: use it with --adapter rankmoe "
                         "or fixed_rank (LoRA has one expert, 'none' no router)")
    if args.extrapolated_tasks not in ("auto", "none"):
        named = comma_list(args.extrapolated_tasks)
        if not set(named) <= set(args.tasks):
            raise ValueError(f"--extrapolated_tasks names task(s) {sorted(set(named) - set(args.tasks))} that are not in "
                             f"--tasks {args.tasks} (or give 'auto' / 'none')")
        if not args.residual_to_last_frame:
            raise ValueError("--extrapolated_tasks sets the base of the residual: use it with --residual_to_last_frame "
                             "true (or give 'none')")
    if args.init_from is not None:
        check_init_from(args)
    if args.finetune_backbone and args.adapter != "none":
        raise ValueError("--finetune_backbone trains the whole backbone; use it with --adapter none")
    if args.resume_from_checkpoint not in (None, "latest", "auto") and not Path(args.resume_from_checkpoint).is_dir():
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder "
                         "(or 'latest' / 'auto')")
    check_writable(Path(args.output_dir))
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise ValueError("--resume_from_checkpoint continues a run, --overwrite_output_dir starts a new one: pick one")


def check_init_from(args: TrainingArguments) -> None:
    """--init_from names a UniSTD adapter and --tasks only tasks it does not have yet."""
    if args.adapt_shared not in ADAPT_SHARED:
        raise ValueError(f"--adapt_shared must be one of {ADAPT_SHARED}, got {args.adapt_shared!r}")
    if args.method != "unistd":
        raise ValueError("--init_from extends a UniSTD adapter; it does not apply to --method " + args.method)
    recorded = recorded_model_config(args.init_from)
    old_tasks = [task.get("name") for task in recorded.get("tasks", [])]
    if not old_tasks:
        raise ValueError(f"--init_from {args.init_from!r} is not a UniSTD adapter: expected a folder with an "
                         "adapter_config.json that records the UniSTD model (a training run's output_dir/adapter)")
    clash = [task for task in args.tasks if task in old_tasks]
    if clash:
        raise ValueError(f"--tasks {clash} already exist in the model of --init_from (its tasks: {old_tasks}); "
                         "name only the new tasks to add")
    if args.extrapolated_tasks not in ("auto", "none") and not recorded.get("residual_to_last_frame"):
        raise ValueError("--extrapolated_tasks sets the base of the residual, but the model of --init_from predicts "
                         "frames, not a residual (give 'auto' or 'none')")


def comma_list(text: str) -> list[str]:
    """The names of a comma-separated flag value ("a, b" -> ["a", "b"])."""
    return [name.strip() for name in text.split(",") if name.strip()]


def recorded_model_config(adapter: str) -> dict:
    """The UniSTD config a saved adapter records (its adapter_config.json's base_model_config); {} if none."""
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_config") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def parse_task_options(value: str | dict | None, tasks: list[str]) -> dict[str, dict]:
    """--task_options as {task: {option: value}}; a clear error for anything else."""
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--task_options must be a JSON mapping of task -> options, got {value!r}: {error}") from error
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"--task_options must map task names to option mappings, got {value!r}")
    unknown = sorted(set(value) - set(tasks))
    if unknown:
        raise ValueError(f"--task_options names task(s) {unknown} that are not in --tasks {tasks}")
    return value


def parse_clip_counts(text: str) -> dict[str, int]:
    """'a=10,b=20' -> {'a': 10, 'b': 20}, with a clear error for anything else."""
    overrides = {}
    for item in comma_list(text or ""):
        name, _, count = item.partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--num_train_per_task expects 'task=clips,...' with clips >= 1, got {item!r}")
        overrides[name.strip()] = int(count)
    unknown = sorted(set(overrides) - set(list_tasks()))
    if unknown:
        raise ValueError(f"--num_train_per_task names unknown task(s) {unknown}; registered tasks: {list_tasks()}")
    return overrides
