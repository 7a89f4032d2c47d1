"""`RankMoEModel`: the peft tuner that injects RankMoE layers and owns the rank search API."""

from __future__ import annotations

from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import RankMoEConfig
from .layer import ADAPTABLE_LAYERS, Linear, RankMoELayer

__all__ = ["RankMoEModel", "DEFAULT_TARGET_MODULES"]

_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# SigLIP's vision head holds an nn.MultiheadAttention whose `out_proj` it reads as a bare weight: only the encoder
# layers' self-attention is adapted. Name suffixes, not a regex: peft 0.18 turns a mapped string into a set of letters.
_SIGLIP_ATTENTION = [f"self_attn.{name}" for name in _ATTENTION]
# Module names of the installed transformers 5.x (checked by tests/test_backbones.py on tiny configs); keys are
# `config.model_type`. The attention projections (q, k, v, out), as UniSTD adapts them.
DEFAULT_TARGET_MODULES = {
    "clip": _ATTENTION,
    "clip_vision_model": _ATTENTION,
    "clip_text_model": _ATTENTION,
    "siglip": _SIGLIP_ATTENTION,
    "siglip_vision_model": _SIGLIP_ATTENTION,
    "siglip_text_model": _SIGLIP_ATTENTION,
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "dinov2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],  # Conv1D layers; fused q/k/v and the attention output (not mlp.c_proj)
}


class RankMoEModel(BaseTuner):
    """Injects `Linear` RankMoE layers into a model. Forwarded by `PeftModel`, so users call e.g.
    `peft_model.rank_budget_loss()`. The budget term is never hidden in `forward`: the training loop adds it."""

    prefix: str = "rankmoe_"
    tuner_layer_cls = RankMoELayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _create_and_replace(
        self,
        config: RankMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("RankMoE needs the module's name to resolve num_experts_pattern and rank_pattern")
        num_experts = config.experts_for(current_key)
        fixed_ranks = config.rank_pattern.get(current_key) if config.rank_pattern else None
        if config.rank_pattern and fixed_ranks is None:
            raise ValueError(
                f"the adapter's rank_pattern has no entry for {current_key!r}: it was discretized on a model with "
                f"other target modules ({sorted(config.rank_pattern)[:4]} ...)"
            )
        if isinstance(target, RankMoELayer):
            target.update_layer(adapter_name, config, num_experts, fixed_ranks)
            return
        if not isinstance(target, ADAPTABLE_LAYERS):
            raise ValueError(
                f"RankMoE can only adapt torch.nn.Linear and transformers' Conv1D modules; {current_key!r} is a "
                f"{type(target).__name__}. Narrow target_modules to the Linear layers."
            )
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"{current_key!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly, so "
                "an adapter there would be ignored; exclude it from target_modules (e.g. with a regex)."
            )
        new_module = Linear(target, adapter_name, config, num_experts, fixed_ranks)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter()
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for layer in self.rankmoe_layers():
            layer.freeze_discretized_ranks()

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "merge_and_unload() is not possible with RankMoE: each token's mixture of experts depends on the input "
            "through the router, so no fixed weight equals the adapted layer. Use the PeftModel as it is, or "
            "unload() to get the base model back without the adapters."
        )

    # --- the rank search API -----------------------------------------------------------------------------------------

    def rankmoe_layers(self) -> Iterator[RankMoELayer]:
        return (m for m in self.model.modules() if isinstance(m, RankMoELayer))

    def _named_layers(self, adapter_name: str) -> Iterator[tuple[str, RankMoELayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, RankMoELayer) and adapter_name in module.rankmoe_rank:
                yield name, module

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(self.peft_config)}")
        return name

    def rank_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """The rank tensors (E,) of every adapted layer, for their own optimizer (SGD with momentum)."""
        name = self._adapter(adapter_name)
        return [layer.rankmoe_rank[name] for _, layer in self._named_layers(name)]

    def total_rank(self, adapter_name: str | None = None) -> torch.Tensor:
        """Sum of all experts' ranks, clamped to [0, max_rank] as the forward pass uses them (differentiable)."""
        name = self._adapter(adapter_name)
        max_rank = self.peft_config[name].max_rank
        ranks = [rank.clamp(0.0, max_rank).sum() for rank in self.rank_parameters(name)]
        if not ranks:
            raise ValueError(f"adapter {name!r} adapts no layer")
        return torch.stack(ranks).sum()

    def rank_budget(self, adapter_name: str | None = None) -> float:
        """C: the config's `rank_budget`, or by default init_rank times the number of experts."""
        name = self._adapter(adapter_name)
        config = self.peft_config[name]
        if config.rank_budget is not None:
            return float(config.rank_budget)
        return float(config.init_rank) * sum(rank.numel() for rank in self.rank_parameters(name))

    def rank_budget_loss(self, adapter_name: str | None = None) -> torch.Tensor:
        """beta * |C - sum of all ranks|: add it to the task loss while ranks are searched."""
        name = self._adapter(adapter_name)
        config = self.peft_config[name]
        return config.budget_weight * (self.rank_budget(name) - self.total_rank(name)).abs()

    @torch.no_grad()
    def clamp_ranks_(self, adapter_name: str | None = None) -> None:
        """Clamp ranks back into [0, max_rank]; call it after each optimizer step on the ranks."""
        name = self._adapter(adapter_name)
        for rank in self.rank_parameters(name):
            rank.clamp_(0.0, self.peft_config[name].max_rank)

    @torch.no_grad()
    def discretize_ranks(self, adapter_name: str | None = None) -> dict[str, list[int]]:
        """Round ranks half up, freeze them and switch to hard masks. The integer ranks go into the config's
        `rank_pattern`, so `save_pretrained` stores A and B truncated to each layer's largest rank and loading
        rebuilds those shapes. Returns the rank pattern."""
        name = self._adapter(adapter_name)
        max_rank = self.peft_config[name].max_rank
        pattern = {}
        for module_name, layer in self._named_layers(name):
            rank = layer.rankmoe_rank[name]
            rank.copy_(torch.floor(rank.clamp(0.0, max_rank) + 0.5))
            rank.requires_grad_(False)
            layer.rank_frozen[name] = True
            pattern[module_name] = [int(r) for r in rank.tolist()]
        self.peft_config[name].rank_pattern = pattern
        return pattern

    def rank_summary(self, adapter_name: str | None = None) -> dict[str, list[float]]:
        """{module name: [rank per expert]} of the adapter (continuous while searched, integers after)."""
        name = self._adapter(adapter_name)
        return {module_name: layer.rankmoe_rank[name].tolist() for module_name, layer in self._named_layers(name)}
