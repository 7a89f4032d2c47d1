"""RankMoE tuner layer: E LoRA experts with continuous ranks and a router around an `nn.Linear` or a GPT-2 `Conv1D`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import RankMoEConfig
from .functional import MixtureOfExperts, fractional_rank_mask, hard_rank_mask, route

__all__ = ["RankMoELayer", "Linear", "ExpertSettings", "ADAPTABLE_LAYERS", "FUSE_MIN_INPUT", "layer_features"]

ADAPTABLE_LAYERS = (nn.Linear, Conv1D)
# Inputs with at least this many numbers run router and experts as one matmul in training (measured on CPU: fusing
# saves ~5% of a ViT-B-shaped layer's step, 512 x 768 inputs, and costs ~7% on a width-32 layer, 32 x 32 inputs).
FUSE_MIN_INPUT = 2**14


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a layer RankMoE can adapt.

    transformers' `Conv1D` (GPT-2) stores its weight as (in, out) and computes `x @ W + b`: LoRA's
    `fan_in_fan_out` case. The layout only matters for merging into the weight, which RankMoE never does, so it is
    read from the module type and needs no config option."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise ValueError(
        f"RankMoE adapts nn.Linear and transformers' Conv1D layers only, got {type(layer).__name__}"
    )


@dataclass(frozen=True)
class ExpertSettings:
    """The non-tensor settings of one adapter on one layer."""

    num_experts: int
    max_rank: int  # R of the config: the scaling denominator, also after truncation
    router: str
    top_k: int | None
    rank_grad_scale: float


class RankMoELayer(BaseTunerLayer):
    """Mixin holding, per adapter name, the stacked experts, their ranks and the router.

    Tensors (all keyed by adapter name):
        rankmoe_A: (E, in, R) down projections, initialised like LoRA's A.
        rankmoe_B: (E, R, out) up projections, zero with `init_weights=True`.
        rankmoe_rank: (E,) continuous ranks in [0, max_rank], always float32.
        rankmoe_router: nn.Linear(in, E).
    R is `max_rank`, or after `discretize_ranks()` + reload the layer's largest integer rank.
    """

    adapter_layer_names = ("rankmoe_A", "rankmoe_B", "rankmoe_rank", "rankmoe_router")
    other_param_names = (
        "scaling", "rankmoe_settings", "rankmoe_dropout", "rank_frozen", "_inference_cache", "_hard_mask_cache"
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.rankmoe_A = nn.ParameterDict({})
        self.rankmoe_B = nn.ParameterDict({})
        self.rankmoe_rank = nn.ParameterDict({})
        self.rankmoe_router = nn.ModuleDict({})
        self.rankmoe_dropout = nn.ModuleDict({})
        self.scaling: dict[str, float] = {}
        self.rankmoe_settings: dict[str, ExpertSettings] = {}
        self.rank_frozen: dict[str, bool] = {}
        self._inference_cache: dict[str, tuple] = {}  # not a buffer: never saved
        self._hard_mask_cache: dict[str, tuple] = {}  # discretized ranks are frozen: their column scale is reused
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.in_features, self.out_features = layer_features(base)
        self.fan_in_fan_out = isinstance(base, Conv1D)  # weight stored (in, out), as LoRA's flag says

    def update_layer(
        self,
        adapter_name: str,
        config: RankMoEConfig,
        num_experts: int,
        fixed_ranks: list[int] | None = None,
    ) -> None:
        """Create the tensors of one adapter. `fixed_ranks`: integer ranks of a discretized adapter being loaded."""
        if fixed_ranks is not None and len(fixed_ranks) != num_experts:
            raise ValueError(
                f"rank_pattern holds {len(fixed_ranks)} ranks for a layer with {num_experts} experts; "
                "the adapter was saved for another model or config"
            )
        columns = config.max_rank if fixed_ranks is None else max(max(fixed_ranks), 1)
        weight = self.get_base_layer().weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.dtype.is_floating_point else None}
        self.rankmoe_A[adapter_name] = nn.Parameter(torch.empty(num_experts, self.in_features, columns, **factory))
        self.rankmoe_B[adapter_name] = nn.Parameter(torch.empty(num_experts, columns, self.out_features, **factory))
        ranks = torch.full((num_experts,), float(config.init_rank)) if fixed_ranks is None else torch.tensor(
            [float(r) for r in fixed_ranks]
        )
        self.rankmoe_rank[adapter_name] = nn.Parameter(ranks.to(device=weight.device, dtype=torch.float32))
        self.rankmoe_router[adapter_name] = nn.Linear(self.in_features, num_experts, **factory)
        self.rankmoe_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[adapter_name] = config.lora_alpha / config.max_rank
        self.rankmoe_settings[adapter_name] = ExpertSettings(
            num_experts, config.max_rank, config.router, config.top_k, config.rank_grad_scale
        )
        self.rank_frozen[adapter_name] = fixed_ranks is not None
        self.reset_rankmoe_parameters(adapter_name, config.init_weights, config.init_rank)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_rankmoe_parameters(self, adapter_name: str, init_weights: bool, init_rank: float) -> None:
        A, B = self.rankmoe_A[adapter_name], self.rankmoe_B[adapter_name]
        bound = 1.0 / math.sqrt(self.in_features)  # LoRA's A: kaiming_uniform(a=sqrt(5)) on fan_in = in_features
        nn.init.uniform_(A, -bound, bound)
        if init_weights:
            nn.init.zeros_(B)
            return
        # A non-trivial start: every check (save/load, disable, gradients) then sees a real adapter output.
        nn.init.uniform_(B, -bound, bound)
        router = self.rankmoe_router[adapter_name]
        nn.init.normal_(router.weight, std=1.0)
        nn.init.normal_(router.bias, std=1.0)
        if not self.rank_frozen[adapter_name]:
            rank = self.rankmoe_rank[adapter_name]
            max_rank = self.rankmoe_settings[adapter_name].max_rank
            offsets = torch.linspace(-1.3, 1.3, rank.numel(), device=rank.device)  # distinct fractional ranks
            rank.copy_((init_rank + offsets).clamp(0.0, max_rank))

    # --- peft bookkeeping ------------------------------------------------------------------------------------------

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        rank = self.rankmoe_rank[adapter_name]
        if rank.dtype != torch.float32:  # SGD steps of ~1e-3 on a rank of ~4 vanish in bf16
            self.rankmoe_rank[adapter_name] = nn.Parameter(rank.float(), requires_grad=rank.requires_grad)

    def freeze_discretized_ranks(self) -> None:
        """peft turns gradients back on for every adapter tensor in several places; frozen ranks stay frozen."""
        for name, frozen in self.rank_frozen.items():
            if frozen and name in self.rankmoe_rank:
                self.rankmoe_rank[name].requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.freeze_discretized_ranks()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self.freeze_discretized_ranks()

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:  # peft >= 0.20 calls this hook
        self.freeze_discretized_ranks()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "RankMoE adapters cannot be merged into the base weights: the router's expert weights depend on each "
            "input, so no single weight update reproduces the adapter. Keep the PeftModel for inference."
        )

    def unmerge(self) -> None:
        """Nothing can be merged (see `merge`), so there is nothing to undo."""
        self.merged_adapters = []

    # --- the math ----------------------------------------------------------------------------------------------------

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None = None) -> torch.Tensor:
        """scaling * sum_e gate_e(x) * (x @ A_e) * mask_e @ B_e, for x (..., in) -> (..., out); with `result` (the
        base output, in A's dtype) the delta is added into it by the last matmul.

        Training: one autograd node, `functional.MixtureOfExperts` (forward and backward written out; for inputs of
        at least `FUSE_MIN_INPUT` numbers the router shares the experts' matmuls). With active dropout the
        experts see the dropped input and the router the clean one, and plain autograd runs the same math
        (`_dropout_delta`). Without autograd, only the columns a rank keeps are computed, from a cache
        (`_inference_delta`).
        """
        A = self.rankmoe_A[adapter_name]  # (E, in, R)
        x = self._cast_input_dtype(x, A.dtype)
        dropout = self.rankmoe_dropout[adapter_name]
        if self.training and isinstance(dropout, nn.Dropout):
            delta = self._dropout_delta(adapter_name, x, dropout)
            return delta if result is None else result + delta
        if not torch.is_grad_enabled():
            return self._inference_delta(adapter_name, x, result)
        return self._mixture(adapter_name, x, result)

    def _mixture(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None,
                 base: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """`result + adapter_delta(x)` (the delta alone for result None) through `functional.MixtureOfExperts`;
        with `base` = (weight, bias) of the frozen base layer (see `Linear.folded_base`) the node computes the base
        layer's output itself. Written for per-call overhead: at small widths every lookup, call, view and autograd
        node shows in the step: before they were trimmed (one C call for autocast, no property reads), this method and
        `Linear.folded_base` took ~0.1 of the tiny benchmark's 1.5x LoRA, against a forward that only calls the node;
        about 0.05 remains.

        Under autocast the node runs in the autocast dtype, with its inputs cast outside it (autograd carries the
        gradients back to the float32 parameters), so its backward meets the dtypes its forward saw."""
        modules, settings = self._modules, self.rankmoe_settings[adapter_name]
        # read from the modules' own dicts: a ParameterDict or ModuleDict lookup costs ~1.5 us
        router = modules["rankmoe_router"]._modules[adapter_name]._parameters
        A, B = modules["rankmoe_A"]._parameters[adapter_name], modules["rankmoe_B"]._parameters[adapter_name]
        weight, bias, rank = router["weight"], router["bias"], modules["rankmoe_rank"]._parameters[adapter_name]
        per_sequence = settings.router == "sequence" and x.dim() >= 3
        column_scale = self.column_scale(adapter_name) if self.rank_frozen[adapter_name] else None  # None: inside
        options = (self.scaling[adapter_name], settings.rank_grad_scale, x.shape[0] if per_sequence else None,
                   settings.top_k, not per_sequence and x.numel() >= FUSE_MIN_INPUT, base)
        autocast = _any_autocast_enabled() and torch.is_autocast_enabled(x.device.type)
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
            x, A, B, weight, bias = (t.to(dtype) for t in (x, A, B, weight, bias))
            result = None if result is None else result.to(dtype)
        if result is None and base is None:
            result = x.new_zeros(*x.shape[:-1], B.shape[-1])
        # Function.apply's Python wrapper costs ~8 us a call (functorch bookkeeping): run only under vmap, grad & co.
        apply = MixtureOfExperts.apply if torch._C._are_functorch_transforms_active() else _FUNCTION_APPLY
        if not autocast:
            return apply(result, x, A, B, weight, bias, rank, column_scale, options)  # (..., out)
        with torch.autocast(x.device.type, enabled=False):
            return apply(result, x, A, B, weight, bias, rank, column_scale, options)

    def column_scale(self, adapter_name: str) -> torch.Tensor:
        """(E, R) rank mask times the LoRA scaling, in A's dtype: the soft mask of the searched ranks (differentiable
        by the rule of `FractionalRankMask`), or the hard 0/1 mask of discretized ranks (cached: they are frozen)."""
        rank, A = self.rankmoe_rank[adapter_name], self.rankmoe_A[adapter_name]
        scaling, columns = self.scaling[adapter_name], A.shape[-1]
        if not self.rank_frozen[adapter_name]:
            mask = fractional_rank_mask(rank, columns, self.rankmoe_settings[adapter_name].rank_grad_scale)
            return (mask * scaling).to(A.dtype)
        key = (rank._version, rank.data_ptr(), columns, A.dtype)
        cached = self._hard_mask_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, (hard_rank_mask(rank, columns) * scaling).to(A.dtype))
            self._hard_mask_cache[adapter_name] = cached
        return cached[1]

    def expert_gates(self, adapter_name: str, logits: torch.Tensor, overwrite_logits: bool = False) -> torch.Tensor:
        """Router weights (..., E) from per-token router logits (..., E). The sequence router averages the logits
        over each sequence's tokens, which equals routing its mean token (the router is linear); a 2-D input is
        one token per sample and is never averaged across the batch. Gates never hold denormal floats (see
        `rankmoe_peft.functional.route`, also for `overwrite_logits`)."""
        settings = self.rankmoe_settings[adapter_name]
        if settings.router == "sequence" and logits.dim() >= 3:
            pooled = logits.flatten(1, -2).mean(dim=1)  # (B, E): one routing decision per sequence
            logits = pooled.view(logits.shape[0], *([1] * (logits.dim() - 2)), -1)  # (B, 1.., E)
        return route(logits, settings.top_k, overwrite_logits=overwrite_logits)

    def _dropout_delta(self, adapter_name: str, x: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
        """The training path with active dropout, through plain autograd: experts on the dropped input, router on
        the clean one."""
        A, B = self.rankmoe_A[adapter_name], self.rankmoe_B[adapter_name]  # (E, in, R), (E, R, out)
        router = self.rankmoe_router[adapter_name]
        num_experts, _, columns = A.shape
        column_scale = self.column_scale(adapter_name)  # (E, R)
        A_columns = (A.transpose(1, 2) * column_scale.unsqueeze(-1)).reshape(num_experts * columns, -1)  # (E*R, in)
        hidden = F.linear(dropout(x), A_columns)  # (..., E*R)
        gates = self.expert_gates(adapter_name, F.linear(x, router.weight, router.bias), overwrite_logits=True)
        gated = (hidden.unflatten(-1, (num_experts, columns)) * gates.unsqueeze(-1)).flatten(-2)  # (..., E*R)
        return torch.matmul(gated, B.reshape(num_experts * columns, -1))  # (..., out)

    def _inference_delta(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None = None,
                         owns_result: bool = False) -> torch.Tensor:
        """The same delta from the cached active columns: one matmul (with the router bias) gives the K kept
        columns of all experts and the E router logits; the last matmul adds into `result` when given, in place
        when the caller made `result` itself (`owns_result`; an out-of-place addmm first copies it)."""
        fused, bias, expert_of_column, B_active = self._active_columns(adapter_name)
        kept = expert_of_column.numel()
        hidden, logits = F.linear(x, fused, bias).split([kept, fused.shape[0] - kept], dim=-1)  # (..., K), (..., E)
        gates = self.expert_gates(adapter_name, logits, overwrite_logits=True)  # (..., E); logits: a view of ours
        mixed = hidden * gates.index_select(-1, expert_of_column)  # (..., K)
        if result is None:
            return torch.matmul(mixed, B_active)  # (..., out)
        # (N, K) with N given: with every rank 0 (K = 0) it cannot be inferred from 0 elements; N = 1 for a 1-D x
        mixed = mixed.reshape(mixed.shape[:-1].numel(), kept)
        if owns_result:
            return result.view(-1, result.shape[-1]).addmm_(mixed, B_active).view(result.shape)
        return torch.addmm(result.reshape(-1, result.shape[-1]), mixed, B_active).view(result.shape)

    def _active_columns(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """[A restricted to the columns with a non-zero mask | router weight] as a (K+E, in) weight, its bias
        [0 | router bias] (K+E,), the expert of each kept column (K,) and B's kept rows with mask and scaling
        folded in (K, out); cached until a factor, the router or a rank changes (tracked by their in-place version
        counters)."""
        A, B, rank = self.rankmoe_A[adapter_name], self.rankmoe_B[adapter_name], self.rankmoe_rank[adapter_name]
        router = self.rankmoe_router[adapter_name]
        tensors = (A, B, rank, router.weight, router.bias)
        key = tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)
        cached = self._inference_cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            num_experts, _, columns = A.shape
            mask = self.column_scale(adapter_name).flatten()  # (E*R,)
            active = mask.nonzero().squeeze(1)  # (K,)
            A_active = A.transpose(1, 2).reshape(num_experts * columns, -1).index_select(0, active)  # (K, in)
            fused = torch.cat([A_active, router.weight.to(A.dtype)], dim=0)  # (K+E, in)
            bias = torch.cat([A.new_zeros(active.numel()), router.bias.to(A.dtype)])  # (K+E,)
            B_active = B.reshape(num_experts * columns, -1).index_select(0, active) * mask[active, None].to(B.dtype)
            expert_of_column = torch.div(active, columns, rounding_mode="floor")  # (K,)
        entry = (fused, bias, expert_of_column, B_active)
        self._inference_cache[adapter_name] = (key, entry)
        return entry


class Linear(nn.Module, RankMoELayer):
    """An `nn.Linear` (or GPT-2 `Conv1D`) with RankMoE adapters: `y = base(x) + sum over active adapters of
    adapter_delta(x)`."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: RankMoEConfig,
        num_experts: int,
        fixed_ranks: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        RankMoELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts, fixed_ranks)
        self.register_state_dict_post_hook(_truncate_discretized_state)
        self.register_load_state_dict_pre_hook(_pad_truncated_state)

    def folded_base(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[str, tuple] | None:
        """(adapter name, (weight, bias) of the base layer) when this call may compute the base layer itself, else
        None: a plain, frozen `nn.Linear` without hooks, one active adapter, no dropout, no autocast, one dtype.
        Training then runs base layer and adapter as one autograd node (the step loses the base layer's own nodes,
        ~3% of a width-32 step); inference adds the adapter into the base output in place (no copy of it, which no
        hook can have seen). Outputs and gradients are the same. Written with direct dict reads, cheapest checks
        first: it runs on every call."""
        if args or kwargs or self._disable_adapters or _any_autocast_enabled():
            return None
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear:
            return None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if weight.requires_grad or (bias is not None and bias.requires_grad) or weight.dtype != x.dtype:
            return None
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
            return None
        hooks = torch.nn.modules.module  # hooks registered for all modules: the base layer must run as a module
        if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks):
            return None
        name = self._active_adapter  # peft's `active_adapters` property would build a list
        if type(name) is not str:
            if len(name) != 1:
                return None
            name = name[0]
        A = self._modules["rankmoe_A"]._parameters.get(name)
        if A is None or A.dtype != x.dtype:
            return None
        if self.training and isinstance(self._modules["rankmoe_dropout"]._modules[name], nn.Dropout):
            return None
        return name, (weight, bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        folded = self.folded_base(x, *args, **kwargs)
        if folded is not None:
            name, base = folded
            if torch.is_grad_enabled():
                return self._mixture(name, x, None, base=base)
            return self._inference_delta(name, x, F.linear(x, *base), owns_result=True)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        factors = self.rankmoe_A
        for name in self.active_adapters:
            if name not in factors:
                continue
            if result.dtype == factors[name].dtype:  # the adapter's last matmul adds into result
                result = self.adapter_delta(name, x, result)
            else:
                result = result + self.adapter_delta(name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "rankmoe." + super().__repr__()


_FUNCTION_APPLY = super(torch.autograd.Function, MixtureOfExperts).apply  # `MixtureOfExperts.apply`, no wrapper
# whether autocast is on for any device, one C call (torch.is_autocast_enabled(x.device.type) makes a device object)
_any_autocast_enabled = torch._C._is_any_autocast_enabled


def _truncate_discretized_state(module: Linear, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Save A and B of a discretized adapter only up to the layer's largest integer rank (the adapter shrinks)."""
    for name, frozen in module.rank_frozen.items():
        if not frozen:
            continue
        keep = max(int(module.rankmoe_rank[name].detach().round().max().item()), 1)
        for key in (f"{prefix}rankmoe_A.{name}", f"{prefix}rankmoe_B.{name}"):
            if key not in state_dict:
                continue
            tensor = state_dict[key]
            kept = tensor[..., :keep] if key.startswith(f"{prefix}rankmoe_A.") else tensor[:, :keep, :]
            state_dict[key] = kept.contiguous()  # safetensors refuses views


def _pad_truncated_state(module: Linear, state_dict: dict, prefix: str, *args: Any) -> None:
    """Inverse of `_truncate_discretized_state`, and a clear error for factors saved for another shape."""
    for name in module.rankmoe_A:
        for attr in ("rankmoe_A", "rankmoe_B"):
            key = f"{prefix}{attr}.{name}"
            if key not in state_dict:
                continue
            expected = getattr(module, attr)[name].shape
            found = state_dict[key].shape
            rank_dim = 2 if attr == "rankmoe_A" else 1
            other_dims_match = len(found) == 3 and all(found[d] == expected[d] for d in range(3) if d != rank_dim)
            if not other_dims_match or found[rank_dim] > expected[rank_dim]:
                raise ValueError(
                    f"cannot load {key}: the checkpoint holds shape {tuple(found)}, this model expects "
                    f"{tuple(expected)} (experts, in, rank) / (experts, rank, out); the adapter was saved for a "
                    "different model, target module or RankMoEConfig"
                )
            missing = expected[rank_dim] - found[rank_dim]
            if missing:
                pad = [0, missing] if rank_dim == 2 else [0, 0, 0, missing]
                state_dict[key] = nn.functional.pad(state_dict[key], pad)
