"""SimVP and TAU, the single-task reference methods of the paper's tables, with UniSTD's calling convention.

Written here after their papers (not copied from OpenSTL):

- SimVP (Gao et al., "SimVP: Simpler yet Better Video Prediction", CVPR 2022): a per-frame conv encoder, a
  translator that sees the T frames' latents stacked as T*C' channels at once (N_T Inception modules arranged as a
  UNet), and a per-frame decoder that also receives the first encoder stage's full-resolution features (the skip).
- TAU (Tan et al., "Temporal Attention Unit", CVPR 2023): the same encoder/decoder around a translator of N_T
  MetaFormer blocks whose token mixer is the Temporal Attention Unit: a static attention (depth-wise conv ->
  dilated depth-wise conv -> 1x1 conv, a large receptive field) times a dynamic channel attention (squeeze and
  excitation over the stacked T*C' channels), both multiplying the input.

The encoder/decoder are UniSTD's own (`modules.FrameEncoder`/`FrameDecoder`: stride-2 Conv2d-GroupNorm-SiLU down,
transposed conv up, the skip through `modules.SkipTimeMap`), which are SimVP's: OpenSTL's N_S spatial layers are
`2 * TaskSpec.num_downsample` here (N_S = 4 <-> num_downsample = 2, 64x64 frames -> 16x16 latents as in OpenSTL's
Moving MNIST setting). T' != T is handled by the translator (T*C' channels in, T'*C' out) and the skip's T -> T' map.
TAU's extra "differential divergence" regulariser is not used: every method here trains on the same loss
(`modules.forecast_loss`).

Sizes: `hid_S` (C'), `hid_T` (translator width), `N_T` (translator depth). The "paper size" of OpenSTL's Moving MNIST
configs is `PAPER_SIZE` (hid_S 64, hid_T 512, N_T 8; TAU's MLP ratio 8): on Moving MNIST (10 -> 10, 1x64x64) it
gives 57.8M parameters for SimVP and 41.8M for TAU (OpenSTL lists 58.0M and 44.7M; its TAU runs the first and last
blocks at the T*C' width where this one uses 1x1 projections). The defaults (hid_S 16, hid_T 64, N_T 4: 0.55M and
0.40M on that task) are small enough for CPU runs.

`ReferenceModel` holds one independent model per task (an `nn.ModuleDict`), is called like `UniSTDModel`
(`model(pixel_values=(B,T,C,H,W), task=name, labels=...)` -> `.loss`, `.predictions`), and saves/loads as a
transformers model in safetensors: `build_reference_model("simvp", specs, hid_T=64)`, `model.save_pretrained(d)`,
`load_reference_model(d)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_unistd import TaskSpec, check_extrapolated_tasks
from .modeling_unistd import check_forecast_inputs
from .modules import FrameDecoder, FrameEncoder, forecast_loss, init_weights_
from .motion import residual_base

__all__ = [
    "METHODS",
    "PAPER_SIZE",
    "InceptionUNet",
    "TAUTranslator",
    "SpatioTemporalForecaster",
    "ReferenceConfig",
    "ReferenceModel",
    "ReferenceOutput",
    "build_reference_model",
    "load_reference_model",
]

METHODS = ("simvp", "tau")
# OpenSTL's Moving MNIST configs (SimVP and TAU): hid_S 64, hid_T 512, N_T 8 (N_S 4 = num_downsample 2).
PAPER_SIZE = {"hid_S": 64, "hid_T": 512, "N_T": 8}


def _groups(groups: int, *channels: int) -> int:
    """`groups` if it divides every channel count, else 1 (T*C' need not be a multiple of 8)."""
    return groups if all(c % groups == 0 for c in channels) else 1


# ----------------------------------------------------------------------------------------------------------------
# SimVP: Inception-UNet translator


class GroupConvBlock(nn.Module):
    """Grouped Conv2d(k x k) -> GroupNorm -> LeakyReLU(0.2): one branch of an Inception module.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (padding keeps H' x W').
        groups: conv and GroupNorm groups (falls back to 1 when they do not divide the channels).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        g = _groups(groups, in_channels, out_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=g)
        self.norm = nn.GroupNorm(g, out_channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class InceptionModule(nn.Module):
    """1x1 conv to a bottleneck, then the sum of grouped convs of several kernel sizes (SimVP's translator unit).

    Args:
        in_channels: input channels.
        hidden_channels: bottleneck channels after the 1x1 conv.
        out_channels: output channels.
        kernel_sizes: kernel sizes of the parallel branches (SimVP: 3, 5, 7, 11).
        groups: groups of the branches.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        kernel_sizes: tuple[int, ...] = (3, 5, 7, 11),
        groups: int = 8,
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.branches = nn.ModuleList(
            [GroupConvBlock(hidden_channels, out_channels, k, groups) for k in kernel_sizes]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)  # (B, hidden, H', W')
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)  # (B, out, H', W')


class InceptionUNet(nn.Module):
    """SimVP's translator: N_T Inception modules down, N_T up, the up path concatenating the down path's outputs.

    Works on the T frames' latents stacked as channels, so every layer sees all T*C' channels at once.

    Args:
        in_channels: T*C'.
        hidden_channels: hid_T.
        out_channels: T'*C'.
        depth: N_T (>= 2).
        groups: groups of the Inception branches.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, depth: int, groups: int = 8) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"the Inception-UNet translator needs N_T >= 2, got {depth}")
        half = max(1, hidden_channels // 2)
        self.down = nn.ModuleList(
            [InceptionModule(in_channels if i == 0 else hidden_channels, half, hidden_channels, groups=groups)
             for i in range(depth)]
        )
        up = [InceptionModule(hidden_channels, half, hidden_channels, groups=groups)]
        up += [InceptionModule(2 * hidden_channels, half, hidden_channels, groups=groups) for _ in range(depth - 2)]
        up += [InceptionModule(2 * hidden_channels, half, out_channels, groups=groups)]
        self.up = nn.ModuleList(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, module in enumerate(self.down):  # (B, T*C', H', W') -> (B, hid_T, H', W')
            x = module(x)
            if i < len(self.down) - 1:
                skips.append(x)
        x = self.up[0](x)
        for module in self.up[1:]:  # concatenates the mirrored down output: (B, 2*hid_T, H', W')
            x = module(torch.cat([x, skips.pop()], dim=1))
        return x  # (B, T'*C', H', W')


# ----------------------------------------------------------------------------------------------------------------
# TAU: MetaFormer blocks with Temporal Attention Units


class TemporalAttentionUnit(nn.Module):
    """Static attention (large-kernel, depth-wise) times dynamic attention (channel squeeze-excitation), times x.

    Args:
        channels: channels of the stacked latents (hid_T).
        kernel_size: the large receptive field decomposed into a depth-wise conv, a dilated depth-wise conv and a
            1x1 conv (TAU: 21).
        dilation: dilation of the second depth-wise conv (TAU: 3).
        reduction: squeeze-excitation reduction of the dynamic attention (TAU: 16).
    """

    def __init__(self, channels: int, kernel_size: int = 21, dilation: int = 3, reduction: int = 16) -> None:
        super().__init__()
        dilated = kernel_size // dilation + (kernel_size // dilation) % 2 - 1  # odd kernel of the dilated conv
        local = 2 * dilation - 1
        self.local_conv = nn.Conv2d(channels, channels, local, padding=local // 2, groups=channels)
        self.dilated_conv = nn.Conv2d(
            channels, channels, dilated, padding=dilation * (dilated - 1) // 2, dilation=dilation, groups=channels
        )
        self.point_conv = nn.Conv2d(channels, channels, kernel_size=1)
        squeezed = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.excite = nn.Sequential(
            nn.Linear(channels, squeezed, bias=False), nn.ReLU(), nn.Linear(squeezed, channels, bias=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        static = self.point_conv(self.dilated_conv(self.local_conv(x)))  # (B, C, H', W'): where to look
        dynamic = self.excite(self.pool(x).flatten(1))[:, :, None, None]  # (B, C, 1, 1): which channels (frames)
        return static * dynamic * x


class TAUBlock(nn.Module):
    """MetaFormer block: x + s1 * attention(BN(x)), then x + s2 * MLP(BN(x)); attention = 1x1, GELU, TAU, 1x1.

    Args:
        channels: hid_T.
        mlp_ratio: MLP expansion (1x1 -> depth-wise 3x3 -> GELU -> 1x1).
        layer_scale: initial value of the per-channel residual scales s1, s2.
    """

    def __init__(self, channels: int, mlp_ratio: float = 8.0, layer_scale: float = 1e-2) -> None:
        super().__init__()
        hidden = max(1, int(channels * mlp_ratio))
        self.norm1 = nn.BatchNorm2d(channels)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.act = nn.GELU()
        self.tau = TemporalAttentionUnit(channels)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.norm2 = nn.BatchNorm2d(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.scale1 = nn.Parameter(torch.full((channels, 1, 1), layer_scale))
        self.scale2 = nn.Parameter(torch.full((channels, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y = self.proj_out(self.tau(self.act(self.proj_in(y)))) + y  # the attention branch keeps its own shortcut
        x = x + self.scale1 * y
        return x + self.scale2 * self.mlp(self.norm2(x))  # (B, hid_T, H', W')


class TAUTranslator(nn.Module):
    """1x1 conv T*C' -> hid_T, N_T TAU blocks, 1x1 conv hid_T -> T'*C' (all frames' channels at once).

    Args:
        in_channels: T*C'.
        hidden_channels: hid_T.
        out_channels: T'*C'.
        depth: N_T.
        mlp_ratio: MLP expansion of each block.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, out_channels: int, depth: int, mlp_ratio: float = 8.0
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"the TAU translator needs N_T >= 1, got {depth}")
        self.proj_in = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.blocks = nn.Sequential(*[TAUBlock(hidden_channels, mlp_ratio) for _ in range(depth)])
        self.proj_out = nn.Conv2d(hidden_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.blocks(self.proj_in(x)))  # (B, T*C', H', W') -> (B, T'*C', H', W')


# ----------------------------------------------------------------------------------------------------------------
# One task's model, and the multi-task container


class SpatioTemporalForecaster(nn.Module):
    """Encoder -> translator over the stacked T*C' channels -> decoder with the first-stage skip, for one task.

    Args:
        spec: the task (T, T', C, H, W, num_downsample).
        method: "simvp" (Inception-UNet translator) or "tau" (TAU blocks).
        hid_S: C', channels of the per-frame encoder/decoder.
        hid_T: width of the translator.
        N_T: depth of the translator.
        groups: GroupNorm groups of the encoder/decoder (and Inception branches).
        mlp_ratio: TAU's MLP expansion.
        residual_to_last_frame: predict the change from the last observed frame (as `UniSTDConfig`'s option).
        extrapolated: with a residual, add it to the constant-velocity extrapolation of the last frame instead
            (`motion.extrapolate`, as `UniSTDConfig.extrapolated_tasks`).
    """

    def __init__(
        self,
        spec: TaskSpec,
        method: str,
        hid_S: int = 16,
        hid_T: int = 64,
        N_T: int = 4,
        groups: int = 8,
        mlp_ratio: float = 8.0,
        residual_to_last_frame: bool = False,
        extrapolated: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        T, T_out = spec.in_frames, spec.out_frames
        self.spec, self.hid_S, self.residual_to_last_frame = spec, hid_S, residual_to_last_frame
        self.extrapolated = extrapolated
        self.encoder = FrameEncoder(spec.channels, hid_S, spec.num_downsample, groups)
        if method == "simvp":
            self.translator: nn.Module = InceptionUNet(T * hid_S, hid_T, T_out * hid_S, N_T, groups)
        else:
            self.translator = TAUTranslator(T * hid_S, hid_T, T_out * hid_S, N_T, mlp_ratio)
        self.decoder = FrameDecoder(
            hid_S, spec.channels, spec.num_downsample, groups, zero_head=residual_to_last_frame,
            in_frames=T, out_frames=T_out,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, T, C, H, W = pixel_values.shape
        T_out, (Hp, Wp), Cp = self.spec.out_frames, self.spec.token_grid, self.hid_S
        latent, first = self.encoder(pixel_values.flatten(0, 1))  # (B*T, C', H', W'), (B*T, C', H, W)
        z = self.translator(latent.reshape(B, T * Cp, Hp, Wp))  # (B, T'*C', H', W')
        frames = self.decoder(z.reshape(B * T_out, Cp, Hp, Wp), first.view(B, T, Cp, H, W))  # (B*T', C, H, W)
        predictions = frames.view(B, T_out, C, H, W)
        if self.residual_to_last_frame:
            predictions = predictions + residual_base(pixel_values, T_out, self.extrapolated).to(predictions.dtype)
        return predictions  # (B, T', C, H, W)


class ReferenceConfig(PretrainedConfig):
    """Configuration of `ReferenceModel`.

    Args:
        method: "simvp" or "tau".
        tasks: the task specs (`TaskSpec` or dicts); one independent model per task.
        hid_S: C', channels of the per-frame encoder/decoder (paper size 64).
        hid_T: width of the translator (paper size 512).
        N_T: depth of the translator (paper size 8).
        group_norm_groups: GroupNorm groups (must divide hid_S).
        mlp_ratio: TAU's MLP expansion.
        residual_to_last_frame: predict the change from the last observed frame.
        extrapolated_tasks: tasks whose residual starts from the last frame's constant-velocity extrapolation
            (as `UniSTDConfig.extrapolated_tasks`; needs residual_to_last_frame).
        loss_l1_weight: weight of the L1 term of the loss (as `UniSTDConfig.loss_l1_weight`).
        loss_gdl_weight: weight of the gradient difference term of the loss (as `UniSTDConfig.loss_gdl_weight`).
    """

    model_type = "unistd_reference"

    def __init__(
        self,
        method: str = "simvp",
        tasks: list[TaskSpec | dict] | None = None,
        hid_S: int = 16,
        hid_T: int = 64,
        N_T: int = 4,
        group_norm_groups: int = 8,
        mlp_ratio: float = 8.0,
        residual_to_last_frame: bool = False,
        extrapolated_tasks: list[str] | None = None,
        loss_l1_weight: float = 0.0,
        loss_gdl_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        specs = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in (tasks or [])]
        names = [t.name for t in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if hid_S < 1 or hid_S % group_norm_groups:
            raise ValueError(f"hid_S ({hid_S}) must be a positive multiple of group_norm_groups ({group_norm_groups})")
        if hid_T < 1:
            raise ValueError(f"hid_T must be >= 1, got {hid_T}")
        if N_T < (2 if method == "simvp" else 1):
            raise ValueError(f"N_T must be >= {2 if method == 'simvp' else 1} for {method}, got {N_T}")
        for name, weight in (("loss_l1_weight", loss_l1_weight), ("loss_gdl_weight", loss_gdl_weight)):
            if not weight >= 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        self.method = method
        self.tasks = [t.to_dict() for t in specs]
        self.hid_S, self.hid_T, self.N_T = hid_S, hid_T, N_T
        self.group_norm_groups = group_norm_groups
        self.mlp_ratio = float(mlp_ratio)
        self.residual_to_last_frame = residual_to_last_frame
        self.extrapolated_tasks = check_extrapolated_tasks(extrapolated_tasks, names, residual_to_last_frame)
        self.loss_l1_weight = float(loss_l1_weight)
        self.loss_gdl_weight = float(loss_gdl_weight)
        super().__init__(**kwargs)

    @property
    def task_specs(self) -> dict[str, TaskSpec]:
        """Task name -> `TaskSpec`, in config order."""
        return {t["name"]: TaskSpec.from_dict(t) for t in self.tasks}


@dataclass
class ReferenceOutput(ModelOutput):
    """Output of `ReferenceModel.forward`: `loss` (as UniSTD's) when labels are given, and `predictions`."""

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


class ReferenceModel(PreTrainedModel):
    """SimVP or TAU, one independent model per task, called like `UniSTDModel`.

    Args:
        config: a `ReferenceConfig`.
    """

    config_class = ReferenceConfig
    config: ReferenceConfig
    base_model_prefix = "reference"
    main_input_name = "pixel_values"
    check_input_values: bool = True  # as UniSTDModel: the training loop turns the host-syncing value checks off

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__(config)
        self.task_specs: dict[str, TaskSpec] = config.task_specs
        if not self.task_specs:
            raise ValueError("ReferenceConfig.tasks is empty; give at least one TaskSpec")
        bad = [name for name in self.task_specs if "." in name]
        if bad:
            raise ValueError(f"task names are module names and cannot contain '.', got {bad}")
        self.models = nn.ModuleDict(
            {
                name: SpatioTemporalForecaster(
                    spec, config.method, config.hid_S, config.hid_T, config.N_T, config.group_norm_groups,
                    config.mlp_ratio, config.residual_to_last_frame, name in config.extrapolated_tasks,
                )
                for name, spec in self.task_specs.items()
            }
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """UniSTD's init rule (`modules.init_weights_`) for convs, linears and GroupNorms; BatchNorm to (1, 0)."""
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            init_weights_(module)

    def forward(
        self, pixel_values: torch.Tensor, task: str, labels: torch.Tensor | None = None, return_dict: bool = True
    ) -> ReferenceOutput | tuple:
        """Forecast T' frames of `task` from T observed frames (same arguments and checks as `UniSTDModel`)."""
        check_forecast_inputs(self.task_specs, pixel_values, task, labels, self.check_input_values)
        model = self.models[task]
        predictions = model(pixel_values.to(next(model.parameters()).dtype))  # (B, T', C, H, W)
        loss = None
        if labels is not None:
            loss = forecast_loss(predictions, labels, self.config.loss_l1_weight, self.config.loss_gdl_weight)
        output = ReferenceOutput(loss=loss, predictions=predictions)
        return output if return_dict else output.to_tuple()


def build_reference_model(method: str, specs: list[TaskSpec], **sizes: Any) -> ReferenceModel:
    """A fresh SimVP or TAU `ReferenceModel` for `specs`; `sizes` are `ReferenceConfig` fields (hid_S, hid_T, N_T,
    group_norm_groups, mlp_ratio, residual_to_last_frame, extrapolated_tasks, loss_l1_weight, loss_gdl_weight),
    e.g. `**PAPER_SIZE`."""
    return ReferenceModel(ReferenceConfig(method=method, tasks=list(specs), **sizes))


def load_reference_model(directory: str | Path, **kwargs: Any) -> ReferenceModel:
    """Reload a `ReferenceModel` written by `save_pretrained(directory)` (config.json + model.safetensors)."""
    return ReferenceModel.from_pretrained(str(directory), use_safetensors=True, **kwargs)
