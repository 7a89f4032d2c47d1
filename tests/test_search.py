"""RankSearch: the budget gradient and the normalised rank gradient against direct computations, its defaults on
real loss scales, checkpoint round trips, and the transformers.Trainer callback."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from helpers import ATTENTION, MLP, tiny_clip, tiny_clip_config
from rankmoe_peft import RankMoEConfig, RankSearch, RankSearchCallback

LR, MOMENTUM = 0.05, 0.9
FIRST_STEP = LR * (1 + MOMENTUM)  # Nesterov SGD's first update is lr * (1 + momentum) * grad


def mlp_model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    settings = dict(target_modules=["lin0", "lin1"], num_experts=3, max_rank=4, init_rank=2.5, init_weights=False)
    return get_peft_model(MLP(), RankMoEConfig(**{**settings, **overrides}))


def ranks_of(search: RankSearch) -> torch.Tensor:
    return torch.cat([r.detach().clone() for r in search.ranks])


def task_loss(model: nn.Module, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 10, generator=g), torch.randn(16, 3, generator=g)
    return scale * (model(x) - y).pow(2).mean()


def test_budget_gradient_is_applied_by_step_when_the_task_gives_none():
    model = mlp_model(rank_budget=10.0, budget_weight=0.5)  # initial total 6 * 2.5 = 15 > 10
    search = RankSearch(model)
    before = ranks_of(search)
    assert search.loss().item() == pytest.approx(0.5 * abs(10.0 - before.sum().item()))
    assert not search.loss().requires_grad  # a value to log: adding it to a loss cannot double the gradient
    search.step()  # no backward: the task gradient is zero, only the budget acts
    assert torch.allclose(ranks_of(search), before - FIRST_STEP * 0.5, atol=1e-6)


def test_normalised_step_follows_the_paper_gradient_direction():
    model = mlp_model(budget_weight=0.0)
    search = RankSearch(model)
    task_loss(model).backward()
    raw = torch.cat([r.grad.clone() for r in search.ranks])  # gamma * <dL/dy, g_ceil - g_floor> per expert
    before = ranks_of(search)
    search.step()
    expected = before - FIRST_STEP * raw / raw.square().mean().sqrt()
    assert torch.allclose(ranks_of(search), expected.clamp(0, 4), atol=1e-5)


def test_rank_search_does_not_depend_on_the_loss_scale():
    trajectories = []
    for scale in (1.0, 1e-6):
        model = mlp_model()
        search = RankSearch(model)
        for step in range(5):
            (task_loss(model, scale, seed=step) + search.loss()).backward()
            search.step()
            model.zero_grad()
        trajectories.append(ranks_of(search))
    assert torch.allclose(*trajectories, atol=1e-4)
    raw = mlp_model(budget_weight=0.0)
    raw_search = RankSearch(raw, normalize_grad=False)
    before = ranks_of(raw_search)
    task_loss(raw, 1e-6).backward()
    raw_search.step()
    assert (ranks_of(raw_search) - before).abs().max() < 1e-4  # without normalisation a small loss barely moves ranks


def test_readme_example_defaults_move_ranks_by_order_one():
    """The README's peft example (default RankMoEConfig and RankSearch): a regression loss on a CLIP encoder."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), RankMoEConfig(target_modules=ATTENTION, num_experts_pattern={"out_proj": 2}))
    search = RankSearch(model, search_steps=40)
    weights = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and all(p is not r for r in search.ranks)], lr=1e-3)
    start = ranks_of(search)
    pixels, target = torch.randn(4, 3, 32, 32), torch.randn(4, 17, 32)
    for _ in range(40):
        loss = (model(pixel_values=pixels).last_hidden_state - target).pow(2).mean() + search.loss()
        loss.backward()
        weights.step()
        search.step()
        weights.zero_grad()
    moved = (ranks_of(search) - start).abs()
    assert moved.max() >= 1.0, moved
    assert search.finished and all(float(r).is_integer() for r in ranks_of(search))  # finished at search_steps
    budget = model.rank_budget()
    assert abs(ranks_of(search).sum().item() - budget) <= 0.1 * budget


def test_unistd_defaults_move_ranks_by_order_one(clip_dir):
    from unistd_hf import TaskSpec, UniSTDConfig, get_unistd_peft_model

    spec = TaskSpec("digits", 4, 4, 1, 16, 16, num_downsample=1)
    model = get_unistd_peft_model(UniSTDConfig(backbone=clip_dir, tasks=[spec], hidden_channels=8))
    search = RankSearch(model)
    weights = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and all(p is not r for r in search.ranks)], lr=3e-3)
    start = ranks_of(search)
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(4, 8, 1, 16, 16, generator=g)
    for _ in range(30):
        out = model(pixel_values=frames[:, :4], task="digits", labels=frames[:, 4:])  # a per-pixel MSE of ~0.1
        (out.loss + search.loss()).backward()
        weights.step()
        search.step()
        weights.zero_grad()
    assert (ranks_of(search) - start).abs().max() >= 0.5


def train_steps(model, search, weights, steps, first):
    for step in range(first, first + steps):
        (task_loss(model, seed=step) + search.loss()).backward()
        weights.step()
        search.step()
        weights.zero_grad()


@pytest.mark.parametrize("via", ["state_dict", "folder"])
def test_checkpoint_mid_search_resumes_to_the_same_ranks(tmp_path, via):
    def build():
        model = mlp_model(init_weights=True)
        search = RankSearch(model, search_steps=7)
        weights = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and all(p is not r for r in search.ranks)], lr=1e-2)
        return model, search, weights

    model, search, weights = build()
    train_steps(model, search, weights, 10, first=0)
    uninterrupted = ranks_of(search)

    model, search, weights = build()
    train_steps(model, search, weights, 4, first=0)
    model_state, weight_state = copy.deepcopy(model.state_dict()), copy.deepcopy(weights.state_dict())
    if via == "folder":
        search.save(tmp_path)
    else:
        search_state = copy.deepcopy(search.state_dict())
    model, search, weights = build()
    model.load_state_dict(model_state)
    weights.load_state_dict(weight_state)
    search.load(tmp_path) if via == "folder" else search.load_state_dict(search_state)
    assert search.steps == 4 and search.searching
    train_steps(model, search, weights, 6, first=4)
    assert search.finished
    assert torch.equal(ranks_of(search), uninterrupted)


def test_finish_discretizes_freezes_and_ends_the_budget():
    model = mlp_model()
    search = RankSearch(model)
    pattern = search.finish()
    assert not search.searching and search.loss().item() == 0.0
    before = ranks_of(search)
    search.step()
    assert torch.equal(ranks_of(search), before)
    assert all(not r.requires_grad for r in search.ranks) and set(pattern) == set(search.summary())
    with pytest.raises(ValueError, match="RankMoE adapters"):
        RankSearch(MLP())


class Regression(nn.Module):
    """A model in the Trainer's convention: forward(x, labels) -> {"loss": ...}."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": (out - labels).pow(2).mean(), "logits": out}


def run_trainer(output_dir, resume=None):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(Regression(), RankMoEConfig(target_modules=["net.lin0", "net.lin1"], num_experts=3,
                                                       max_rank=4, init_rank=2.5))
    search = RankSearch(model, search_steps=6)
    g = torch.Generator().manual_seed(0)
    data = [{"x": x, "labels": y} for x, y in zip(torch.randn(64, 10, generator=g), torch.randn(64, 3, generator=g))]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
                             save_steps=4, save_strategy="steps", logging_steps=5, report_to=[], use_cpu=True,
                             remove_unused_columns=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RankSearchCallback(search)])
    start = ranks_of(search)
    trainer.train(resume_from_checkpoint=resume)
    return start, search


def test_trainer_callback_searches_discretizes_and_resumes(tmp_path):
    start, search = run_trainer(tmp_path / "a")
    assert search.finished and search.steps == 6  # discretized at the configured step
    final = ranks_of(search)
    assert (final - start).abs().max() >= 0.5 and all(float(r).is_integer() for r in final)
    assert (tmp_path / "a" / "checkpoint-4" / "rank_search.json").is_file()

    run_trainer(tmp_path / "b")  # an identical run, then resumed from its mid-search checkpoint
    _, resumed = run_trainer(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4"))
    assert resumed.finished and torch.equal(ranks_of(resumed), final)
