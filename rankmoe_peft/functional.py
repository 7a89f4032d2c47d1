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

import math

import torch
import torch.nn.functional as F

__all__ = ["FractionalRankMask", "fractional_rank_mask", "hard_rank_mask", "route", "gate_floor"]


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


def gate_floor(dtype: torch.dtype) -> float:
    """Smallest non-zero router gate in `dtype`: sqrt(tiny) (1.1e-19 in float32 and bfloat16, 1.5e-154 in float64).

    Why: a peaked router drives softmax gates into denormal floats, and arithmetic on denormals can be far slower
    on x86 CPUs (microcode assists; how much depends on the core), in the matmuls they reach, forward and
    backward. A process-wide flush-to-zero flag would change a user's other code, so the gates avoid them. A gate
    kept at >= sqrt(tiny) times any value >= sqrt(tiny) stays a normal float, and a dropped gate changes the
    output by less than `num_experts * floor` relative to its largest term, far below the dtype's rounding
    (eps**2 bounds the floor). float16's range is too narrow for that margin (sqrt(tiny) = 7.8e-3 > eps**2):
    there the floor is its tiny (6.1e-5), so gates are normal but products may still be subnormal (float16 runs
    on GPUs, where subnormals cost nothing).
    """
    info = torch.finfo(dtype)
    floor = math.sqrt(info.tiny)
    return floor if floor <= info.eps**2 else info.tiny


def route(logits: torch.Tensor, top_k: int | None = None, overwrite_logits: bool = False) -> torch.Tensor:
    """Softmax gates over the last dim (experts); with `top_k`, keep the k largest and renormalise.

    Denormal-free: an expert whose gate would fall below `gate_floor` is left out of the softmax (its logit
    set to -inf), so its gate is exactly 0 and so is its gradient, and the saved softmax output that the
    backward pass multiplies with holds no denormal either. Its true gradient is smaller than the floor times
    the upstream gradient, i.e. negligible. The kept gates are renormalised over the kept experts, which
    changes them by less than `num_experts * floor` relative. With `top_k` the same masked softmax is taken
    over the k largest logits, which equals renormalising the k largest softmax gates.

    When no backward pass will read the softmax output (no autograd), the sub-floor gates are zeroed after the
    softmax instead, in place (one kernel); both forms agree to far below rounding. `overwrite_logits=True`
    lets the -inf be written into `logits` itself, without an autograd node (the same gradient: the softmax's
    backward gives exactly 0 where its output is 0); only for a caller that owns `logits` and whose autograd
    graph has not saved it, as the RankMoE layer does with the logits it has just computed.
    """
    num_experts = logits.shape[-1]
    if top_k is None and not (logits.requires_grad and torch.is_grad_enabled()):
        return F.threshold_(logits.softmax(dim=-1), gate_floor(logits.dtype), 0.0)
    with torch.no_grad():  # which experts are kept is a discrete choice: no gradient through it
        # exp(l - max) / Z >= floor for Z <= num_experts when l - max >= log(floor * num_experts)
        dropped = (logits - logits.amax(dim=-1, keepdim=True)) < math.log(gate_floor(logits.dtype) * num_experts)
        if top_k is not None and top_k < num_experts:
            dropped.scatter_(-1, logits.topk(num_experts - top_k, dim=-1, largest=False).indices, True)
        if overwrite_logits:
            logits.masked_fill_(dropped, -math.inf)
    if not overwrite_logits:
        logits = logits.masked_fill(dropped, -math.inf)
    return logits.softmax(dim=-1)
