"""Tiny models shared by the tests, and an independent re-implementation of the RankMoE formula."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class MLP(nn.Module):
    """A plain torch model: RankMoE must work on any nn.Linear, not only on transformers models."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, width)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_clip_config(**overrides) -> CLIPVisionConfig:
    settings = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return CLIPVisionConfig(**{**settings, **overrides})


def tiny_clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(tiny_clip_config()).eval()


def reference_expert(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank: float) -> torch.Tensor:
    """g(x) for one expert as the interpolation g_floor + frac * (g_ceil - g_floor), written from DESIGN.md."""
    max_rank = A.shape[-1]
    r = min(max(rank, 0.0), float(max_rank))
    low = math.floor(r)
    frac = r - low
    g_low = x @ A[:, :low] @ B[:low] if low > 0 else torch.zeros(*x.shape[:-1], B.shape[-1], dtype=x.dtype)
    if low >= max_rank:
        return g_low
    g_high = x @ A[:, : low + 1] @ B[: low + 1]
    return g_low + frac * (g_high - g_low)


def reference_gates(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, router: str, top_k):
    """Router weights (..., E) written independently of rankmoe_peft.functional.route."""
    if router == "sequence" and x.dim() == 3:
        logits = x.mean(dim=1, keepdim=True) @ weight.T + bias  # (B, 1, E)
    else:
        logits = x @ weight.T + bias
    gates = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    gates = gates / gates.sum(dim=-1, keepdim=True)
    if top_k is not None:
        threshold = gates.sort(dim=-1, descending=True).values[..., top_k - 1 : top_k]
        gates = torch.where(gates >= threshold, gates, torch.zeros_like(gates))
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates


def reference_layer(layer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """base(x) + scaling * sum_e gate_e * g_e(x), looping over experts in plain Python."""
    A = layer.rankmoe_A[adapter].detach()
    B = layer.rankmoe_B[adapter].detach()
    ranks = layer.rankmoe_rank[adapter].detach().tolist()
    router = layer.rankmoe_router[adapter]
    settings = layer.rankmoe_settings[adapter]
    gates = reference_gates(x, router.weight.detach(), router.bias.detach(), settings.router, settings.top_k)
    out = layer.base_layer(x).detach()
    for e, rank in enumerate(ranks):
        out = out + layer.scaling[adapter] * gates[..., e : e + 1] * reference_expert(x, A[e], B[e], rank)
    return out
