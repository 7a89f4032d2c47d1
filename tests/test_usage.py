"""Router statistics, the collapse check, the usage heat map and the load-balancing loss, against direct computations."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_clip
from peft import get_peft_model

from rankmoe_peft import ExpertUsage, RankMoEConfig, RouterRecorder, load_balancing_loss
from unistd_hf.usage import collapse_warning, collapsed_layers, plot_expert_usage


def _model(router: str = "token", experts: int = 3):
    config = RankMoEConfig(target_modules=["q_proj"], num_experts=experts, max_rank=4, init_rank=2.0, router=router,
                           init_weights=False)
    return get_peft_model(tiny_clip(), config)


def _router_inputs(model) -> dict[str, torch.Tensor]:
    """The input of every adapted q_proj, captured by our own hooks (the router reads exactly this)."""
    seen = {}
    for name, module in model.get_base_model().named_modules():
        if name.endswith("q_proj") and hasattr(module, "rankmoe_router"):
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach()))
    return seen


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_usage_statistics_equal_a_direct_computation(router):
    model = _model(router)
    inputs = _router_inputs(model)
    usage = ExpertUsage()
    expected: dict[str, list[torch.Tensor]] = {}  # layer -> the gates (units, E) of each batch, computed here
    with RouterRecorder(model.get_base_model()) as recorder, torch.no_grad():
        for _ in range(2):  # two batches: the statistics accumulate over both
            model(pixel_values=torch.rand(3, 3, 32, 32))
            usage.update(recorder)
            for name, x in inputs.items():
                router_layer = model.get_base_model().get_submodule(name).rankmoe_router["default"]
                if router == "sequence":
                    x = x.mean(dim=1)  # (B, in): one decision per sequence
                logits = x.reshape(-1, x.shape[-1]) @ router_layer.weight.T + router_layer.bias
                expected.setdefault(name, []).append(torch.softmax(logits, dim=-1))
    mean, std = usage.mean(), usage.std()
    assert set(mean) == set(expected) and len(mean) == 2
    for name, batches in expected.items():
        gates = torch.cat(batches).double()  # (units, E)
        assert gates.shape[0] == 2 * 3 * (1 if router == "sequence" else 17)  # batches x clips (x 16 patches + CLS)
        assert mean[name] == pytest.approx(gates.mean(0).tolist(), abs=1e-6)
        assert std[name] == pytest.approx(gates.std(0, unbiased=False).tolist(), abs=1e-6)
        assert sum(mean[name]) == pytest.approx(1.0)


def test_collapse_warning_fires_only_for_a_router_forced_onto_one_expert(tmp_path):
    model = _model()
    base = model.get_base_model()

    def usage_per_task():
        usage = {"mean": {}, "std": {}}
        with RouterRecorder(base) as recorder, torch.no_grad():
            for task in ("a", "b"):
                stats = ExpertUsage()
                model(pixel_values=torch.rand(2, 3, 32, 32))
                stats.update(recorder)
                usage["mean"][task], usage["std"][task] = stats.mean(), stats.std()
        return usage

    with torch.no_grad():  # routers near uniform (init_weights=False draws them with std 1, nearly one-hot)
        for name, param in model.named_parameters():
            if "rankmoe_router" in name:
                param.mul_(0.01)
    balanced = usage_per_task()
    assert collapsed_layers(balanced) == [] and collapse_warning(balanced) is None
    forced = base.encoder.layers[1].self_attn.q_proj.rankmoe_router["default"]
    with torch.no_grad():
        forced.weight.zero_()
        forced.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))  # every token to expert 1
    collapsed = usage_per_task()
    assert collapsed_layers(collapsed) == ["encoder.layers.1.self_attn.q_proj"]
    assert "L1 q_proj" in collapse_warning(collapsed)
    path = plot_expert_usage(collapsed, model.rank_summary(), tmp_path / "expert_usage.png")
    assert path.stat().st_size > 0


def test_load_balancing_loss_equals_its_formula_and_trains_only_the_routers():
    model = _model(experts=4)
    with RouterRecorder(model.get_base_model()) as recorder:
        model(pixel_values=torch.rand(2, 3, 32, 32))
        loss = load_balancing_loss(recorder)
        expected = []
        for logits in recorder.logits.values():
            probs = torch.softmax(logits.detach(), dim=-1)
            counts = torch.tensor([(probs.argmax(-1) == e).sum().item() for e in range(4)], dtype=torch.float32)
            expected.append(4 * float((counts / probs.shape[0] * probs.mean(0)).sum()))
        assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
        assert 1.0 <= loss.item() <= 4.0
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "rankmoe_router" in n)
    # the last adapted layer's experts and ranks get nothing (earlier layers' experts shape the later routers' inputs)
    last = [g for n, g in grads.items() if "layers.1." in n and "rankmoe_router" not in n]
    assert last and all(g is None for g in last)
    assert not any(m._forward_hooks for m in model.modules() if hasattr(m, "rankmoe_router"))  # closed: no hooks


def test_switched_off_the_balancing_loss_changes_no_gradient():
    """The loop adds `weight * loss` only with a weight > 0; at weight 0 the gradient is the task loss's alone."""
    model = _model()
    pixels = torch.rand(2, 3, 32, 32)
    model(pixel_values=pixels).last_hidden_state.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with RouterRecorder(model.get_base_model()) as recorder:
        task = model(pixel_values=pixels).last_hidden_state.square().mean()
        (task + 0.0 * load_balancing_loss(recorder)).backward()
    for name, grad in plain.items():
        assert torch.equal(grad, dict(model.named_parameters())[name].grad), name


def test_training_adds_the_balancing_loss_only_when_asked(tmp_path):
    """--load_balancing_weight > 0 logs `loss/balance` and moves the routers differently; 0 adds nothing."""
    from unistd_hf.training import TrainingArguments, train

    def run(weight: float, name: str) -> tuple[list[dict], dict]:
        args = TrainingArguments(
            tasks=["city_traffic"], output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), backbone="random",
            backbone_width=32, backbone_layers=1, backbone_heads=2, hidden_channels=8, num_train=8, num_train_per_task="",
            num_validation=2, num_test=2, batch_size=4, epochs=1, rank_search_epochs=1, log_every=1, cpu=True,
            load_balancing_weight=weight)
        report = train(args)
        logs = [json.loads(line) for line in (tmp_path / name / "logs.jsonl").read_text().splitlines()]
        return logs, report

    off, report_off = run(0.0, "off")
    on, report_on = run(0.5, "on")
    assert all("loss/balance" not in record for record in off)
    assert all(1.0 <= record["loss/balance"] <= 6.0 for record in on)
    assert report_on["expert_usage"]["mean"] != report_off["expert_usage"]["mean"]  # the routers trained differently
    assert report_on["tasks"]["city_traffic"]["baseline"] == report_off["tasks"]["city_traffic"]["baseline"]
