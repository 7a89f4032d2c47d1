"""Configuration of UniSTD: the task specs and the model config (a transformers `PretrainedConfig`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from transformers import CLIPVisionConfig, PretrainedConfig

__all__ = ["TaskSpec", "UniSTDConfig", "GATE_MODES", "check_extrapolated_tasks"]

GATE_MODES = ("scaled", "additive")


@dataclass(frozen=True)
class TaskSpec:
    """Shape and meaning of one forecasting task.

    Args:
        name: registry name of the task, the `task=` argument of `UniSTDModel.forward`.
        in_frames: T, the number of observed frames.
        out_frames: T', the number of frames to predict.
        channels: C, channels per frame (1 for radar, 2 for in/out flows, 3 for RGB).
        height: H of a frame in pixels.
        width: W of a frame in pixels.
        num_downsample: number of stride-2 encoder blocks; tokens are H/2^n x W/2^n.
        value_range: range of the raw physical values before the loader maps them to [0, 1].
        discipline: free text ("trajectory", "traffic", "weather", "driving", ...), for reports.
    """

    name: str
    in_frames: int
    out_frames: int
    channels: int
    height: int
    width: int
    num_downsample: int = 2
    value_range: tuple[float, float] = (0.0, 1.0)
    discipline: str = "generic"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"TaskSpec.name must be a non-empty string, got {self.name!r}")
        for attr in ("in_frames", "out_frames", "channels", "height", "width"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TaskSpec {self.name!r}: {attr} must be a positive int, got {value!r}")
        if not isinstance(self.num_downsample, int) or self.num_downsample < 0:
            raise ValueError(f"TaskSpec {self.name!r}: num_downsample must be an int >= 0, got {self.num_downsample!r}")
        factor = 2**self.num_downsample
        if self.height % factor or self.width % factor:
            raise ValueError(
                f"TaskSpec {self.name!r}: height and width ({self.height}x{self.width}) must be divisible by "
                f"2**num_downsample = {factor}"
            )
        low, high = self.value_range
        if not low < high:
            raise ValueError(f"TaskSpec {self.name!r}: value_range must be (low, high) with low < high, got {self.value_range!r}")
        object.__setattr__(self, "value_range", (float(low), float(high)))

    @property
    def token_grid(self) -> tuple[int, int]:
        """(H', W'): the token grid after the encoder."""
        factor = 2**self.num_downsample
        return self.height // factor, self.width // factor

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.in_frames, self.channels, self.height, self.width)

    @property
    def target_shape(self) -> tuple[int, int, int, int]:
        return (self.out_frames, self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["value_range"] = list(self.value_range)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TaskSpec field(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        data = dict(data)
        if "value_range" in data:
            data["value_range"] = tuple(data["value_range"])
        return cls(**data)


def check_extrapolated_tasks(tasks: list[str] | None, names: list[str], residual: bool) -> list[str]:
    """`tasks` as a list, or a ValueError naming what was expected (task names of the config, with a residual)."""
    tasks = list(tasks or [])
    unknown = sorted(set(tasks) - set(names))
    if unknown:
        raise ValueError(f"extrapolated_tasks {unknown} are not tasks of this config; expected a subset of {names}")
    if tasks and not residual:
        raise ValueError("extrapolated_tasks replaces the last frame as the residual's base, so it needs "
                         "residual_to_last_frame=True")
    return tasks


def _as_json(data: dict) -> dict:
    """The dict as it reads back from config.json (int keys of id2label become str): round trips compare equal."""
    return json.loads(json.dumps(data))


class UniSTDConfig(PretrainedConfig):
    """Configuration of `UniSTDModel`.

    Args:
        backbone: a `CLIPVisionConfig` (or its dict) for a randomly initialised backbone, or a hub id /
            local directory of a CLIP checkpoint (vision-only or full CLIP) loaded with `from_pretrained`.
        tasks: the task specs (`TaskSpec` or dicts); one encoder/decoder pair is built per task.
        hidden_channels: C', the channels of the per-frame conv encoder.
        temporal_reduction: the down ratio of the temporal adapter's FFN (paper: 6).
        temporal_gate: "scaled" (`x * 2*sigmoid(o)`, an exact identity at init) or "additive"
            (the paper's literal `x + sigmoid(o)`).
        use_temporal_adapter: False removes the temporal adapters (ablation).
        use_backbone: False skips the shared Transformer (and with it the temporal adapters and any adapter on
            it): the input projection's tokens go straight to the output projection. A control for studies (does
            the shared part earn its cost?); the backbone is still built, as it sets the token width D.
        freeze_backbone: keep the backbone's weights frozen (the paper's setting).
        group_norm_groups: groups of the encoder/decoder GroupNorm (must divide hidden_channels).
        residual_to_last_frame: predict the change from the last observed frame (predictions = last frame +
            decoder output). Off in the paper; it keeps fine detail that the downsampling encoder loses, which
            matters for slowly changing fields (traffic, weather) and short training runs.
        extrapolated_tasks: tasks whose residual starts from a constant-velocity extrapolation of the last frame
            (`motion.extrapolate`: block-matching velocity between the last two frames, the last frame moved along it)
            instead of the still last frame; needs `residual_to_last_frame`. For content that moves (digits, rain
            cells) the decoder then learns corrections to a forecast that already moves, and digits keep their shape
            where a still base made blurring them away the cheaper answer (docs/RESULTS.md, default run).
        decoder_skip: give each task decoder SimVP's full-resolution skip: the first encoder stage's features
            (mapped from the T observed to the T' predicted frames by `modules.SkipTimeMap`) are added to the input
            of the decoder's last stage, so fine detail need not pass through the H' x W' tokens.
        loss_l1_weight: weight of an L1 term added to the MSE training loss (`modules.forecast_loss`); 0 is the
            paper's plain MSE. The L1 term keeps the background exact and edges sharp where MSE alone settles on a
            blurred mean (moving_digits, 256 batches: SSIM 0.62 against copy-last-frame's 0.57; MSE alone after 128
            batches: 0.24), but under uncertainty its minimum is "nothing there": far-ahead digits fade.
        loss_gdl_weight: weight of a gradient difference term (Mathieu et al. 2016; `modules.image_gradient_difference`)
            added to the training loss: it asks for spatial edges as strong as the target's; 0 leaves it out.
            Measured on moving_digits (256 batches, one seed): with L1 it moved SSIM 0.619 -> 0.632 but PSNR
            13.91 -> 13.38; alone (with MSE) it kept the grey halo (SSIM 0.07). Neither stops digits fading.
        task_adapters: {task: [peft adapter names]}: adapters active only for that task, besides the model's main
            adapter ("default"). Written by `add_tasks_to_unistd_peft_model(..., new_experts=K)`, which gives a task
            added later experts of its own; empty: every adapter serves every task.
        pretrained_backbone_config: the `CLIPVisionConfig` dict of a pretrained `backbone`; `UniSTDModel` fills it
            in when it loads the checkpoint, so that `UniSTDModel.from_pretrained` of a saved model rebuilds the
            backbone's architecture without the original checkpoint, and a later load can check that the checkpoint
            still matches. None for a config-dict backbone (the dict already is the architecture).
    """

    model_type = "unistd"

    def __init__(
        self,
        backbone: str | dict | CLIPVisionConfig | None = None,
        tasks: list[TaskSpec | dict] | None = None,
        hidden_channels: int = 64,
        temporal_reduction: int = 6,
        temporal_gate: str = "scaled",
        use_temporal_adapter: bool = True,
        use_backbone: bool = True,
        freeze_backbone: bool = True,
        group_norm_groups: int = 8,
        residual_to_last_frame: bool = False,
        extrapolated_tasks: list[str] | None = None,
        decoder_skip: bool = True,
        loss_l1_weight: float = 0.0,
        loss_gdl_weight: float = 0.0,
        task_adapters: dict[str, list[str]] | None = None,
        pretrained_backbone_config: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if backbone is None:
            backbone = CLIPVisionConfig().to_dict()
        elif isinstance(backbone, CLIPVisionConfig):
            backbone = backbone.to_dict()
        elif not isinstance(backbone, (str, dict)):
            raise ValueError(f"backbone must be a CLIPVisionConfig, a dict or a hub id / path, got {type(backbone).__name__}")
        if isinstance(backbone, dict):
            backbone = _as_json(backbone)
        self.backbone = backbone
        specs = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in (tasks or [])]
        names = [t.name for t in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.tasks = [t.to_dict() for t in specs]
        if hidden_channels < 1 or hidden_channels % group_norm_groups:
            raise ValueError(
                f"hidden_channels ({hidden_channels}) must be a positive multiple of group_norm_groups ({group_norm_groups})"
            )
        if temporal_reduction < 1:
            raise ValueError(f"temporal_reduction must be >= 1, got {temporal_reduction}")
        if temporal_gate not in GATE_MODES:
            raise ValueError(f"temporal_gate must be one of {GATE_MODES}, got {temporal_gate!r}")
        self.hidden_channels = hidden_channels
        self.temporal_reduction = temporal_reduction
        self.temporal_gate = temporal_gate
        self.use_temporal_adapter = use_temporal_adapter
        self.use_backbone = use_backbone
        self.freeze_backbone = freeze_backbone
        self.residual_to_last_frame = residual_to_last_frame
        self.extrapolated_tasks = check_extrapolated_tasks(extrapolated_tasks, names, residual_to_last_frame)
        for name, weight in (("loss_l1_weight", loss_l1_weight), ("loss_gdl_weight", loss_gdl_weight)):
            if not weight >= 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        self.decoder_skip = decoder_skip
        self.loss_l1_weight = float(loss_l1_weight)
        self.loss_gdl_weight = float(loss_gdl_weight)
        self.group_norm_groups = group_norm_groups
        self.task_adapters = {task: list(names) for task, names in (task_adapters or {}).items()}
        if isinstance(pretrained_backbone_config, CLIPVisionConfig):
            pretrained_backbone_config = pretrained_backbone_config.to_dict()
        if pretrained_backbone_config is not None and not isinstance(pretrained_backbone_config, dict):
            raise ValueError(
                f"pretrained_backbone_config must be a dict or None, got {type(pretrained_backbone_config).__name__}"
            )
        if pretrained_backbone_config is not None:
            pretrained_backbone_config = _as_json(pretrained_backbone_config)
        self.pretrained_backbone_config = pretrained_backbone_config
        super().__init__(**kwargs)

    @property
    def task_specs(self) -> dict[str, TaskSpec]:
        """Task name -> `TaskSpec`, in config order."""
        return {t["name"]: TaskSpec.from_dict(t) for t in self.tasks}

    @property
    def backbone_is_pretrained(self) -> bool:
        return isinstance(self.backbone, str)
