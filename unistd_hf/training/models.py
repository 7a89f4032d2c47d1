"""The model a run trains, built from the arguments, and the parameter groups of its two optimizers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..configuration_unistd import TaskSpec, UniSTDConfig
from ..modeling_unistd import UniSTDModel
from ..peft_integration import default_rankmoe_config, expert_pattern, get_unistd_peft_model
from .arguments import TrainingArguments
from ..atomic import write_atomically

__all__ = ["build_model", "weight_parameters", "parameter_fingerprint"]


def build_model(args: TrainingArguments, specs: list[TaskSpec], accelerator: Accelerator) -> tuple[torch.nn.Module, UniSTDConfig]:
    """The UniSTD model, adapted as `args.adapter` says. A random backbone is saved to output_dir/backbone first
    and loaded from there, so the saved adapter plus that folder are all a reload needs."""
    backbone = args.backbone
    if backbone is None:
        backbone = str((Path(args.output_dir) / "backbone").resolve())
        if accelerator.is_main_process and not (Path(backbone) / "config.json").exists():
            torch.manual_seed(args.seed)
            clip = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=args.backbone_width, intermediate_size=4 * args.backbone_width,
                num_hidden_layers=args.backbone_layers, num_attention_heads=args.backbone_heads,
            ))
            write_atomically(Path(backbone), clip.save_pretrained)
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
