"""RankMoE as a peft method: math against an independent computation, peft behaviour, persistence, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import rankmoe_peft
from rankmoe_peft import RankMoEConfig, fractional_rank_mask, hard_rank_mask
from rankmoe_peft.layer import RankMoELayer
from helpers import ATTENTION, MLP, reference_expert, reference_layer, tiny_clip

# One table of cases, many checks (peft's test_custom_models convention).
CASES = [
    ("mlp-token", MLP, ["lin0", "lin1"], {}),
    ("mlp-sequence-topk", MLP, ["lin1"], {"router": "sequence", "top_k": 2}),
    ("clip-attention", tiny_clip, ATTENTION, {"num_experts_pattern": {"out_proj": 2}}),
    ("clip-regex-sequence", tiny_clip, r".*layers\.1\.self_attn\.(q|v)_proj", {"router": "sequence", "num_experts": 3}),
]
CASE_IDS = [case[0] for case in CASES]


def make_inputs(factory) -> dict:
    if factory is MLP:
        return {"x": torch.randn(2, 5, 10)}
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


def run(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def build(factory, targets, extra, **overrides):
    torch.manual_seed(0)
    settings = {"num_experts": 4, "max_rank": 4, "init_rank": 2.5, "init_weights": False, **extra, **overrides}
    return get_peft_model(factory(), RankMoEConfig(target_modules=targets, **settings))


def layers(model):
    return [m for m in model.modules() if isinstance(m, RankMoELayer)]


# --- the rank mask -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0.0, 0.4, 2.0, 2.7, 4.0, 5.5, -1.0])
def test_mask_values_and_gradient_rule(rank):
    max_rank, gamma = 4, 0.7
    r = torch.tensor([rank], requires_grad=True)
    mask = fractional_rank_mask(r, max_rank, gamma)
    clamped = min(max(rank, 0.0), max_rank)
    expected = [min(max(clamped - j, 0.0), 1.0) for j in range(max_rank)]
    assert mask[0].tolist() == pytest.approx(expected)
    upstream = torch.randn(1, max_rank)
    (mask * upstream).sum().backward()
    k = min(math.floor(clamped), max_rank - 1)  # at an integer rank the NEXT component gets the gradient
    assert r.grad.item() == pytest.approx(gamma * upstream[0, k].item())


def test_hard_mask_keeps_integer_ranks():
    mask = hard_rank_mask(torch.tensor([0.0, 3.0, 4.0]), 4)
    assert mask.tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


# --- the layer against DESIGN.md's formula --------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["token", "sequence"])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("ranks", [[0.0, 1.3, 2.5, 3.99], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 4.0, 4.0], [4.0, 0.5, 2.0, 3.2]])
def test_layer_output_matches_formula(router, top_k, ranks):
    model = build(MLP, ["lin1"], {"router": router, "top_k": top_k})
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.rankmoe_rank["default"].copy_(torch.tensor(ranks))
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), reference_layer(layer, x), rtol=1e-5, atol=1e-6)
    x2d = torch.randn(7, 12)  # 2-D input: one token per sample, never averaged across the batch
    torch.testing.assert_close(layer(x2d), reference_layer(layer, x2d), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_no_grad_path_matches_and_follows_rank_changes(router):
    model = build(MLP, ["lin1"], {"router": router, "top_k": 3})
    layer = model.base_model.model.lin1
    x = torch.randn(3, 5, 12)
    for ranks in ([0.0, 1.3, 2.5, 4.0], [3.0, 0.2, 4.0, 1.0]):
        with torch.no_grad():
            layer.rankmoe_rank["default"].copy_(torch.tensor(ranks))  # in place: the cache must notice
            fast = layer(x)
        torch.testing.assert_close(fast, reference_layer(layer, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast, layer(x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("searched", [True, False], ids=["searched", "discretized"])
def test_a_layer_whose_ranks_are_all_zero_adds_nothing(searched):
    """The rank search can switch a whole layer off; its forward (training and no-grad) is then the base layer's."""
    model = build(MLP, ["lin1"], {})
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.rankmoe_rank["default"].zero_()
    if not searched:
        model.discretize_ranks()
    x = torch.randn(3, 5, 12)
    base = layer.base_layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base)
    torch.testing.assert_close(layer(x), base)


def test_sequence_router_does_not_mix_samples():
    model = build(MLP, ["lin1"], {"router": "sequence"})
    layer = model.base_model.model.lin1
    x = torch.randn(4, 12)
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("routing", ["token", "sequence"])
@pytest.mark.parametrize("ranks", [[0.3, 1.0, 2.6, 4.0], [2.0, 3.5, 0.0, 3.0]])
def test_rank_gradient_is_gamma_times_interpolation_direction(ranks, routing):
    gamma = 0.37
    model = build(MLP, ["lin1"], {"router": routing}, rank_grad_scale=gamma)
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.rankmoe_rank["default"].copy_(torch.tensor(ranks))
    x = torch.randn(3, 5, 12)
    upstream = torch.randn(3, 5, 12)
    (layer(x) * upstream).sum().backward()

    A, B = layer.rankmoe_A["default"].detach(), layer.rankmoe_B["default"].detach()
    router = layer.rankmoe_router["default"]
    logits = x @ router.weight.detach().T + router.bias.detach()  # (3, 5, E)
    gates = torch.softmax(logits if routing == "token" else logits.mean(dim=1, keepdim=True), dim=-1)
    for e, rank in enumerate(ranks):
        k = min(math.floor(rank), 3)
        direction = reference_expert(x, A[e], B[e], k + 1) - reference_expert(x, A[e], B[e], k)  # g_ceil - g_floor
        expected = gamma * (upstream * layer.scaling["default"] * gates[..., e : e + 1] * direction).sum()
        assert layer.rankmoe_rank["default"].grad[e].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_factor_and_router_gradients_match_finite_differences(router):
    model = build(MLP, ["lin1"], {"router": router, "top_k": 3})
    layer = model.base_model.model.lin1.double()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    own = (layer.rankmoe_A["default"], layer.rankmoe_B["default"])
    own += (layer.rankmoe_router["default"].weight, layer.rankmoe_router["default"].bias)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in own)
    assert torch.autograd.gradcheck(lambda *t: _functional_delta(layer, x, *t), inputs, eps=1e-6, atol=1e-5)
    # the layer's own autograd graph gives the same gradients as the finite-difference-checked form
    upstream = torch.randn(2, 3, 12, dtype=torch.float64)
    (layer.adapter_delta("default", x) * upstream).sum().backward()
    expected = torch.autograd.grad((_functional_delta(layer, x, *inputs) * upstream).sum(), inputs)
    for param, want in zip(own, expected):
        torch.testing.assert_close(param.grad, want)


def _functional_delta(layer, x, A, B, W, b):
    """adapter_delta with the factors and router passed explicitly (so gradcheck can perturb them)."""
    saved = {}
    names = {"rankmoe_A": A, "rankmoe_B": B}
    for attr, value in names.items():
        saved[attr] = getattr(layer, attr)["default"]
        getattr(layer, attr)._parameters["default"] = value  # plain tensor in place of the Parameter
    router = layer.rankmoe_router["default"]
    saved_w, saved_b = router._parameters["weight"], router._parameters["bias"]
    router._parameters["weight"], router._parameters["bias"] = W, b
    try:
        return layer.adapter_delta("default", x)
    finally:
        for attr, value in saved.items():
            getattr(layer, attr)._parameters["default"] = value
        router._parameters["weight"], router._parameters["bias"] = saved_w, saved_b


# --- peft behaviour -------------------------------------------------------------------------------------------------


def test_init_weights_true_starts_equal_to_base():
    base = tiny_clip()
    inputs = make_inputs(tiny_clip)
    expected = run(base, inputs)
    model = get_peft_model(base, RankMoEConfig(target_modules=ATTENTION, num_experts_pattern={"out_proj": 2}))
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)
    q_proj = model.base_model.model.encoder.layers[0].self_attn.q_proj
    out_proj = model.base_model.model.encoder.layers[0].self_attn.out_proj
    assert q_proj.rankmoe_A["default"].shape == (6, 32, 8)
    assert q_proj.rankmoe_B["default"].shape == (6, 8, 32)
    assert out_proj.rankmoe_rank["default"].shape == (2,)
    assert q_proj.rankmoe_router["default"].out_features == 6
    assert q_proj.scaling["default"] == 8.0 / 8
    assert torch.all(q_proj.rankmoe_B["default"] == 0) and torch.all(q_proj.rankmoe_A["default"] != 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_only_adapter_parameters_change_in_a_step(case):
    _, factory, targets, extra = case
    model = build(factory, targets, extra)
    inputs = make_inputs(factory)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("rankmoe_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=0.05)
    loss = run(model, inputs).pow(2).mean() + model.rank_budget_loss()
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == ("rankmoe_" in name), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_disable_adapter_gives_base_output(case):
    _, factory, targets, extra = case
    torch.manual_seed(0)
    base_copy = factory()
    model = build(factory, targets, extra)
    inputs = make_inputs(factory)
    adapted = run(model, inputs)
    with model.disable_adapter():
        disabled = run(model, inputs)
    torch.testing.assert_close(disabled, run(base_copy.eval() if factory is not MLP else base_copy, inputs))
    assert not torch.allclose(adapted, disabled)
    torch.testing.assert_close(run(model, inputs), adapted)


def test_budget_loss_pulls_total_rank_toward_budget_and_ranks_stay_in_range():
    model = build(MLP, ["lin0", "lin1"], {}, rank_budget=4.0, budget_weight=1.0)
    start = model.total_rank().item()
    assert start > 4.0
    optimizer = torch.optim.SGD(model.rank_parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(200):
        optimizer.zero_grad()
        model.rank_budget_loss().backward()
        optimizer.step()
        model.clamp_ranks_()
    assert abs(model.total_rank().item() - 4.0) < 0.5 < abs(start - 4.0)
    for rank in model.rank_parameters():
        assert rank.min().item() >= 0.0 and rank.max().item() <= 4.0
    # the budget uses clamped ranks: pushing a rank past max_rank does not lower the loss further
    with torch.no_grad():
        model.rank_parameters()[0].fill_(100.0)
    assert model.total_rank().item() <= 4.0 * sum(r.numel() for r in model.rank_parameters())


def test_default_budget_is_initial_total():
    model = get_peft_model(MLP(), RankMoEConfig(target_modules=["lin0", "lin1"], num_experts=3, init_rank=2.0, max_rank=4))
    assert model.rank_budget() == pytest.approx(2.0 * 6)
    assert model.rank_budget_loss().item() == pytest.approx(0.0)


def test_discretize_rounds_half_up_freezes_and_uses_hard_masks():
    model = build(MLP, ["lin1"], {})
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.rankmoe_rank["default"].copy_(torch.tensor([0.49, 1.5, 2.5001, 3.2]))
    pattern = model.discretize_ranks()
    assert pattern == {"lin1": [0, 2, 3, 3]}
    assert model.rank_summary() == {"lin1": [0.0, 2.0, 3.0, 3.0]}
    assert model.peft_config["default"].rank_pattern == pattern
    assert not layer.rankmoe_rank["default"].requires_grad
    model.set_adapter("default")  # peft re-enables gradients here; frozen ranks must stay frozen
    assert not layer.rankmoe_rank["default"].requires_grad
    assert layer.rankmoe_A["default"].requires_grad
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), reference_layer(layer, x), rtol=1e-5, atol=1e-6)
    assert model.rank_parameters()[0] is layer.rankmoe_rank["default"]


def test_multiple_adapters_set_and_delete():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), RankMoEConfig(target_modules=["lin1"], num_experts=2, init_weights=False))
    model.add_adapter("other", RankMoEConfig(target_modules=["lin1"], num_experts=3, init_weights=False))
    layer = model.base_model.model.lin1
    x = torch.randn(4, 10)
    out_default = model(x)
    assert not layer.rankmoe_A["other"].requires_grad  # an added adapter is not trainable until selected
    model.set_adapter("other")
    out_other = model(x)
    assert layer.rankmoe_A["other"].requires_grad and not layer.rankmoe_A["default"].requires_grad
    assert layer.rankmoe_A["other"].shape[0] == 3 and not torch.allclose(out_default, out_other)
    assert len(model.rank_parameters()) == 1 and model.rank_parameters()[0].numel() == 3
    model.delete_adapter("other")
    assert "other" not in layer.rankmoe_A and "other" not in layer.scaling and "other" not in layer.rank_frozen
    model.set_adapter("default")
    torch.testing.assert_close(model(x), out_default)


def test_merge_and_unload_raises_clear_error_and_unload_works():
    model = build(MLP, ["lin1"], {})
    with pytest.raises(ValueError, match="router"):
        model.merge_and_unload()
    base = model.unload()
    assert not any(isinstance(m, RankMoELayer) for m in base.modules())


def test_ranks_stay_float32_on_bf16_model():
    base = MLP().to(torch.bfloat16)
    for autocast in (True, False):
        model = get_peft_model(MLP().to(torch.bfloat16), RankMoEConfig(target_modules=["lin1"]), autocast_adapter_dtype=autocast)
        layer = model.base_model.model.lin1
        assert layer.rankmoe_rank["default"].dtype == torch.float32
        out = model(torch.randn(2, 10, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert layer.rankmoe_rank["default"].grad is not None
    del base


def test_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    rankmoe_peft.register()
    rankmoe_peft.register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.RANKMOE] is rankmoe_peft.RankMoEModel


# --- persistence ----------------------------------------------------------------------------------------------------

RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import rankmoe_peft  # registers "rankmoe" in this fresh process
    from peft import PeftModel, PeftConfig
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModel
    base_dir, adapter_dir, io_path, out_path = sys.argv[1:5]
    assert PeftConfig.from_pretrained(adapter_dir).peft_type == "RANKMOE"
    base = CLIPVisionModel.from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=len(sys.argv) > 5)
    pixel_values = load_file(io_path)["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixel_values).last_hidden_state
    q = model.base_model.model.encoder.layers[0].self_attn.q_proj
    save_file({"out": out, "A": q.rankmoe_A["default"].detach(),
               "rank_grad": torch.tensor([float(r.requires_grad) for r in model.rank_parameters()])}, out_path)
    """
)


def reload_in_fresh_process(tmp_path: Path, base_dir: Path, adapter_dir: Path, pixel_values, trainable=False):
    io_path, out_path = tmp_path / "inputs.safetensors", tmp_path / f"out-{adapter_dir.name}.safetensors"
    save_file({"pixel_values": pixel_values}, io_path)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    args = [sys.executable, str(script), str(base_dir), str(adapter_dir), str(io_path), str(out_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(args + (["trainable"] if trainable else []), check=True, env=env, capture_output=True)
    return load_file(out_path)


def test_save_reload_fresh_process_and_discretized_file_shrinks(tmp_path):
    base = tiny_clip()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    config = RankMoEConfig(target_modules=ATTENTION, num_experts_pattern={"out_proj": 2}, max_rank=8, init_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # ranks spread over [0, 6] so that truncation has something to cut
        for i, rank in enumerate(model.rank_parameters()):
            rank.copy_(torch.linspace(0.2, 5.6 - 0.4 * (i % 3), rank.numel()))
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        searched = model(pixel_values=pixel_values).last_hidden_state

    model.save_pretrained(tmp_path / "searched")
    saved = json.loads((tmp_path / "searched" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RANKMOE" and saved["num_experts_pattern"] == {"out_proj": 2}
    reloaded = reload_in_fresh_process(tmp_path, base_dir, tmp_path / "searched", pixel_values)
    torch.testing.assert_close(reloaded["out"], searched, rtol=1e-5, atol=1e-5)

    pattern = model.discretize_ranks()
    with torch.no_grad():
        discrete = model(pixel_values=pixel_values).last_hidden_state
    model.save_pretrained(tmp_path / "discrete")
    size_searched = (tmp_path / "searched" / "adapter_model.safetensors").stat().st_size
    size_discrete = (tmp_path / "discrete" / "adapter_model.safetensors").stat().st_size
    assert size_discrete < 0.85 * size_searched
    stored = load_file(tmp_path / "discrete" / "adapter_model.safetensors")
    q_key = next(k for k in stored if k.endswith("layers.0.self_attn.q_proj.rankmoe_A"))
    assert stored[q_key].shape[-1] == max(pattern["encoder.layers.0.self_attn.q_proj"])

    reloaded = reload_in_fresh_process(tmp_path, base_dir, tmp_path / "discrete", pixel_values, trainable=True)
    torch.testing.assert_close(reloaded["out"], discrete, rtol=1e-5, atol=1e-5)
    assert reloaded["A"].shape[-1] == max(pattern["encoder.layers.0.self_attn.q_proj"])  # shapes rebuilt
    assert reloaded["rank_grad"].sum().item() == 0  # is_trainable=True does not unfreeze discretized ranks
    # the in-memory (full-width) model also round-trips its own state dict (Accelerate's save/load_state)
    model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values).last_hidden_state, discrete)


def test_push_to_hub_uploads_adapter_files(tmp_path, monkeypatch):
    import huggingface_hub
    import transformers.utils.hub as hub

    uploaded = {}

    class Repo:
        repo_id = "user/tiny-rankmoe"

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as handle:
                uploaded[op.path_in_repo] = handle.read()
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None: huggingface_hub.ModelCard("---\n---\n")
    )
    model = build(MLP, ["lin1"], {})
    model.push_to_hub("user/tiny-rankmoe")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded)
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "RANKMOE"
    path = tmp_path / "pushed.safetensors"
    path.write_bytes(uploaded["adapter_model.safetensors"])
    weights = load_file(path)
    assert any(k.endswith("lin1.rankmoe_A") for k in weights) and any(k.endswith("lin1.rankmoe_rank") for k in weights)


# --- bad inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_rank": 9.0}, "init_rank"),
        ({"init_rank": -0.5}, "init_rank"),
        ({"num_experts": 0}, "num_experts"),
        ({"router": "expert_choice"}, "router"),
        ({"top_k": 0}, "top_k"),
        ({"max_rank": 0}, "max_rank"),
        ({"num_experts_pattern": {"out_proj": 0}}, "num_experts_pattern"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankMoEConfig(target_modules=["q_proj"], **kwargs)


def test_non_linear_target_is_rejected():
    with pytest.raises(ValueError, match="nn.Linear"):
        get_peft_model(MLP(), RankMoEConfig(target_modules=["act"]))


def test_loading_adapter_saved_for_other_shapes(tmp_path):
    model = get_peft_model(MLP(width=12), RankMoEConfig(target_modules=["lin1"], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"lin1\.rankmoe_A.*shape"):
        PeftModel.from_pretrained(MLP(width=16), tmp_path / "adapter")


def test_loading_corrupted_safetensors(tmp_path):
    model = get_peft_model(MLP(), RankMoEConfig(target_modules=["lin1"]))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download or a write cut short
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a valid safetensors file"):
        PeftModel.from_pretrained(MLP(), tmp_path / "adapter")
