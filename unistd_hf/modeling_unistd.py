"""UniSTD as a transformers model: per-task conv encoders/decoders around one frozen CLIP vision encoder.

Data path for a task with spec (T, T', C, H, W) and n downsampling blocks (H' = H/2^n, W' = W/2^n, N = H'W'):

    pixel_values (B, T, C, H, W)
      -> task_encoders[task] per frame       (B*T, C', H', W')   [and first-stage features (B*T, C', H, W)]
      -> tokens                              (B, N, T*C')
      -> input_projections[task]             (B, N, D)
      + 2D sin-cos position encoding         (N, D)
      -> backbone.pre_layrnorm, backbone.encoder.layers (each self-attention output re-weighted by a temporal adapter)
      -> output_projections[task]            (B, N, T'*C')
      -> task_decoders[task] per frame       (B*T', C, H, W)     [+ skip: first-stage features, T -> T' frames]
      -> predictions                         (B, T', C, H, W)

The CLIP patch embedding, class token and post layernorm exist in `backbone` (so checkpoints load unchanged) but
are not used. The backbone keeps CLIP's module names (`backbone.encoder.layers.0.self_attn.q_proj`), which is what
the RankMoE target modules of `get_unistd_peft_model` match.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_unistd import TaskSpec, UniSTDConfig
from .modules import (
    FrameDecoder,
    FrameEncoder,
    TemporalAdapter,
    forecast_loss,
    init_weights_,
    sincos_2d_position_encoding,
)

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

__all__ = [
    "UniSTDOutput",
    "UniSTDModel",
    "load_clip_backbone",
    "default_rankmoe_config",
    "get_unistd_peft_model",
    "load_unistd_peft_model",
    "save_backbone",
    "parameter_report",
    "format_parameter_report",
    "TASK_HEAD_MODULES",
    "check_forecast_inputs",
]

# Per-task ModuleDicts; `get_unistd_peft_model` trains and saves `<name>.<task>` for each of them.
TASK_HEAD_MODULES = ("task_encoders", "input_projections", "output_projections", "task_decoders")
# Architecture fields that must agree between a recorded backbone config and the checkpoint loaded later.
_BACKBONE_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class UniSTDOutput(ModelOutput):
    """Output of `UniSTDModel.forward`.

    Args:
        loss: MSE (+ `config.loss_l1_weight` * L1) between predictions and labels, in float32, when labels are given.
        predictions: (B, T', C, H, W) forecast frames; linear output, meant for targets in [0, 1].
        last_hidden_state: (B, N, D) backbone output tokens, N = H'*W' in row-major order.
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def load_clip_backbone(name_or_path: str | Path, expected: dict | None = None) -> CLIPVisionModel:
    """Load a CLIP vision encoder from a hub id or directory (vision-only or full CLIP checkpoint).

    transformers 5 maps the older `vision_model.`-prefixed keys itself. Weights are read from safetensors only
    (no pickle) and no remote code runs. Raises a ValueError if a weight the model uses (pre-encoder layernorm or
    encoder) is missing from the checkpoint, or if its architecture differs from `expected` (a config dict).
    """
    backbone, info = CLIPVisionModel.from_pretrained(
        str(name_or_path),
        use_safetensors=True,
        trust_remote_code=False,
        dtype=torch.get_default_dtype(),
        output_loading_info=True,
    )
    missing = sorted(k for k in info["missing_keys"] if k.startswith(("pre_layrnorm.", "encoder.")))
    if missing:
        raise ValueError(
            f"backbone checkpoint {str(name_or_path)!r} lacks {len(missing)} weight(s) the model uses, e.g. "
            f"{missing[:3]}; expected a CLIP vision encoder (keys 'encoder.layers.*' or "
            "'vision_model.encoder.layers.*')"
        )
    if expected is not None:
        expected = CLIPVisionConfig.from_dict(expected).to_dict()  # fills defaults of a partial dict
        got = backbone.config.to_dict()
        diff = {k: (expected.get(k), got.get(k)) for k in _BACKBONE_ARCH_FIELDS if expected.get(k) != got.get(k)}
        if diff:
            raise ValueError(
                f"backbone checkpoint {str(name_or_path)!r} does not match the architecture this model was built "
                f"with: {{field: (expected, found)}} = {diff}"
            )
    return backbone


def _building_on_meta_device() -> bool:
    """True inside `from_pretrained`, where modules are created on the meta device and weights come later."""
    return torch.empty(0).device.type == "meta"


def _build_backbone(config: UniSTDConfig) -> CLIPVisionModel:
    """Random init from a config dict, or `from_pretrained` for a hub id / path (recorded in the config)."""
    if not config.backbone_is_pretrained:
        return CLIPVisionModel._from_config(CLIPVisionConfig.from_dict(config.backbone))
    if _building_on_meta_device():
        # `UniSTDModel.from_pretrained`: the saved model holds the backbone's weights; only the shape is needed.
        if config.pretrained_backbone_config is not None:
            backbone_config = CLIPVisionConfig.from_dict(config.pretrained_backbone_config)
        else:
            backbone_config = CLIPVisionConfig.from_pretrained(config.backbone)
        return CLIPVisionModel._from_config(backbone_config)
    backbone = load_clip_backbone(config.backbone, expected=config.pretrained_backbone_config)
    config.pretrained_backbone_config = json.loads(backbone.config.to_json_string(use_diff=False))
    return backbone


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class UniSTDModel(PreTrainedModel):
    """One model for many spatio-temporal forecasting tasks on a shared (frozen) CLIP vision encoder.

    Args:
        config: a `UniSTDConfig` (backbone, task specs, encoder width, temporal adapter settings).
    """

    config_class = UniSTDConfig
    config: UniSTDConfig
    base_model_prefix = "unistd"
    main_input_name = "pixel_values"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: UniSTDConfig) -> None:
        super().__init__(config)
        self.backbone = _build_backbone(config)
        width = self.backbone.config.hidden_size
        if width % 4:
            raise ValueError(f"the backbone width must be divisible by 4 for the 2D position encoding, got {width}")
        self.task_specs: dict[str, TaskSpec] = config.task_specs
        if not self.task_specs:
            raise ValueError("UniSTDConfig.tasks is empty; give at least one TaskSpec")
        bad = [name for name in self.task_specs if "." in name]
        if bad:
            raise ValueError(f"task names are module names and cannot contain '.', got {bad}")

        hidden, groups = config.hidden_channels, config.group_norm_groups
        specs = self.task_specs.items()
        self.task_encoders = nn.ModuleDict(
            {name: FrameEncoder(s.channels, hidden, s.num_downsample, groups) for name, s in specs}
        )
        self.input_projections = nn.ModuleDict({name: nn.Linear(s.in_frames * hidden, width) for name, s in specs})
        self.output_projections = nn.ModuleDict({name: nn.Linear(width, s.out_frames * hidden) for name, s in specs})
        self.task_decoders = nn.ModuleDict(
            {
                name: FrameDecoder(
                    hidden, s.channels, s.num_downsample, groups, zero_head=config.residual_to_last_frame,
                    in_frames=s.in_frames if config.decoder_skip else None, out_frames=s.out_frames,
                )
                for name, s in specs
            }
        )

        # One temporal adapter per backbone layer, run as a forward hook on the layer's self-attention so that the
        # backbone's own layer code (and its module names) stay untouched.
        layers = self.backbone.encoder.layers
        n_adapters = len(layers) if config.use_temporal_adapter else 0
        self.temporal_adapters = nn.ModuleList(
            [TemporalAdapter(width, config.temporal_reduction, config.temporal_gate) for _ in range(n_adapters)]
        )
        for layer, adapter in zip(layers, self.temporal_adapters):
            layer.self_attn.register_forward_hook(adapter.attention_hook)

        self.post_init()
        self._freeze()

    def _freeze(self) -> None:
        """Backbone frozen (config.freeze_backbone); the temporal adapters' zero base layers always frozen."""
        if self.config.freeze_backbone:
            self.backbone.requires_grad_(False)
        for adapter in self.temporal_adapters:
            adapter.temporal_moe.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, then re-freeze (loading creates fresh parameters, requires_grad=True)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._freeze()
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        """Init of the new layers (`modules.init_weights_`, one rule); the backbone, a PreTrainedModel, is
        initialised by its own `_init_weights`, and tensors loaded by `from_pretrained` are skipped by transformers."""
        init_weights_(module)

    @property
    def width(self) -> int:
        """D, the backbone width."""
        return self.backbone.config.hidden_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UniSTDOutput | tuple:
        """Forecast T' frames of `task` from T observed frames.

        Args:
            pixel_values: (B, T, C, H, W) observed frames, floating point, finite, scaled to [0, 1].
            task: a task name of the config.
            labels: (B, T', C, H, W) target frames; gives `loss` (MSE + loss_l1_weight * L1).
            return_dict: False returns a tuple (loss?, predictions, last_hidden_state).
        """
        spec = self._check_inputs(pixel_values, task, labels)
        B, T, C, H, W = pixel_values.shape
        T_out, (Hp, Wp) = spec.out_frames, spec.token_grid
        N, D, Cp = Hp * Wp, self.width, self.config.hidden_channels

        # per-frame encoder -> tokens
        x = pixel_values.to(_dtype_of(self.task_encoders[task])).flatten(0, 1)  # (B*T, C, H, W)
        x, first = self.task_encoders[task](x)  # (B*T, C', H', W'), (B*T, C', H, W)
        skip = first.view(B, T, Cp, H, W) if self.config.decoder_skip else None  # (B, T, C', H, W)
        x = x.view(B, T, Cp, Hp, Wp).permute(0, 3, 4, 1, 2).reshape(B, N, T * Cp)  # (B, N, T*C')
        x = self.input_projections[task](x)  # (B, N, D)
        x = x + sincos_2d_position_encoding(Hp, Wp, D, device=x.device, dtype=x.dtype)  # (B, N, D)

        # shared backbone (temporal adapters act through hooks on each self-attention)
        x = x.to(self.backbone.dtype)
        x = self.backbone.pre_layrnorm(x)  # (B, N, D)
        hidden = self.backbone.encoder(inputs_embeds=x).last_hidden_state  # (B, N, D)

        # tokens -> per-frame decoder
        x = self.output_projections[task](hidden.to(_dtype_of(self.output_projections[task])))  # (B, N, T'*C')
        x = x.view(B, Hp, Wp, T_out, Cp).permute(0, 3, 4, 1, 2).reshape(B * T_out, Cp, Hp, Wp)  # (B*T', C', H', W')
        x = self.task_decoders[task](x, skip)  # (B*T', C, H, W)
        predictions = x.view(B, T_out, C, H, W)
        if self.config.residual_to_last_frame:
            predictions = predictions + pixel_values[:, -1:].to(predictions.dtype)  # change from the last frame

        loss = None
        if labels is not None:
            loss = forecast_loss(predictions, labels, self.config.loss_l1_weight)
        output = UniSTDOutput(loss=loss, predictions=predictions, last_hidden_state=hidden)
        return output if return_dict else output.to_tuple()

    def _check_inputs(self, pixel_values: Any, task: Any, labels: Any) -> TaskSpec:
        return check_forecast_inputs(self.task_specs, pixel_values, task, labels)


def check_forecast_inputs(task_specs: dict[str, TaskSpec], pixel_values: Any, task: Any, labels: Any) -> TaskSpec:
    """The `TaskSpec` of `task`; a ValueError naming what was expected for an unknown task or wrong frames.

    Shared by every model with UniSTD's calling convention (also the SimVP/TAU references of `baselines.py`).
    """
    if task not in task_specs:
        raise ValueError(f"unknown task {task!r}; this model was built for tasks {list(task_specs)}")
    spec = task_specs[task]
    _check_frames("pixel_values", pixel_values, spec.input_shape, task, "(B, T, C, H, W)")
    if labels is not None:
        _check_frames("labels", labels, spec.target_shape, task, "(B, T', C, H, W)", batch=pixel_values.shape[0])
    return spec


def _check_frames(
    name: str, value: Any, frame_shape: tuple[int, ...], task: str, dims: str, batch: int | None = None
) -> None:
    """ValueError naming the expected (B, *frame_shape) for a wrong type, dtype, shape, batch or non-finite value."""
    expected = f"{dims} = ({'B' if batch is None else batch}, {', '.join(map(str, frame_shape))})"
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name} for task {task!r} must be a torch.Tensor of shape {expected}, got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise ValueError(
            f"{name} for task {task!r} must be a floating-point tensor scaled to [0, 1], got dtype {value.dtype}"
        )
    shape_ok = value.dim() == 5 and tuple(value.shape[1:]) == tuple(frame_shape) and value.shape[0] > 0
    if not shape_ok or (batch is not None and value.shape[0] != batch):
        raise ValueError(f"{name} for task {task!r} must have shape {expected}, got {tuple(value.shape)}")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} for task {task!r} must be finite, got {bad} NaN/inf value(s) of {value.numel()}")


# ----------------------------------------------------------------------------------------------------------------
# PEFT: the paper's RankMoE setting in one call, and its reload


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
            r"backbone\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
            r"|temporal_adapters\.\d+\.temporal_moe"
        ),
        num_experts=6,
        num_experts_pattern={"out_proj": 2, "temporal_moe": 2},
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
            "unistd_hf.modeling_unistd.save_backbone(model, directory)>"
        )
    model = UniSTDModel(config)
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)


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


# ----------------------------------------------------------------------------------------------------------------
# Parameter report

_PARTS = ("backbone", "rankmoe adapters", "task heads", "temporal adapters", "other")


def _part_of(name: str) -> str:
    parts = name.split(".")
    if any(p.startswith("rankmoe_") for p in parts):
        return "rankmoe adapters"
    if "backbone" in parts:
        return "backbone"
    if any(p in TASK_HEAD_MODULES for p in parts):
        return "task heads"
    if "temporal_adapters" in parts:
        return "temporal adapters"
    return "other"


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per part, for a bare `UniSTDModel` or its peft-wrapped version.

    Parts: "backbone" (CLIP, incl. its unused patch embedding), "rankmoe adapters" (every `rankmoe_*` tensor:
    experts, routers, ranks), "task heads" (encoders, projections, decoders), "temporal adapters" (temporal FFNs
    and the zero base layers of their RankMoE), "other" (only listed when non-empty), and "total".
    Each tensor is counted once. With peft's `modules_to_save`, the frozen `original_module` copies (kept only so
    that `disable_adapter()` can run the untrained heads) are not counted: the trained copies are what the model
    runs, and counting both would double the heads.
    """
    counts = {part: {"trainable": 0, "total": 0} for part in _PARTS}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or "original_module" in name.split("."):
            continue
        seen.add(id(param))
        part = counts[_part_of(name)]
        part["total"] += param.numel()
        if param.requires_grad:
            part["trainable"] += param.numel()
    if not counts["other"]["total"]:
        del counts["other"]
    counts["total"] = {
        "trainable": sum(c["trainable"] for c in counts.values()),
        "total": sum(c["total"] for c in counts.values()),
    }
    return counts


def format_parameter_report(report: dict[str, dict[str, int]]) -> str:
    """Markdown table of a `parameter_report`: part, trainable, total, trainable share of the part."""
    lines = ["| part | trainable | total | trainable % |", "| --- | ---: | ---: | ---: |"]
    for part, c in report.items():
        share = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        label = f"**{part}**" if part == "total" else part
        lines.append(f"| {label} | {c['trainable']:,} | {c['total']:,} | {share:.2f} |")
    return "\n".join(lines)
