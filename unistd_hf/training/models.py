"""The model a run trains, built from the arguments, and the parameter groups of its two optimizers."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..baselines import build_reference_model
from ..configuration_unistd import TaskSpec, UniSTDConfig
from ..modeling_unistd import UniSTDModel
from ..atomic import write_atomically
from ..peft_integration import (
    add_tasks_to_unistd_peft_model,
    default_rankmoe_config,
    expert_pattern,
    get_unistd_peft_model,
    names_a_path,
)
from ..pretrain import CHECKSUM_FILE, PACKAGED_BACKBONE, read_checksums, resolve_backbone, sha256_of
from .arguments import RANDOM_BACKBONE, TrainingArguments, comma_list, recorded_model_config

__all__ = ["resolve_run_backbone", "build_model", "weight_parameters", "parameter_fingerprint"]


def resolve_run_backbone(args: TrainingArguments) -> tuple[str | CLIPVisionModel, str | None]:
    """(backbone, sha256): a random CLIP built in memory from the seed (`--backbone random`), or the folder / hub id
    to load (the packaged pretrained backbone is verified against its recorded checksum first). The checksum
    (of the random weights, or of a local folder's model.safetensors; None for a hub id) is part of the run's
    identity, so a resume onto other backbone weights is refused."""
    if args.backbone == RANDOM_BACKBONE:
        torch.manual_seed(args.seed)
        clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=args.backbone_width, intermediate_size=4 * args.backbone_width,
            num_hidden_layers=args.backbone_layers, num_attention_heads=args.backbone_heads,
        ))
        return clip, parameter_fingerprint(clip)
    source = resolve_backbone(args.backbone)  # verifies a folder's SHA256SUMS, if it has one
    if not Path(source).exists() and names_a_path(source):
        raise ValueError(f"--backbone {args.backbone!r}: no such folder (expected a CLIP checkpoint folder, a hub id "
                         f"like openai/clip-vit-base-patch16, or {RANDOM_BACKBONE!r})")
    weights = Path(source) / "model.safetensors"
    if Path(source).exists() and not weights.is_file():
        raise ValueError(f"--backbone {args.backbone!r}: {str(weights)!r} does not exist; expected a CLIP checkpoint "
                         "folder written by save_pretrained (config.json + model.safetensors)")
    if not weights.is_file():
        return source, None  # a hub id
    recorded = read_checksums(source) if (Path(source) / CHECKSUM_FILE).is_file() else {}
    return source, recorded.get(weights.name) or sha256_of(weights)  # just verified: no second pass over the file


EXTRAPOLATED_DISCIPLINES = ("trajectory", "weather")


def extrapolated_tasks(args: TrainingArguments, specs: list[TaskSpec]) -> list[str]:
    """The task names of `--extrapolated_tasks` ('auto': disciplines `EXTRAPOLATED_DISCIPLINES`; needs a residual)."""
    if not args.residual_to_last_frame or args.extrapolated_tasks == "none":
        return []
    if args.extrapolated_tasks == "auto":
        return [s.name for s in specs if s.discipline in EXTRAPOLATED_DISCIPLINES]
    named = comma_list(args.extrapolated_tasks)
    return [s.name for s in specs if s.name in named]


def build_model(
    args: TrainingArguments, specs: list[TaskSpec], backbone: str | CLIPVisionModel | None, accelerator: Accelerator
) -> tuple[torch.nn.Module, Any]:
    """The UniSTD model, adapted as `args.adapter` says (or the reference model of `args.method`, one per task). A
    random backbone is saved to output_dir/backbone first and loaded from there, so the saved adapter plus that
    folder are all a reload needs."""
    losses = dict(loss_l1_weight=args.loss_l1_weight, loss_gdl_weight=args.loss_gdl_weight)
    if args.init_from:  # the saved model decides whether there is a residual (--residual_to_last_frame is ignored)
        residual = bool(recorded_model_config(args.init_from).get("residual_to_last_frame"))
        extrapolated = extrapolated_tasks(dataclasses.replace(args, residual_to_last_frame=residual), specs)
        model = add_tasks_to_unistd_peft_model(args.init_from, specs,
                                               new_experts=args.new_experts if args.adapt_shared == "new_experts" else 0,
                                               extrapolated_tasks=extrapolated)
        return model, model.get_base_model().config
    if args.method != "unistd":
        model = build_reference_model(args.method, specs, hid_S=args.hidden_channels, hid_T=args.translator_channels,
                                      N_T=args.translator_depth, residual_to_last_frame=args.residual_to_last_frame,
                                      extrapolated_tasks=extrapolated_tasks(args, specs), **losses)
        return model, model.config
    if isinstance(backbone, CLIPVisionModel):
        folder = (Path(args.output_dir) / "backbone").resolve()
        if accelerator.is_main_process and not (folder / "config.json").exists():
            write_atomically(folder, backbone.save_pretrained)
        accelerator.wait_for_everyone()
        backbone = str(folder)
    elif args.backbone == PACKAGED_BACKBONE:
        backbone = PACKAGED_BACKBONE  # recorded by name (resolved at build time), so saved adapters load anywhere
    config = UniSTDConfig(
        backbone=backbone, tasks=specs, hidden_channels=args.hidden_channels,
        temporal_gate=args.temporal_gate, use_temporal_adapter=args.use_temporal_adapter, use_backbone=args.use_backbone,
        residual_to_last_frame=args.residual_to_last_frame, decoder_skip=args.decoder_skip,
        extrapolated_tasks=extrapolated_tasks(args, specs),
        freeze_backbone=not args.finetune_backbone, **losses,
    )
    set_seed(args.seed)
    if args.adapter == "none":
        return UniSTDModel(config), config
    overrides: dict[str, Any] = dict(
        max_rank=args.max_rank, init_rank=args.init_rank, rank_budget=args.rank_budget,
        budget_weight=args.budget_weight, rank_grad_scale=args.rank_grad_scale, router=args.router,
        num_experts=args.num_experts, num_experts_pattern=expert_pattern(args.out_proj_experts),
    )
    if args.adapter == "lora":
        overrides.update(num_experts=1, num_experts_pattern={}, init_rank=float(args.max_rank))
    model = get_unistd_peft_model(config, default_rankmoe_config(config, **overrides))
    return model, config


def weight_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters for AdamW: everything trainable except the ranks (the rank search updates those)."""
    ranks = {id(p) for p in model.rank_parameters()} if hasattr(model, "rank_parameters") else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in ranks]


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: processes that stayed in step have identical fingerprints."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
