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
the RankMoE target modules of `get_unistd_peft_model` (unistd_hf/peft_integration.py) match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_unistd import TaskSpec, UniSTDConfig
from .motion import residual_base
from .modules import (
    FrameDecoder,
    FrameEncoder,
    TemporalAdapter,
    forecast_loss,
    init_weights_,
    sincos_2d_position_encoding,
)

__all__ = ["UniSTDOutput", "UniSTDModel", "load_clip_backbone", "check_forecast_inputs", "TASK_HEAD_MODULES"]

# Per-task ModuleDicts; `get_unistd_peft_model` (unistd_hf/peft_integration.py) trains and saves `<name>.<task>`.
TASK_HEAD_MODULES = ("task_encoders", "input_projections", "output_projections", "task_decoders")
# The peft adapter that serves every task; `UniSTDConfig.task_adapters` adds per-task ones beside it.
MAIN_ADAPTER = "default"
# Architecture fields that must agree between a recorded backbone config and the checkpoint loaded later.
_BACKBONE_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class UniSTDOutput(ModelOutput):
    """Output of `UniSTDModel.forward`.

    Args:
        loss: `modules.forecast_loss` (MSE + the config's L1 and gradient difference terms), in float32, given labels.
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
    """Random init from a config dict, or `from_pretrained` for a hub id / path / the packaged backbone's name.

    The config keeps the name as given (e.g. "unistd-hf/clip-mae-tiny"); it is resolved to a folder only here, at build
    time (`pretrain.resolve_backbone`), so that a saved config names its backbone the same way on every machine.
    """
    from .pretrain import resolve_backbone

    if not config.backbone_is_pretrained:
        return CLIPVisionModel._from_config(CLIPVisionConfig.from_dict(config.backbone))
    if _building_on_meta_device():
        # `UniSTDModel.from_pretrained`: the saved model holds the backbone's weights; only the shape is needed.
        if config.pretrained_backbone_config is not None:
            backbone_config = CLIPVisionConfig.from_dict(config.pretrained_backbone_config)
        else:
            backbone_config = CLIPVisionConfig.from_pretrained(resolve_backbone(config.backbone))
        return CLIPVisionModel._from_config(backbone_config)
    backbone = load_clip_backbone(resolve_backbone(config.backbone), expected=config.pretrained_backbone_config)
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
    # Value checks of the inputs (finite, within [0, 1]) read the tensor back to the host. The training loop turns
    # them off (`model.check_input_values = False`): its data was checked once, where the loaders read it.
    check_input_values: bool = True

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
        n_adapters = len(layers) if config.use_temporal_adapter and config.use_backbone else 0
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
            labels: (B, T', C, H, W) target frames; gives `loss` (`modules.forecast_loss`).
            return_dict: False returns a tuple (loss?, predictions, last_hidden_state).
        """
        spec = self._check_inputs(pixel_values, task, labels)
        if self.config.task_adapters:
            self._activate_task_adapters(task)
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
        if self.config.use_backbone:
            x = x.to(self.backbone.dtype)
            x = self.backbone.pre_layrnorm(x)  # (B, N, D)
            hidden = self.backbone.encoder(inputs_embeds=x).last_hidden_state  # (B, N, D)
        else:  # the no-Transformer control: heads only
            hidden = x

        # tokens -> per-frame decoder
        x = self.output_projections[task](hidden.to(_dtype_of(self.output_projections[task])))  # (B, N, T'*C')
        x = x.view(B, Hp, Wp, T_out, Cp).permute(0, 3, 4, 1, 2).reshape(B * T_out, Cp, Hp, Wp)  # (B*T', C', H', W')
        x = self.task_decoders[task](x, skip)  # (B*T', C, H, W)
        predictions = x.view(B, T_out, C, H, W)
        if self.config.residual_to_last_frame:
            base = residual_base(pixel_values, T_out, task in self.config.extrapolated_tasks)  # (B, 1 or T', C, H, W)
            predictions = predictions + base.to(predictions.dtype)

        loss = None
        if labels is not None:
            loss = forecast_loss(predictions, labels, self.config.loss_l1_weight, self.config.loss_gdl_weight)
        output = UniSTDOutput(loss=loss, predictions=predictions, last_hidden_state=hidden)
        return output if return_dict else output.to_tuple()

    def _activate_task_adapters(self, task: str) -> None:
        """The main adapter plus `task`'s own (config.task_adapters) become the active adapters of every RankMoE
        layer, so another task's experts never run. Set on peft's layer attribute directly: `set_adapter` would
        also switch requires_grad, and running a task must not unfreeze anything."""
        from rankmoe_peft import RankMoELayer

        active = [MAIN_ADAPTER, *self.config.task_adapters.get(task, [])]
        for module in self.modules():
            if isinstance(module, RankMoELayer):
                module._active_adapter = active  # a layer without one of them skips it (Linear.forward)

    def _check_inputs(self, pixel_values: Any, task: Any, labels: Any) -> TaskSpec:
        return check_forecast_inputs(self.task_specs, pixel_values, task, labels, self.check_input_values)


VALUE_TOLERANCE = 1e-3  # frames may overshoot [0, 1] by this much (float16 storage, resampling)


def check_forecast_inputs(
    task_specs: dict[str, TaskSpec], pixel_values: Any, task: Any, labels: Any, check_values: bool = True
) -> TaskSpec:
    """The `TaskSpec` of `task`; a ValueError naming what was expected for an unknown task or wrong frames.

    Shared by every model with UniSTD's calling convention (also the SimVP/TAU references of `baselines.py`).
    """
    if task not in task_specs:
        raise ValueError(f"unknown task {task!r}; this model was built for tasks {list(task_specs)}")
    spec = task_specs[task]
    _check_frames("pixel_values", pixel_values, spec.input_shape, task, "(B, T, C, H, W)", check_values=check_values)
    if labels is not None:
        _check_frames("labels", labels, spec.target_shape, task, "(B, T', C, H, W)", batch=pixel_values.shape[0],
                      check_values=check_values)
    return spec


def _check_frames(
    name: str, value: Any, frame_shape: tuple[int, ...], task: str, dims: str, batch: int | None = None,
    check_values: bool = True,
) -> None:
    """ValueError naming the expected (B, *frame_shape) for a wrong type, dtype, shape, batch, or (with
    `check_values`) a non-finite value or one outside [0, 1]."""
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
    if not check_values:
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} for task {task!r} must be finite, got {bad} NaN/inf value(s) of {value.numel()}")
    low, high = float(value.min()), float(value.max())
    if low < -VALUE_TOLERANCE or high > 1 + VALUE_TOLERANCE:
        raise ValueError(
            f"{name} for task {task!r} must be scaled to [0, 1], got values in [{low:.4g}, {high:.4g}]; divide uint8 "
            "frames by 255 and map physical values with the task's value_range (the loaders of unistd_hf.data do)"
        )
