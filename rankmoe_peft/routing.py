"""What the routers do: per-expert usage statistics and the Switch-style load-balancing loss.

Both read the router of every RankMoE layer through forward hooks that a `RouterRecorder` installs for as long as
it is open; nothing is computed in `forward` otherwise. The recorder keeps each layer's router logits of the last
forward pass (with autograd, so `load_balancing_loss` can be added to a training loss, like the rank budget term).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import RankMoELayer

__all__ = ["RouterRecorder", "ExpertUsage", "load_balancing_loss"]


class RouterRecorder:
    """Forward hooks on every RankMoE layer holding `adapter_name` (default: the first active adapter).

    `logits[layer name]` is the router's logits (..., E) of that layer's last forward pass, the unit the router
    decides for: one row per token (token router) or per sequence (sequence router, logits averaged over the
    sequence as the layer does). Use as a context manager, or call `remove()`.
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        self.logits: dict[str, torch.Tensor] = {}
        self.layers: dict[str, tuple[RankMoELayer, str]] = {}
        self._handles = []
        for name, module in model.named_modules():
            if not isinstance(module, RankMoELayer):
                continue
            adapter = adapter_name or module.active_adapters[0]
            if adapter not in module.rankmoe_router:
                continue
            self.layers[name] = (module, adapter)
            self._handles.append(module.register_forward_hook(self._hook(name, module, adapter)))
        if not self.layers:
            raise ValueError(f"no RankMoE layer with adapter {adapter_name!r} in this model")

    def _hook(self, name: str, layer: RankMoELayer, adapter: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if module.disable_adapters or adapter not in module.active_adapters:
                return
            router = layer.rankmoe_router[adapter]
            x = args[0].to(router.weight.dtype)
            logits = router(x)  # (..., E)
            if layer.rankmoe_settings[adapter].router == "sequence" and logits.dim() >= 3:
                logits = logits.flatten(1, -2).mean(dim=1)  # (B, E): the router's one decision per sequence
            self.logits[name] = logits.reshape(-1, logits.shape[-1])  # (units, E)

        return record

    def gates(self, name: str) -> torch.Tensor:
        """(units, E) router weights of layer `name` in the last forward pass, as the layer mixes its experts."""
        layer, adapter = self.layers[name]
        return layer.expert_gates(adapter, self.logits[name].unsqueeze(1)).squeeze(1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RouterRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def load_balancing_loss(recorder: RouterRecorder) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, averaged over the layers of the last forward pass:
    E * sum_e f_e * p_e, with f_e the fraction of units whose top expert is e (no gradient) and p_e the mean
    softmax probability of e. 1 when the units spread evenly, E when all go to one expert. Add it to the loss
    (times a small weight) yourself; it is never part of `forward`."""
    if not recorder.logits:
        raise ValueError("the recorder has seen no forward pass; run the model inside it first")
    terms = []
    for logits in recorder.logits.values():
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(dim=-1)  # (units, E)
        fraction = torch.bincount(probs.argmax(dim=-1), minlength=num_experts).to(probs.dtype) / probs.shape[0]
        terms.append(num_experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(terms).mean()


class ExpertUsage:
    """Running mean and standard deviation of every expert's router weight, per layer, over all units (tokens or
    sequences) of the forward passes it is given. `update(recorder)` after each forward pass inside a recorder."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    @torch.no_grad()
    def update(self, recorder: RouterRecorder) -> None:
        for name in recorder.logits:
            gates = recorder.gates(name).double()  # (units, E)
            self.sums[name] = self.sums.get(name, 0) + gates.sum(dim=0)
            self.squares[name] = self.squares.get(name, 0) + gates.square().sum(dim=0)
            self.counts[name] = self.counts.get(name, 0) + gates.shape[0]

    def mean(self) -> dict[str, list[float]]:
        return {name: (self.sums[name] / self.counts[name]).tolist() for name in self.sums}

    def std(self) -> dict[str, list[float]]:
        """Population standard deviation over the units of each expert's weight."""
        out = {}
        for name in self.sums:
            mean = self.sums[name] / self.counts[name]
            out[name] = (self.squares[name] / self.counts[name] - mean.square()).clamp_min(0).sqrt().tolist()
        return out
