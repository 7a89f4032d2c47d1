"""UniSTD with RankMoE through peft: the paper's adapter setting, building, reloading, and the backbone's export.

The names RankMoE adapts in a UniSTD model are defined here once (`PROJECTIONS`, `TEMPORAL_MOE`, `expert_pattern`);
the training loop, the report and the benchmarks import them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import CLIPVisionModel

from .configuration_unistd import UniSTDConfig
from .modeling_unistd import TASK_HEAD_MODULES, UniSTDModel

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

__all__ = [
    "PROJECTIONS",
    "TEMPORAL_MOE",
    "MODULE_KINDS",
    "expert_pattern",
    "default_rankmoe_config",
    "get_unistd_peft_model",
    "load_unistd_peft_model",
    "save_backbone",
]

# The backbone's attention projections (CLIP's names) and the temporal adapter's RankMoE base layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEMPORAL_MOE = "temporal_moe"
MODULE_KINDS = PROJECTIONS + (TEMPORAL_MOE,)


def expert_pattern(few_experts: int = 2) -> dict[str, int]:
    """The paper's expert counts besides q/k/v: `few_experts` on out_proj and on the temporal adapters."""
    return {"out_proj": few_experts, TEMPORAL_MOE: few_experts}


def default_rankmoe_config(config: UniSTDConfig, **overrides: Any):
    """The paper's RankMoE setting for a UniSTD model (returns a `rankmoe_peft.RankMoEConfig`).

    RankMoE on q/k/v/out_proj of every backbone layer (6/6/6/2 experts) and on each temporal adapter's
    `temporal_moe` (2 experts), max rank 8, initial rank 4.5, token routing; the task heads and the temporal FFNs
    trained and saved with the adapter (`modules_to_save`); `base_model_config` = the UniSTD config, which is how
    `load_unistd_peft_model` rebuilds the base model. Keyword overrides replace any field.
    """
    from rankmoe_peft import RankMoEConfig

    modules_to_save = [f"{head}.{task}" for head in TASK_HEAD_MODULES for task in config.task_specs]
    if config.use_temporal_adapter:
        modules_to_save += ["temporal_down", "temporal_up"]
    settings: dict[str, Any] = dict(
        target_modules=(
            rf"backbone\.encoder\.layers\.\d+\.self_attn\.({'|'.join(PROJECTIONS)})"
            rf"|temporal_adapters\.\d+\.{TEMPORAL_MOE}"
        ),
        num_experts=6,
        num_experts_pattern=expert_pattern(),
        max_rank=8,
        init_rank=4.5,
        lora_alpha=8.0,
        router="token",
        modules_to_save=modules_to_save,
        base_model_config=config.to_dict(),
    )
    settings.update(overrides)
    return RankMoEConfig(**settings)


def get_unistd_peft_model(
    config: UniSTDConfig, rankmoe_config: Any = None, adapter_name: str = "default"
) -> "PeftModel":
    """Build `UniSTDModel(config)` and wrap it with RankMoE (`None`: `default_rankmoe_config`, the paper's setting).

    The backbone stays frozen and is not saved with the adapter; save with `save_pretrained` and reload with
    `load_unistd_peft_model`. A given `rankmoe_config` without `base_model_config` gets the model's config filled in.
    """
    import peft

    import rankmoe_peft  # noqa: F401  (registers "rankmoe" with peft)

    model = UniSTDModel(config)
    if rankmoe_config is None:
        rankmoe_config = default_rankmoe_config(model.config)
    elif getattr(rankmoe_config, "base_model_config", None) is None:
        rankmoe_config = dataclasses.replace(rankmoe_config, base_model_config=model.config.to_dict())
    return peft.get_peft_model(model, rankmoe_config, adapter_name=adapter_name)


def load_unistd_peft_model(
    adapter_dir: str | Path,
    backbone: str | Path | None = None,
    is_trainable: bool = False,
    adapter_name: str = "default",
) -> "PeftModel":
    """Rebuild a model saved by `get_unistd_peft_model(...).save_pretrained(adapter_dir)`.

    The UniSTD config is read from the adapter config's `base_model_config`. The backbone weights are not in the
    adapter: they come from the config's backbone hub id / path, or from `backbone` (a directory written by
    `save_backbone(model, directory)`, or a hub id / CLIP checkpoint directory), which is required when the model was
    built on a randomly initialised backbone config.
    """
    import peft

    import rankmoe_peft  # noqa: F401  (registers "rankmoe" with peft)

    _check_adapter_folder(adapter_dir)
    peft_config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    base_model_config = getattr(peft_config, "base_model_config", None)
    if not base_model_config:
        raise ValueError(
            f"the adapter config in {str(adapter_dir)!r} has no base_model_config; expected an adapter saved from "
            "get_unistd_peft_model (or a RankMoEConfig with base_model_config=UniSTDConfig.to_dict())"
        )
    config = UniSTDConfig.from_dict(base_model_config)
    if backbone is not None:
        if not config.backbone_is_pretrained and config.pretrained_backbone_config is None:
            config.pretrained_backbone_config = config.backbone  # the random-init architecture the adapter expects
        config.backbone = str(backbone)
    elif not config.backbone_is_pretrained:
        raise ValueError(
            f"the model in {str(adapter_dir)!r} was built on a randomly initialised backbone whose weights are not in "
            "the adapter; pass backbone=<directory written by "
            "unistd_hf.save_backbone(model, directory)>"
        )
    model = UniSTDModel(config)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)


def _check_adapter_folder(adapter_dir: str | Path) -> None:
    """A local adapter folder must hold both adapter files; a name that is not a local path is a hub id."""
    folder = Path(adapter_dir)
    looks_local = folder.exists() or str(adapter_dir).startswith((".", "/", "~")) or str(adapter_dir).count("/") > 1
    if not looks_local:
        return
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"adapter folder {str(folder)!r} lacks {missing}; expected a folder written by "
                         "save_pretrained of a UniSTD peft model (e.g. a training run's output_dir/adapter)")


def save_backbone(model: nn.Module, save_directory: str | Path) -> CLIPVisionModel:
    """Save the backbone of a UniSTD model (bare or peft-wrapped) as a plain `CLIPVisionModel` checkpoint.

    Needed to reload an adapter trained on a randomly initialised backbone (`load_unistd_peft_model(...,
    backbone=save_directory)`). Adapter layers are stripped: peft keeps each adapted Linear as `<name>.base_layer`
    and its adapter tensors beside it, so `model.backbone.save_pretrained` of a wrapped model is not a CLIP
    checkpoint. Returns the clean copy that was saved.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.backbone
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in backbone.state_dict().items()
        if not any(part.startswith("rankmoe_") for part in name.split("."))
    }
    clean = CLIPVisionModel._from_config(backbone.config)
    clean.load_state_dict(state, strict=True)
    clean.save_pretrained(str(save_directory))
    return clean
