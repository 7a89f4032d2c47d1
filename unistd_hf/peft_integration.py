"""UniSTD with RankMoE through peft: the paper's adapter setting, building, reloading, and the backbone's export.

The names RankMoE adapts in a UniSTD model are defined here once (`PROJECTIONS`, `TEMPORAL_MOE`, `expert_pattern`);
the training loop, the report and the benchmarks import them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import CLIPVisionModel

from .configuration_unistd import UniSTDConfig, check_extrapolated_tasks
from .modeling_unistd import MAIN_ADAPTER, TASK_HEAD_MODULES, UniSTDModel

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
    "read_unistd_adapter",
    "add_tasks_to_unistd_peft_model",
    "save_unistd_peft_model",
    "portable_backbone",
    "save_backbone",
    "SAVED_BACKBONE",
]

# How an adapter records a backbone saved beside it (`<adapter folder>/backbone`): relative, so the folder (or the hub
# repo it is pushed to) loads on any machine. `load_unistd_peft_model` resolves it against the adapter's folder.
SAVED_BACKBONE = "./backbone"

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


def names_a_path(name: str | Path) -> bool:
    """Whether a backbone or adapter name is a file-system path rather than a hub id (`owner/name`): it exists,
    starts with `.`, `/` or `~`, or has more than one `/`."""
    text = str(name)
    return Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def portable_backbone(config: UniSTDConfig) -> str | None:
    """The name an adapter should record for `config.backbone`, or None when the backbone must be saved beside it.

    The packaged backbone (by name or by its installed folder) -> `PACKAGED_BACKBONE`; a hub id -> itself; a
    random-init config dict or a local folder -> None (an absolute path means nothing on another machine).
    """
    from .pretrain import PACKAGED_BACKBONE, PACKAGED_BACKBONE_DIR

    backbone = config.backbone
    if not isinstance(backbone, str):
        return None
    if backbone == PACKAGED_BACKBONE:
        return backbone
    path = Path(backbone).expanduser()
    if path.exists():
        return PACKAGED_BACKBONE if path.resolve() == PACKAGED_BACKBONE_DIR.resolve() else None
    if backbone == SAVED_BACKBONE or names_a_path(backbone):
        return None  # a folder that is gone: the weights the model holds are saved instead
    return backbone  # a hub id


def save_unistd_peft_model(model: nn.Module, save_directory: str | Path) -> Path:
    """`save_pretrained` plus what another machine needs to rebuild the model: a portable backbone record.

    The adapter config's `base_model_config.backbone` becomes the packaged backbone's name or a hub id as they are;
    a random or local-folder backbone is saved beside the adapter as `<save_directory>/backbone` (safetensors, via
    `save_backbone`) and recorded as `SAVED_BACKBONE` ("./backbone"), never as an absolute path. A model that is not
    a peft model (the whole-model runs) is saved with its own `save_pretrained`. Returns the folder.
    """
    folder = Path(save_directory)
    peft_configs = getattr(model, "peft_config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not peft_configs or not isinstance(getattr(base, "config", None), UniSTDConfig):
        model.save_pretrained(str(folder))
        return folder
    unistd_config = base.config
    record = portable_backbone(unistd_config)
    recorded = json.loads(json.dumps(unistd_config.to_dict()))  # a copy, as base_model_config holds it
    if record is None:
        save_backbone(model, folder / "backbone")
        record = SAVED_BACKBONE
        recorded["pretrained_backbone_config"] = json.loads(base.backbone.config.to_json_string(use_diff=False))
    recorded["backbone"] = record
    recorded.pop("_name_or_path", None)  # paths of this machine mean nothing elsewhere
    if isinstance(recorded.get("pretrained_backbone_config"), dict):
        recorded["pretrained_backbone_config"]["_name_or_path"] = record
    kept = {name: cfg.base_model_config for name, cfg in peft_configs.items()}
    try:  # every adapter's config records the same portable base model
        for cfg in peft_configs.values():
            cfg.base_model_config = recorded
        model.save_pretrained(str(folder))
    finally:
        for name, cfg in peft_configs.items():
            cfg.base_model_config = kept[name]
    return folder


def load_unistd_peft_model(
    repo_or_dir: str | Path,
    backbone: str | Path | None = None,
    is_trainable: bool = False,
    adapter_name: str = "default",
    revision: str | None = None,
) -> "PeftModel":
    """Rebuild a UniSTD peft model from its adapter alone: a local folder or a hub repo id.

    A hub repo is downloaded whole with `huggingface_hub.snapshot_download` (adapter, model card and a `backbone/`
    folder pushed beside it). The UniSTD config is read from the adapter config's `base_model_config`; its backbone
    resolves as recorded: the packaged backbone by name, a hub id, or `SAVED_BACKBONE`, the folder saved beside the
    adapter by `save_unistd_peft_model`. An adapter saved with plain `save_pretrained` on a random backbone also finds a
    `<folder>/backbone` written there by `save_backbone`. `backbone` (a folder or hub id) overrides all of this.
    """
    import peft

    folder, _, config = read_unistd_adapter(repo_or_dir, backbone, revision)
    if config.task_adapters and adapter_name != MAIN_ADAPTER:
        raise ValueError(f"this model has per-task adapters {config.task_adapters}; load its main adapter as "
                         f"{MAIN_ADAPTER!r}")
    model = peft.PeftModel.from_pretrained(UniSTDModel(config), str(folder), adapter_name=adapter_name,
                                           is_trainable=is_trainable)
    _load_task_adapters(model, folder, config, is_trainable)
    return model


def _load_task_adapters(model: "PeftModel", folder: Path, config: UniSTDConfig, is_trainable: bool = False) -> None:
    """The per-task adapters of `config.task_adapters`, which peft saved in sub-folders named after them."""
    for name in sorted({name for names in config.task_adapters.values() for name in names}):
        model.load_adapter(str(folder / name), adapter_name=name, is_trainable=is_trainable)


def read_unistd_adapter(
    repo_or_dir: str | Path, backbone: str | Path | None = None, revision: str | None = None
) -> tuple[Path, Any, UniSTDConfig]:
    """(local folder, peft config, UniSTD config with its backbone resolved) of a saved UniSTD adapter."""
    import peft

    import rankmoe_peft  # noqa: F401  (registers "rankmoe" with peft)

    folder = _adapter_folder(repo_or_dir, revision)
    peft_config = peft.PeftConfig.from_pretrained(str(folder))
    base_model_config = getattr(peft_config, "base_model_config", None)
    if not base_model_config:
        raise ValueError(
            f"the adapter config in {str(repo_or_dir)!r} has no base_model_config; expected an adapter saved from "
            "get_unistd_peft_model (or a RankMoEConfig with base_model_config=UniSTDConfig.to_dict())"
        )
    config = UniSTDConfig.from_dict(base_model_config)
    beside = folder / "backbone"
    if backbone is None and (config.backbone == SAVED_BACKBONE or not config.backbone_is_pretrained):
        if (beside / "config.json").is_file():
            backbone = beside
        elif config.backbone == SAVED_BACKBONE:
            raise ValueError(f"the adapter in {str(repo_or_dir)!r} records its backbone as saved beside it, but "
                             f"{str(beside)!r} holds no config.json; pass backbone=<CLIP folder or hub id>")
        else:
            raise ValueError(
                f"the model in {str(repo_or_dir)!r} was built on a randomly initialised backbone whose weights are not "
                "in the adapter; pass backbone=<directory written by unistd_hf.save_backbone(model, directory)>, or "
                "save with unistd_hf.save_unistd_peft_model, which stores them beside the adapter"
            )
    if backbone is not None:
        if not config.backbone_is_pretrained and config.pretrained_backbone_config is None:
            config.pretrained_backbone_config = config.backbone  # the random-init architecture the adapter expects
        config.backbone = str(backbone)
    elif Path(config.backbone).is_absolute() and not Path(config.backbone).exists():
        raise ValueError(f"the adapter in {str(repo_or_dir)!r} names its backbone by the path {config.backbone!r}, "
                         "which does not exist on this machine; pass backbone=<CLIP folder or hub id>")
    return folder, peft_config, config


def add_tasks_to_unistd_peft_model(
    repo_or_dir: str | Path, new_tasks: list, backbone: str | Path | None = None, new_experts: int = 0,
    extrapolated_tasks: list[str] | None = None,
) -> "PeftModel":
    """A saved UniSTD adapter with heads for `new_tasks` (`TaskSpec`s) added, ready to train them alone.

    Every tensor of the saved model loads unchanged and stays frozen (backbone, RankMoE experts, routers and ranks,
    temporal adapters, the old tasks' heads): only the new tasks' encoders, projections and decoders train. With
    `new_experts=K`, each new task also gets a peft adapter of its own (`task_<name>`: K experts with their own
    router on every adapted layer, ranks fixed at round(init_rank), starting at zero output) that trains with it;
    `UniSTDConfig.task_adapters` makes it active in that task's forward passes only. Either way the old tasks'
    forward passes touch nothing new, so their predictions stay bit-identical. The adapter saved from the result
    (`save_unistd_peft_model`) serves old and new tasks. `extrapolated_tasks`: new tasks whose residual starts from
    the extrapolated last frame (`UniSTDConfig.extrapolated_tasks`; the saved model must predict a residual).
    """
    import peft
    from safetensors.torch import load_file

    folder, peft_config, config = read_unistd_adapter(repo_or_dir, backbone)
    names = [spec.name for spec in new_tasks]
    clash = [name for name in names if name in config.task_specs]
    if clash:
        raise ValueError(f"task(s) {clash} already exist in the model of {str(repo_or_dir)!r} (its tasks: "
                         f"{list(config.task_specs)}); --init_from adds new tasks only")
    config.tasks = config.tasks + [spec.to_dict() for spec in new_tasks]
    config.extrapolated_tasks = check_extrapolated_tasks(
        config.extrapolated_tasks + [name for name in extrapolated_tasks or [] if name not in config.extrapolated_tasks],
        [spec["name"] for spec in config.tasks], config.residual_to_last_frame)
    new_heads = [f"{head}.{name}" for head in TASK_HEAD_MODULES for name in names]
    peft_config.modules_to_save = list(peft_config.modules_to_save or []) + new_heads
    peft_config.base_model_config = config.to_dict()
    peft_config.inference_mode = False
    model = peft.get_peft_model(UniSTDModel(config), peft_config)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    initial = peft.get_peft_model_state_dict(model)  # in the file's key format; the new heads as initialised
    missing = [key for key in initial if key not in saved and not any(f".{head}." in key for head in new_heads)]
    unexpected = [key for key in saved if key not in initial]
    if missing or unexpected:
        raise ValueError(f"the adapter in {str(repo_or_dir)!r} does not load into its own model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    peft.set_peft_model_state_dict(model, {**initial, **saved})
    _load_task_adapters(model, folder, config)  # experts of tasks added earlier
    own = [f"task_{name}" for name in names] if new_experts else []
    for task, adapter in zip(names, own):
        extra = dataclasses.replace(peft_config, num_experts=new_experts, num_experts_pattern={}, rank_pattern={},
                                    modules_to_save=None, init_weights=True, base_model_config=None)
        model.add_adapter(adapter, extra)
        model.base_model.discretize_ranks(adapter)  # fixed ranks: nothing of the rank search runs for them
        model.get_base_model().config.task_adapters[task] = [adapter]
    for name, param in model.named_parameters():  # add_adapter switches requires_grad: decide it once, here
        new_head = "modules_to_save" in name and any(f"{head}." in name for head in new_heads)
        new_expert = any(f".{adapter}" in name for adapter in own) and ".rankmoe_rank." not in name
        param.requires_grad_(new_head or new_expert)
    return model


def _adapter_folder(repo_or_dir: str | Path, revision: str | None = None) -> Path:
    """The local folder of an adapter: checked if it looks local, else a hub repo id downloaded whole."""
    folder = Path(repo_or_dir).expanduser()
    if not names_a_path(repo_or_dir):
        import huggingface_hub  # looked up at call time, so tests can intercept snapshot_download

        folder = Path(huggingface_hub.snapshot_download(repo_id=str(repo_or_dir), revision=revision))
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"adapter folder {str(folder)!r} lacks {missing}; expected a folder written by "
                         "save_pretrained of a UniSTD peft model (e.g. a training run's output_dir/adapter)")
    return folder


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
