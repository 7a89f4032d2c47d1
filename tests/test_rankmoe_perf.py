"""RankMoE's fast paths: denormal-free gates (issue 16), the fused router matmul, the benchmark's statistics.

Denormal floats are checked on every tensor that enters or leaves an aten op while a layer runs its forward and
backward passes (a dispatch mode sees the backward kernels too), so "no denormal reaches the matmuls" is tested
directly rather than through a timing (a timing on a shared machine would be too noisy to assert).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rankmoe_peft import RankMoEConfig, route
from rankmoe_peft.functional import gate_floor
from rankmoe_peft.layer import FUSE_MIN_INPUT
from helpers import MLP, reference_expert, reference_gates, reference_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def denormals(t: torch.Tensor) -> int:
    """Number of subnormal entries of a floating tensor."""
    if not t.is_floating_point():
        return 0
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


class DenormalWatch(TorchDispatchMode):
    """Records every aten op that receives or returns a tensor with subnormal entries."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
            self.matmuls += 1
        outputs = [] if "empty" in name else out if isinstance(out, (tuple, list)) else [out]  # empty*: uninitialised
        flat = [*args, *(kwargs or {}).values(), *outputs]
        for t in flat:
            if isinstance(t, torch.Tensor) and denormals(t):
                self.hits.append(f"{name}: {denormals(t)} subnormal values in a {tuple(t.shape)} tensor")
        return out


def peaked_layer(router: str = "token", top_k=None, discretize: bool = False, std: float = 10.0):
    """One RankMoE layer on an MLP whose router weights have std `std`: softmax gates underflow to denormals."""
    torch.manual_seed(0)
    config = RankMoEConfig(
        target_modules=["lin1"], num_experts=6, max_rank=4, init_rank=2.5, init_weights=False, router=router,
        top_k=top_k,
    )
    model = get_peft_model(MLP(), config)
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.rankmoe_router["default"].weight.normal_(0.0, std)
        layer.rankmoe_rank["default"].copy_(torch.tensor([0.0, 1.3, 2.5, 4.0, 3.7, 0.6]))
    if discretize:
        model.discretize_ranks()
    return layer


def test_gate_floor_keeps_products_normal_and_drops_only_negligible_gates():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        info = torch.finfo(dtype)
        floor = gate_floor(dtype)
        assert floor * floor >= info.tiny * (1 - 1e-6)  # a kept gate times any value >= floor is normal
        assert floor * 64 < info.eps**2  # 64 dropped experts change the output far below rounding
    assert gate_floor(torch.float32) == pytest.approx(math.sqrt(torch.finfo(torch.float32).tiny))
    assert gate_floor(torch.float16) == torch.finfo(torch.float16).tiny  # too narrow a range for a margin


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("grad", [True, False])
def test_route_has_no_denormals_and_matches_softmax(top_k, grad):
    torch.manual_seed(0)
    logits = torch.randn(64, 6, dtype=torch.float64) * 40  # gaps of ~100: exp() underflows into subnormals
    plain = logits.float().softmax(-1)
    assert denormals(plain) > 0  # the situation the guard is for really occurs
    x = logits.float().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        gates = route(x, top_k)
    identity, zero = torch.eye(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)  # router = identity
    expected = reference_gates(logits, identity, zero, "token", top_k)
    assert denormals(gates) == 0
    torch.testing.assert_close(gates.double(), expected, rtol=1e-5, atol=6 * gate_floor(torch.float32))
    kept = gates[gates != 0]
    assert kept.min() >= gate_floor(torch.float32)
    if grad:
        upstream = torch.randn(64, 6)
        (gates * upstream).sum().backward()
        assert denormals(x.grad) == 0
        ref_logits = logits.clone().requires_grad_(True)
        ref = reference_gates(ref_logits, identity, zero, "token", top_k)
        (ref * upstream.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)  # float32 rounding


@pytest.mark.parametrize("discretize", [False, True], ids=["searching", "discretized"])
@pytest.mark.parametrize("router, top_k", [("token", None), ("token", 2), ("sequence", None)])
def test_peaked_router_sends_no_denormal_through_any_op(router, top_k, discretize):
    layer = peaked_layer(router, top_k, discretize)
    x = torch.randn(4, 9, 12, requires_grad=True)
    weight, bias = layer.rankmoe_router["default"].weight, layer.rankmoe_router["default"].bias
    token_logits = (x @ weight.T + bias).detach()
    assert denormals(token_logits.softmax(-1)) > 0  # plain softmax gates of this router do underflow

    watch = DenormalWatch()
    with watch:  # training path, forward and backward
        out = layer(x)
        out.backward(torch.randn_like(out))
    # the softmax's subnormal outputs are zeroed in place by the very next kernel (`functional._gates`), and nothing
    # after it, forward or backward, the matmuls included, sees one
    assert all(hit.startswith("_softmax:") for hit in watch.hits)
    torch.testing.assert_close(out.detach(), reference_layer(layer, x.detach()), rtol=1e-5, atol=1e-6)

    watch = DenormalWatch()
    with torch.no_grad(), watch:  # cached inference path
        fast = layer(x)
    # without autograd the softmax's subnormal outputs are zeroed in place by the very next kernel (`route`), and
    # nothing after it, the matmuls included, sees one
    assert all(hit.startswith("_softmax:") for hit in watch.hits)
    torch.testing.assert_close(fast, reference_layer(layer, x.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [7, FUSE_MIN_INPUT // 12 + 1], ids=["two-matmuls", "fused"])
def test_peaked_router_gradients_match_reference(tokens):
    """The zeroed gates drop gradient terms smaller than the floor: the gradients equal a plain-softmax reference,
    on both forms of the training path."""
    layer = peaked_layer()
    A, B = layer.rankmoe_A["default"], layer.rankmoe_B["default"]
    router, scaling = layer.rankmoe_router["default"], layer.scaling["default"]
    ranks = layer.rankmoe_rank["default"].tolist()
    x = torch.randn(1, tokens, 12, requires_grad=True)
    upstream = torch.randn(1, tokens, 12)
    (layer(x) * upstream).sum().backward()
    got = [t.grad.clone() for t in (x, A, B, router.weight, router.bias)]

    leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B, router.weight, router.bias)]
    rx, rA, rB, rW, rb = leaves
    gates = reference_gates(rx, rW, rb, "token", None)
    out = layer.base_layer.double()(rx)
    layer.base_layer.float()
    for e, rank in enumerate(ranks):
        out = out + scaling * gates[..., e : e + 1] * reference_expert(rx, rA[e], rB[e], rank)
    (out * upstream.double()).sum().backward()
    for mine, ref in zip(got, leaves):
        torch.testing.assert_close(mine.double(), ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens, training_matmuls", [(5, 4), (FUSE_MIN_INPUT // 12 + 1, 3)], ids=["small", "large"])
def test_router_and_experts_share_one_matmul(tokens, training_matmuls):
    layer = peaked_layer(std=0.5)
    x = torch.randn(1, tokens, 12, requires_grad=True)
    watch = DenormalWatch()
    with watch:
        out = layer(x)
    # base layer, [A columns | router] together (separately for small inputs), B
    assert watch.matmuls == training_matmuls
    torch.testing.assert_close(out.detach(), reference_layer(layer, x.detach()), rtol=1e-5, atol=1e-6)
    watch = DenormalWatch()
    with torch.no_grad(), watch:
        layer(x)
    assert watch.matmuls == 3  # base layer, [kept A columns | router] together, kept B rows


def autograd_nodes(tensor: torch.Tensor) -> list[str]:
    """Names of the autograd nodes that produced `tensor`, leaves (AccumulateGrad) excluded."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("router, discretize", [("token", False), ("sequence", False), ("token", True)])
def test_training_path_is_one_autograd_node(router, discretize):
    """The speed of small layers rests on this: the whole layer (its frozen nn.Linear base, router, gates, experts,
    rank mask) is one node, `MixtureOfExpertsBackward`; with a base layer that must run as a module (here: it has
    a hook), the adapter is one node on top of the base layer's own."""
    layer = peaked_layer(router, discretize=discretize, std=0.5)
    x = torch.randn(3, 5, 12, requires_grad=True)
    out = layer(x)
    assert autograd_nodes(out) == ["MixtureOfExpertsBackward"]
    torch.testing.assert_close(out.detach(), reference_layer(layer, x.detach()), rtol=1e-5, atol=1e-6)

    layer.base_layer.register_forward_hook(lambda *args: None)
    base_nodes, adapter_nodes = autograd_nodes(layer.base_layer(x)), autograd_nodes(layer(x))
    assert adapter_nodes.count("MixtureOfExpertsBackward") == 1
    assert len(adapter_nodes) - len(base_nodes) <= 3  # the node, and views of the input and output


class ProductCount(TorchDispatchMode):
    """Counts elementwise products (aten mul) whose output has `numel` entries."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mul", "mul_") and isinstance(out, torch.Tensor):
            self.count += out.numel() == self.numel
        return out


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_backward_reuses_the_gated_hidden_values_of_the_forward_pass(router):
    """The (N, E*R) gated hidden values are made once, in the forward pass, and kept for dL/dB; the backward pass
    forms only the two (N, E*R) products it needs (dL/dhidden = dL/dgated * gates, and dL/dgated * hidden inside
    the gates' gradient), three before. (That the gradients are right is test_peaked_router_gradients_match_reference
    and the finite-difference tests of test_rankmoe.py.)"""
    layer = peaked_layer(router, std=0.5)
    out = layer(torch.randn(3, 5, 12, requires_grad=True))
    counter = ProductCount(numel=3 * 5 * 6 * 4)  # N tokens x E experts x R columns
    with counter:
        out.backward(torch.randn(3, 5, 12))
    assert counter.count == 2


def layer_gradients(layer, x: torch.Tensor, upstream: torch.Tensor, autocast: torch.dtype | None = None) -> list:
    """Output and the gradients of input, factors, router and ranks after one backward pass."""
    params = [layer.rankmoe_A["default"], layer.rankmoe_B["default"], layer.rankmoe_router["default"].weight,
              layer.rankmoe_router["default"].bias, layer.rankmoe_rank["default"]]
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = layer(x)
    (out.float() * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in [x] + params]


def test_folded_base_layer_gives_the_gradients_of_the_unfolded_path():
    """A plain frozen nn.Linear base runs inside the adapter's node with the output and gradients of the unfolded
    path; a hook on the base layer, or a trainable base, turns folding off."""
    layer = peaked_layer(std=0.5)
    x, upstream = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    folded = layer_gradients(layer, x, upstream)

    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    nodes = autograd_nodes(layer(x.clone().requires_grad_(True)))
    assert "MixtureOfExpertsBackward" in nodes and len(nodes) > 1  # the base layer ran as a module
    unfolded = layer_gradients(layer, x, upstream)
    handle.remove()
    assert calls  # the hook saw the base layer run
    for mine, reference in zip(folded, unfolded):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)

    with torch.no_grad():  # inference adds into the base output in place only when it made that output itself
        folded_out = layer(x)
        seen = []
        handle = layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
        unfolded_out = layer(x)
        handle.remove()
        torch.testing.assert_close(seen[0], layer.base_layer(x))  # what the hook kept was not added into
        torch.testing.assert_close(folded_out, unfolded_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(folded_out, reference_layer(layer, x), rtol=1e-5, atol=1e-6)

    layer.base_layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.base_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("discretize", [False, True], ids=["searching", "discretized"])
def test_a_single_token_without_batch_dimension_works_like_nn_linear(discretize):
    """x of shape (in,), as nn.Linear accepts: the same output as the one-row batch, with and without autograd."""
    layer = peaked_layer(discretize=discretize, std=0.5)
    x = torch.randn(12)
    expected = reference_layer(layer, x[None])[0]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        handle = layer.base_layer.register_forward_hook(lambda *args: None)  # the unfolded path
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        handle.remove()


@pytest.mark.parametrize("changed", ["rankmoe_A", "rankmoe_rank", "router", "input", "base"])
def test_a_tensor_changed_in_place_before_backward_is_an_error(changed):
    """The node keeps its tensors on ctx rather than in save_for_backward; it still refuses, as autograd does, to
    compute gradients from a tensor changed in place between forward and backward, and names it."""
    layer = peaked_layer(std=0.5)
    x = torch.randn(3, 5, 12, requires_grad=True)
    inner = x * 1.0  # a non-leaf activation, as a layer's input is
    out = layer(inner)
    assert "MixtureOfExpertsBackward" in autograd_nodes(out)
    tensor, name = {
        "rankmoe_A": (layer.rankmoe_A["default"], "rankmoe_A"),
        "rankmoe_rank": (layer.rankmoe_rank["default"], "rankmoe_rank"),
        "router": (layer.rankmoe_router["default"].weight, "the router weight"),
        "input": (inner, "the layer input"),
        "base": (layer.base_layer.weight, "the base layer weight"),
    }[changed]
    with torch.no_grad():
        tensor.mul_(0.5)
    with pytest.raises(RuntimeError, match=f"modified by an inplace operation: {name} "):
        out.sum().backward()
    layer(x * 1.0).sum().backward()  # unchanged tensors: fine
    assert x.grad is not None


@pytest.mark.parametrize("discretize", [False, True], ids=["searching", "discretized"])
def test_training_under_autocast_runs_in_the_autocast_dtype(discretize):
    """Mixed precision (Accelerate's bf16/fp16 = autocast): the node computes in the autocast dtype, its backward
    meets the dtypes its forward saw, and the float32 parameters get float32 gradients close to float32's."""
    layer = peaked_layer(discretize=discretize, std=0.5)
    x, upstream = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    mixed = layer_gradients(layer, x, upstream, autocast=torch.bfloat16)
    full = layer_gradients(layer, x, upstream)
    assert mixed[0].dtype == torch.bfloat16
    for mine, reference in zip(mixed[1:], full[1:]):
        if reference is None:  # a frozen rank
            assert mine is None
            continue
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
    torch.testing.assert_close(mixed[0].float(), full[0], rtol=0.05, atol=0.05)


class DoublingDropout(nn.Dropout):
    """A deterministic stand-in for dropout (x -> 2x), to see which branch receives the dropped input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_dropout_reaches_the_experts_but_not_the_router():
    torch.manual_seed(0)
    config = RankMoEConfig(
        target_modules=["lin1"], num_experts=4, max_rank=4, init_rank=2.5, lora_dropout=0.1, init_weights=False
    )
    model = get_peft_model(MLP(), config)
    layer = model.base_model.model.lin1
    layer.rankmoe_dropout["default"] = DoublingDropout(0.1)
    x = torch.randn(3, 5, 12)
    model.train()
    delta = layer(x) - layer.base_layer(x)
    clean = reference_layer(layer, x) - layer.base_layer(x)  # gates and experts from the clean input
    torch.testing.assert_close(delta, 2 * clean, rtol=1e-5, atol=1e-6)  # experts are linear in their input
    model.eval()  # no dropout outside training, also with autograd on
    torch.testing.assert_close(layer(x) - layer.base_layer(x), clean, rtol=1e-5, atol=1e-6)


def test_bfloat16_layer_has_no_denormals_and_keeps_its_dtype():
    layer = peaked_layer().to(torch.bfloat16)
    x = torch.randn(2, 6, 12, dtype=torch.bfloat16, requires_grad=True)
    watch = DenormalWatch()
    with watch:
        out = layer(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(hit.startswith("_softmax:") for hit in watch.hits)  # zeroed by the next kernel, as in float32
    reference = reference_layer(layer.float(), x.detach().float())
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def fake_run(lora: float, moe: float, load: float = 0.5) -> dict:
    names = ["(a) LoRA r=8", "(b) RankMoE, default init"]
    return {
        "train": dict(zip(names, [lora, moe])), "infer": dict(zip(names, [lora / 2, moe / 2])),
        "memory": dict(zip(names, [2**20, 2**21])), "trainable": dict(zip(names, [10, 20])),
        "load": [[load, load, load], [load, load, load]],
    }


def test_benchmark_reports_median_and_spread_and_flags_unstable_ratios():
    import bench_layers

    args = bench_layers.parse_args(["--preset", "tiny", "--runs", "3"])
    steady = [fake_run(1.0, 1.02), fake_run(2.0, 2.05), fake_run(1.5, 1.53)]  # ratios 1.02, 1.025, 1.02
    text, wide = bench_layers.table(args, steady)
    assert wide == []
    assert "| (b) RankMoE, default init | 1530.00 | 1.020 [1.020-1.025] |" in text
    assert "0.50->0.50" in text  # the load seen by each run is printed with the figures
    shaky = steady[:2] + [fake_run(1.0, 1.20, load=3.0)]  # one run 18% off: too noisy to publish
    text, wide = bench_layers.table(args, shaky)
    assert len(wide) == 2 and all("(b) RankMoE" in line for line in wide)  # train and inference ratios
    assert "3.00->3.00" in text


def test_benchmark_refuses_to_write_results_from_unstable_runs(monkeypatch, capsys):
    import bench_layers

    runs = iter([fake_run(1.0, 1.02), fake_run(2.0, 2.05), fake_run(1.0, 1.20)])
    monkeypatch.setattr(bench_layers, "run_in_fresh_process", lambda index: next(runs))
    monkeypatch.setattr(bench_layers, "write_section", lambda *a, **k: pytest.fail("docs/RESULTS.md was written"))
    monkeypatch.setattr(sys, "argv", ["bench_layers.py", "--preset", "tiny", "--runs", "3"])
    with pytest.raises(SystemExit) as stopped:
        bench_layers.main()
    assert stopped.value.code == 3
    assert "not written to docs/RESULTS.md" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["bench_layers.py", "--preset", "tiny", "--runs", "2"])
    with pytest.raises(SystemExit, match="3 or more runs"):
        bench_layers.main()
