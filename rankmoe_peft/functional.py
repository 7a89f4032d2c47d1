"""The rank math of RankMoE, in one place.

An expert with factors A (in, R), B (R, out) and a continuous rank r in [0, R] computes

    g(x) = (x @ A) * mask(r) @ B,        mask_j(r) = clamp(r - j, 0, 1),  j = 0 .. R-1

i.e. floor(r) whole rank-1 components plus the fraction r - floor(r) of the next one: the linear
interpolation between the two neighbouring integer ranks. The mask's derivative is 0 almost everywhere
and undefined at the kinks, so its gradient is replaced by a custom rule:

    d mask / d r = gamma * onehot(k),    k = min(floor(r), R - 1),  r clamped to [0, R] first

which makes dL/dr = gamma * <dL/dy, g_ceil(r) - g_floor(r)>: exactly one component receives the signal,
also at an integer rank (then it is the next component, so a rank can grow from 4.0 to 4.1).
"""

from __future__ import annotations

import torch

__all__ = ["FractionalRankMask", "fractional_rank_mask", "hard_rank_mask", "route"]


class FractionalRankMask(torch.autograd.Function):
    """mask (E, R) from ranks (E,), with the one-hot gradient rule of the module docstring."""

    @staticmethod
    def forward(ctx, rank: torch.Tensor, max_rank: int, rank_grad_scale: float) -> torch.Tensor:
        clamped = rank.detach().clamp(0.0, float(max_rank))  # (E,)
        positions = torch.arange(max_rank, device=rank.device, dtype=rank.dtype)  # (R,)
        mask = (clamped[:, None] - positions[None, :]).clamp_(0.0, 1.0)  # (E, R)
        active = clamped.floor().clamp_(max=max_rank - 1).long()  # (E,) the component that gets the gradient
        ctx.save_for_backward(active)
        ctx.rank_grad_scale = rank_grad_scale
        return mask

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        (active,) = ctx.saved_tensors
        grad_rank = ctx.rank_grad_scale * grad_mask.gather(1, active[:, None]).squeeze(1)  # (E,)
        return grad_rank, None, None


def fractional_rank_mask(rank: torch.Tensor, max_rank: int, rank_grad_scale: float = 1.0) -> torch.Tensor:
    """Soft mask (E, R) of continuous ranks (E,); differentiable in `rank` by the custom rule."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return FractionalRankMask.apply(rank, max_rank, rank_grad_scale)


def hard_rank_mask(rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """0/1 mask (E, R) keeping the first round(rank) components; used once ranks are discretized."""
    positions = torch.arange(max_rank, device=rank.device, dtype=rank.dtype)  # (R,)
    return (positions[None, :] < rank.detach().round()[:, None]).to(rank.dtype)  # (E, R)


def route(logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Softmax gates over the last dim (experts); with `top_k`, keep the k largest and renormalise."""
    gates = logits.softmax(dim=-1)
    if top_k is None or top_k >= gates.shape[-1]:
        return gates
    kept, index = gates.topk(top_k, dim=-1)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(gates).scatter(-1, index, kept)
