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

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["FractionalRankMask", "MixtureOfExperts", "fractional_rank_mask", "hard_rank_mask", "route", "gate_floor"]


class FractionalRankMask(torch.autograd.Function):
    """mask (E, R) from ranks (E,), with the one-hot gradient rule of the module docstring."""

    @staticmethod
    def forward(ctx, rank: torch.Tensor, max_rank: int, rank_grad_scale: float) -> torch.Tensor:
        ctx.save_for_backward(rank)
        ctx.rank_grad_scale = rank_grad_scale
        return soft_mask(rank.detach(), max_rank)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        (rank,) = ctx.saved_tensors
        active = active_component(rank.detach(), grad_mask.shape[-1])  # (E,) flat indices into (E, R)
        return ctx.rank_grad_scale * grad_mask.take(active), None, None  # (E,)


def soft_mask(rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """mask_j(r) = clamp(r - j, 0, 1), (E, R) from ranks (E,); no gradient (see `FractionalRankMask`)."""
    return (rank.unsqueeze(1) - _positions(max_rank, rank.device, rank.dtype)).clamp_(0.0, 1.0)


def _positions(count: int, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...] = (-1,), step: int = 1
               ) -> torch.Tensor:
    """0, step, .. (count - 1) * step in `shape` (e.g. (R,) or (R, 1)), made once per arguments: an arange per
    call shows in a width-32 step. Never written to; made fresh while torch.compile traces (a traced tensor must
    not be cached)."""
    if torch.compiler.is_compiling():
        return torch.arange(0, count * step, step, device=device, dtype=dtype).view(shape)
    return _cached_positions(count, device, dtype, shape, step)


@functools.lru_cache(maxsize=64)
def _cached_positions(count: int, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], step: int
                      ) -> torch.Tensor:
    with torch.inference_mode(False):  # an ordinary tensor, also when first needed under inference_mode
        return torch.arange(0, count * step, step, device=device, dtype=dtype).view(shape)


def active_component(rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """(E,) flat index e * R + k into an (E, R) tensor of each expert's component k = min(floor(r_e), R - 1), the
    one whose mask entry receives the rank's gradient (read with `Tensor.take`: one kernel, no view)."""
    first_of_row = _positions(rank.numel(), rank.device, torch.long, step=max_rank)  # (E,) e * R
    # truncation is floor for r >= 0, and r < 0 gives 0
    return rank.long().clamp_(0, max_rank - 1).add_(first_of_row)


def fractional_rank_mask(rank: torch.Tensor, max_rank: int, rank_grad_scale: float = 1.0) -> torch.Tensor:
    """Soft mask (E, R) of continuous ranks (E,); differentiable in `rank` by the custom rule."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return FractionalRankMask.apply(rank, max_rank, rank_grad_scale)


def hard_rank_mask(rank: torch.Tensor, max_rank: int) -> torch.Tensor:
    """0/1 mask (E, R) keeping the first round(rank) components; used once ranks are discretized."""
    positions = _positions(max_rank, rank.device, rank.dtype)  # (R,)
    return (positions[None, :] < rank.detach().round()[:, None]).to(rank.dtype)  # (E, R)


@functools.lru_cache(maxsize=None)  # a pure function of the dtype, read on every training step
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
    if not (logits.requires_grad and torch.is_grad_enabled()):
        return _gates(logits, top_k)
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


class MixtureOfExperts(torch.autograd.Function):
    """The training path of a RankMoE layer as one autograd node: `result + delta`, with

        gates = softmax(router(x))                                  (U, E), one row per routing unit
        delta = sum_e gates_e * (x @ A_e * mask_e * scaling) @ B_e  (N, out)

    `result` (..., out) is the base layer's output (the last matmul adds into it), x (..., in) its input; with
    `base` = (weight, bias) of a frozen nn.Linear, `result` is None and the node computes the base layer too (and
    its input gradient), so that the whole layer is this one node. mask (E, R) is the soft mask of the continuous
    ranks (`FractionalRankMask`, with its gradient rule), or for frozen ranks the given `column_scale` (mask *
    scaling). A routing unit is one token (token router, U = N) or N / U consecutive tokens whose mean the router
    sees (sequence router). `options` = (scaling, rank_grad_scale, U (None: N), top_k, fuse_router, base).

    Why one node: at small widths a layer's step costs the number of kernels, autograd nodes and Python calls, not
    flops. A width-32 layer's training step, base layer included, dispatches 62 aten ops (23 forward, 39 backward,
    gradient accumulation counted), LoRA's 39 (14, 25); through plain autograd the same math took 25 nodes
    (benchmarks/bench_layers.py --preset tiny: 1.46x LoRA's step; 1.51x before the tensors left save_for_backward
    and the layer's per-call checks were cut, 1.54x before the rank mask was made in the shape it is used in, 1.61x
    before the gated values were kept for dL/dB and A's columns written in place, 1.81x before the base layer
    joined this node, 2.43x through plain autograd). With `fuse_router` (token router) the
    router's rows ride in the experts' matmul, forward and backward, so a large input is read once by each matmul
    it takes part in. Gates are those of `route` (sub-floor gates exactly 0, so no denormal reaches a matmul); the
    softmax backward uses them as well. Under autocast the caller casts the inputs (see `RankMoELayer._mixture`):
    the node computes in one dtype, forward and backward.
    """

    @staticmethod
    def forward(ctx, result, x, A, B, weight, bias, rank, column_scale, options):
        scaling, rank_grad_scale, units, top_k, fuse_router, base = options
        num_experts, _, columns = A.shape
        input_shape = x.shape
        x = x.reshape(-1, x.shape[-1])  # (N, in)
        tokens = x.shape[0]
        if units is None:  # token router
            units = tokens
        if base is not None:  # a frozen nn.Linear's (weight, bias): its matmul happens here, its gradient below
            result = F.linear(x, *base)  # (N, out)
        shape = input_shape[:-1] + result.shape[-1:]  # (..., out); reshaped here: no view nodes around this one
        if column_scale is None:  # ranks being searched: `soft_mask`, made as (E, R, 1) directly
            positions = _positions(columns, rank.device, rank.dtype, (-1, 1))  # (R, 1)
            column_scale = (rank.view(-1, 1, 1) - positions).clamp_(0.0, 1.0)  # (E, R, 1)
            if scaling != 1.0:
                column_scale.mul_(scaling)
        else:
            column_scale = column_scale.unsqueeze(-1)  # (E, R, 1)
        if column_scale.dtype != A.dtype:  # autocast
            column_scale = column_scale.to(A.dtype)
        A_columns = torch.mul(  # written straight into the (E, R, in) layout: no copy after the product
            A.transpose(1, 2), column_scale, out=A.new_empty(num_experts, columns, A.shape[1])
        ).view(num_experts * columns, -1)  # (E*R, in)
        if fuse_router:  # one matmul gives the hidden values and the logits
            matrix = torch.cat([A_columns, weight])  # (E*R+E, in)
            hidden, logits = F.linear(x, matrix).split([num_experts * columns, num_experts], dim=-1)
            logits, router_input = logits + bias, x  # (N, E)
        else:
            matrix = A_columns
            router_input = x if units == tokens else x.view(units, -1, x.shape[-1]).mean(dim=1)  # (U, in)
            hidden = F.linear(x, A_columns)  # (N, E*R)
            logits = F.linear(router_input, weight, bias)  # (U, E)
        gates = _gates(logits, top_k)  # (U, E)
        hidden = hidden.view(units, -1, num_experts, columns)  # (U, S, E, R)
        gated = (hidden * gates.view(units, 1, num_experts, 1)).view(tokens, -1)  # (N, E*R), kept for dL/dB
        B_rows = B.view(num_experts * columns, -1)  # (E*R, out)
        if result.dim() != 2:
            result = result.reshape(tokens, -1)
        # everything backward reads, kept on ctx in one tuple: save_for_backward would wrap the inputs in
        # SavedVariables (~10 us of a width-32 layer's step); the check it makes, that no input was changed in place
        # before backward, is made on the version counters recorded here
        ctx.kept = (column_scale, matrix, hidden, gated, gates, router_input, B_rows, x, A, B, weight, rank,
                    _versions(x, A, B, weight, rank, base), rank_grad_scale * scaling, fuse_router, input_shape, base)
        if base is not None:  # `result` is ours: add into it (an out-of-place addmm first copies it: at ViT-B size
            return result.addmm_(gated, B_rows).view(shape)  # that copy was a quarter of RankMoE's extra cost)
        return torch.addmm(result, gated, B_rows).view(shape)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        (column_scale, matrix, hidden, gated, gates, router_input, B_rows, x, A, B, weight, rank, versions,
         rank_factor, fuse_router, input_shape, base) = ctx.kept
        if versions != _versions(x, A, B, weight, rank, base):
            _raise_changed_in_place(versions, x, A, B, weight, rank, base)
        num_experts, _, columns = A.shape
        units, tokens = gates.shape[0], x.shape[0]
        _, need_x, need_A, need_B, need_weight, need_bias, need_rank, _, _ = ctx.needs_input_grad
        grad_result, grad_out = grad_out, grad_out.reshape(tokens, -1)  # (..., out), (N, out)
        gates_4d = gates.view(units, 1, num_experts, 1)
        grad_gated = F.linear(grad_out, B_rows).view_as(hidden)  # (U, S, E, R)
        grad_B = (gated.t() @ grad_out).view(num_experts, columns, -1) if need_B else None  # (E, R, out)
        grad_gates = torch.linalg.vecdot(grad_gated, hidden)  # (U, S, E)
        grad_gates = grad_gates.view(units, num_experts) if grad_gates.shape[1] == 1 else grad_gates.sum(dim=1)
        grad_logits = torch._softmax_backward_data(grad_gates, gates, -1, gates.dtype)  # (U, E)
        grad_hidden = (grad_gated * gates_4d).view(tokens, -1)  # (N, E*R)
        grad_bias = grad_logits.sum(dim=0) if need_bias else None
        if fuse_router:
            grad_both = torch.cat([grad_hidden, grad_logits], dim=-1)  # (N, E*R+E)
            grad_x = grad_both @ matrix if need_x else None
            grad_columns, grad_weight = (grad_both.t() @ x).split([num_experts * columns, num_experts])
        else:
            grad_columns = grad_hidden.t() @ x  # (E*R, in)
            grad_weight = grad_logits.t() @ router_input if need_weight else None  # (E, in)
            grad_x = None
            if need_x and units == tokens:
                grad_x = (grad_logits @ weight).addmm_(grad_hidden, matrix)  # (N, in)
            elif need_x:  # the router saw the mean of each unit's S tokens
                S = tokens // units
                grad_x = (grad_hidden @ matrix).view(units, S, -1) + (grad_logits @ weight).unsqueeze(1) / S
                grad_x = grad_x.view(tokens, -1)
        grad_columns = grad_columns.view(num_experts, columns, -1)  # (E, R, in), w.r.t. the scaled columns
        grad_A = (grad_columns * column_scale).transpose(1, 2) if need_A else None  # (E, in, R)
        grad_rank = None
        if need_rank:  # the rule of FractionalRankMask: only the component k = floor(r) gets dL/dmask
            active = active_component(rank, columns)  # (E,)
            grad_rank = torch.linalg.vecdot(grad_columns, A.transpose(1, 2)).take(active)  # (E,) dL/dscale
            if grad_rank.dtype != rank.dtype:
                grad_rank = grad_rank.to(rank.dtype)
            if rank_factor != 1.0:
                grad_rank.mul_(rank_factor)
        if grad_x is not None and base is not None:
            grad_x = grad_x.addmm_(grad_out, base[0])  # the base layer's input gradient, added in place
        if grad_x is not None:
            grad_x = grad_x.view(input_shape)
        if base is not None:
            grad_result = None
        return grad_result, grad_x, grad_A, grad_B, grad_weight, grad_bias, grad_rank, None, None


def _versions(x, A, B, weight, rank, base) -> tuple[int, ...]:
    """In-place version counters of the tensors `MixtureOfExperts.backward` reads (the base layer's weight too)."""
    return x._version, A._version, B._version, weight._version, rank._version, 0 if base is None else base[0]._version


_INPUT_NAMES = ("the layer input", "rankmoe_A", "rankmoe_B", "the router weight", "rankmoe_rank", "the base layer weight")


def _raise_changed_in_place(versions: tuple[int, ...], x, A, B, weight, rank, base) -> None:
    """The error autograd gives for a saved tensor changed between forward and backward, naming the tensor; the
    arguments are those of `_versions`."""
    tensors = (x, A, B, weight, rank) if base is None else (x, A, B, weight, rank, base[0])
    changed = [f"{name} {tuple(t.shape)} is at version {t._version}, expected {v}"
               for name, t, v in zip(_INPUT_NAMES, tensors, versions) if t._version != v]
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        + "; ".join(changed) + ". Run backward before changing it (e.g. call optimizer.step() after backward)."
    )


def _gates(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """`route`'s gates for logits nobody differentiates through (`MixtureOfExperts` writes the softmax backward)."""
    num_experts = logits.shape[-1]
    if top_k is not None and top_k < num_experts:
        logits = logits.scatter(-1, logits.topk(num_experts - top_k, dim=-1, largest=False).indices, -math.inf)
    return F.threshold_(logits.softmax(dim=-1), gate_floor(logits.dtype), 0.0)
