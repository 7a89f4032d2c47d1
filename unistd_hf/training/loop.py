"""`train()`: the joint multi-task loop behind `accelerate launch examples/train_unistd.py`.

Weights are trained by AdamW (cosine schedule with warm-up); ranks by `rankmoe_peft.RankSearch` for the first
`rank_search_epochs`, after which they are discretized and frozen. The loss is the model's forecast loss plus the
rank budget term while searching, plus the routers' load-balancing term when `--load_balancing_weight` is set. The
step reads nothing back from the device except at logging and `--eval_every` validation steps. With `--init_from`
the run adds its tasks to a trained model and trains only what belongs to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from rankmoe_peft import RankSearch, RouterRecorder, load_balancing_loss

from .. import report as reporting
from ..usage import collapse_warning, expert_usage
from .arguments import TrainingArguments, validate_arguments
from ..atomic import write_atomically
from .checkpointing import load_checkpoint, save_checkpoint
from .evaluation import evaluate_task
from ..peft_integration import save_unistd_peft_model
from .models import build_model, parameter_fingerprint, resolve_run_backbone, weight_parameters
from .run_folder import prepare_run_folder, run_identity
from .schedule import batch_counts, epoch_batches, load_tasks

__all__ = ["train", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


def check_every_task_trains(tasks: dict, counts: dict[str, int], batch_size: int, processes: int) -> None:
    """A task with no full batch per epoch and process would be reported on without training: refuse it."""
    empty = [f"{name} ({len(tasks[name].train)} clips // {processes} process(es) // batch {batch_size} = 0)"
             for name, count in counts.items() if count == 0]
    if empty:
        raise ValueError(f"no full training batch per epoch for task(s) {', '.join(empty)}; lower --batch_size or "
                         "give these tasks more training clips (--num_train, --num_train_per_task)")


class LossMeter:
    """Per-step losses kept on the device; `flush()` moves them to the host once (at logging steps), raises on
    the first non-finite one with its step and task, and returns the mean loss per task."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, str]] = []  # (step, epoch, task)
        self.losses: list[torch.Tensor] = []

    def add(self, step: int, epoch: int, task: str, loss: torch.Tensor) -> None:
        self.entries.append((step, epoch, task))
        self.losses.append(loss.detach().float())

    def flush(self) -> dict[str, float]:
        if not self.losses:
            return {}
        values = torch.stack(self.losses).cpu().tolist()
        sums: dict[str, list[float]] = {}
        for (step, epoch, task), value in zip(self.entries, values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) at step {step}, epoch {epoch}, task {task!r}: lower --learning_rate, "
                    "check the task's data for NaNs, or use --max_grad_norm"
                )
            sums.setdefault(task, []).append(value)
        self.entries, self.losses = [], []
        return {task: sum(v) / len(v) for task, v in sums.items()}


def append_log(output: Path, record: dict[str, Any]) -> None:
    """One JSON line of logs.jsonl (training losses or validation metrics)."""
    with open(output / "logs.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def validate(model: torch.nn.Module, tasks: dict, args: TrainingArguments, accelerator: Accelerator,
             state: dict[str, Any]) -> dict[str, Any]:
    """Metrics of every task on its validation clips at this step, appended to state["validation_history"] (the
    curves of validation.png): how far training has flattened, without touching the test split."""
    record: dict[str, Any] = {"step": state["global_step"], "task_batches": dict(state["task_batches"])}
    for name, task in tasks.items():
        if task.validation is None or len(task.validation) == 0:
            continue
        metrics, _ = evaluate_task(model, task, args.eval_batch_size, accelerator, args.num_validation, "validation")
        record.update({f"val/{name}/{k}": metrics[k] for k in ("mse", "psnr", "ssim") if k in metrics})
    state.setdefault("validation_history", []).append(record)
    return record


def train(args: TrainingArguments) -> dict[str, Any]:
    """Train, evaluate and write everything to `args.output_dir`; returns the report dict."""
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
    counts = batch_counts(tasks, args.batch_size, accelerator.num_processes)
    check_every_task_trains(tasks, counts, args.batch_size, accelerator.num_processes)
    per_epoch = sum(counts.values())  # every schedule has this length
    total_steps = per_epoch * args.epochs if not args.max_steps else min(args.max_steps, per_epoch * args.epochs)
    extends = args.init_from is not None  # new tasks on a trained model: its backbone, frozen experts and ranks
    backbone, backbone_sha256 = resolve_run_backbone(args) if args.method == "unistd" and not extends else (None, None)
    identity = run_identity(args, backbone_sha256)
    resume = prepare_run_folder(args, identity, accelerator)  # nothing is written to output_dir before this

    model, config = build_model(args, [t.spec for t in tasks.values()], backbone, accelerator)
    base_model = model
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    unwrapped.check_input_values = False  # checked by the loaders; the step reads nothing back from the device
    search = None
    if hasattr(model, "rank_parameters") and not extends:
        search = RankSearch(model, lr=args.rank_learning_rate, momentum=args.rank_momentum)
    search_epochs = args.rank_search_epochs if args.adapter == "rankmoe" else 0  # lora / fixed_rank: never searched
    weights = weight_parameters(model)
    optimizer = torch.optim.AdamW(weights, lr=args.learning_rate, weight_decay=args.weight_decay)
    optimizer_steps = math.ceil(total_steps / args.gradient_accumulation_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * optimizer_steps), optimizer_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state: dict[str, Any] = {"global_step": 0, "optimizer_steps": 0, "task_batches": dict.fromkeys(tasks, 0),
                             "rank_history": [], "validation_history": [], "identity": identity}
    if resume:
        state = load_checkpoint(accelerator, resume, search, scheduler)
        if state["global_step"] >= total_steps:
            raise ValueError(f"checkpoint {str(resume)!r} is at step {state['global_step']}, the end of this run "
                             f"({total_steps} steps); raise --epochs or --max_steps to train further")
        accelerator.print(f"resumed from {resume} at step {state['global_step']}")
    if args.report_to == "tensorboard":
        accelerator.init_trackers("unistd", config={k: str(v) for k, v in dataclasses.asdict(args).items()})

    recorder = RouterRecorder(base_model) if args.load_balancing_weight else None  # router logits of each step
    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process,
                    desc="training", unit="batch")
    meter = LossMeter()
    model.train()
    step = state["global_step"]
    for epoch in range(step // per_epoch, args.epochs):
        if search is not None and search.searching and epoch >= search_epochs:
            pattern = search.finish()
            accelerator.print(f"epoch {epoch}: ranks discretized ({sum(map(sum, pattern.values()))} in total)")
        batches = epoch_batches(tasks, args, epoch, accelerator.process_index, accelerator.num_processes,
                                skip=step - epoch * per_epoch)
        for task_name, batch in batches:
            if step >= total_steps:
                break
            try:
                inputs = batch["inputs"].to(accelerator.device).float()
                targets = batch["targets"].to(accelerator.device).float()
                with accelerator.accumulate(model):
                    loss = model(pixel_values=inputs, task=task_name, labels=targets).loss
                    budget = search.loss() if search is not None else 0.0
                    if recorder is not None:
                        balance = load_balancing_loss(recorder)
                        meter.add(step + 1, epoch, "balance", balance)
                        budget = budget + args.load_balancing_weight * balance
                    if args.fail_at_step and step + 1 == args.fail_at_step:
                        loss = loss * float("nan")
                    accelerator.backward(loss + budget)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(weights, args.max_grad_norm)
                    optimizer.step()  # Accelerate skips it (and zero_grad) between accumulation steps
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        if search is not None:
                            search.step()
                        scheduler.step()
                        state["optimizer_steps"] += 1
            except Exception:
                meter.flush()  # a non-finite loss a few steps back explains most crashes: report that instead
                raise
            step += 1
            state["global_step"] = step
            state["task_batches"][task_name] += 1
            meter.add(step, epoch, task_name, loss)
            progress.update(1)
            if step % args.log_every == 0 or step == total_steps:
                losses = meter.flush()
                record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                          **{f"loss/{n}": v for n, v in losses.items()}}
                if search is not None:
                    record["budget_loss"] = float(search.loss())
                    record["total_rank"] = float(base_model.total_rank().detach())
                    state["rank_history"].append({"step": step, "ranks": search.summary()})
                progress.set_postfix({n.split("/")[-1]: f"{v:.4f}" for n, v in record.items() if n.startswith("loss/")})
                if accelerator.is_main_process:
                    append_log(output, record)
                accelerator.log(record, step=step)
            if args.eval_every and step % args.eval_every == 0:
                record = validate(base_model, tasks, args, accelerator, state)
                if accelerator.is_main_process:
                    append_log(output, record)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                meter.flush()  # never checkpoint weights that a non-finite loss has touched
                save_checkpoint(accelerator, output, args.keep_checkpoints, state, search, scheduler)
        if step >= total_steps:
            break
        meter.flush()
        save_checkpoint(accelerator, output, args.keep_checkpoints, state, search, scheduler)
    progress.close()
    meter.flush()
    if recorder is not None:
        recorder.remove()

    if search is not None and search.searching:
        search.finish()
    results = {}
    for name, task in tasks.items():
        model_metrics, baseline_metrics = evaluate_task(base_model, task, args.eval_batch_size, accelerator)
        results[name] = {"model": model_metrics, "baseline": baseline_metrics}
    report = reporting.build_report(args, config, base_model, results, state, time.time() - started,
                                    accelerator.num_processes)
    report["parameter_fingerprints"] = gather_object([parameter_fingerprint(base_model)])  # equal if DDP kept step
    if accelerator.is_main_process and hasattr(base_model, "rank_summary"):  # which experts serve which task
        report["expert_usage"] = expert_usage(base_model, tasks, args.eval_batch_size, args.num_test)
        report["expert_collapse"] = collapse_warning(report["expert_usage"])
        if report["expert_collapse"]:
            accelerator.print(report["expert_collapse"])
    if accelerator.is_main_process:
        saved = output / ("adapter" if args.method == "unistd" else "model")  # a reference method saves a whole model
        write_atomically(saved, lambda folder: save_unistd_peft_model(base_model, folder))  # + backbone/ if needed
        reporting.write_outputs(output, report, base_model, tasks, state)
        if args.push_to_hub:
            reporting.push_adapter(saved, args.hub_model_id, report)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report
