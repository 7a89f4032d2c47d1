"""The paper's rank search as one object, for any training loop (and a `transformers.Trainer` callback).

While searching, each optimizer step of the weights is paired with one `RankSearch.step()` on the ranks:

    rank gradient  = normalise(task gradient) + budget gradient
    task gradient  = dL/dr by the rule of `rankmoe_peft.functional` (gamma * <dL/dy, g_ceil - g_floor>)
    normalise(v)   = v / rms(v)  over all ranks of the adapter   (skipped with normalize_grad=False)
    budget gradient = d/dr of beta * |C - sum(r)|  = beta * sign(sum(r) - C)  for every r inside [0, R]

then SGD with Nesterov momentum (lr 0.05, momentum 0.9, as in the paper) and a clamp to [0, R]. When the
search ends, `finish()` rounds the ranks half up, freezes them and truncates the experts (`discretize_ranks`).

Why the normalisation: the task gradient of a rank is proportional to the loss scale and to the size of the
experts' output. With a per-pixel MSE it is ~1e-7, so SGD at lr 0.05 leaves ranks still unless gamma is tuned
per model and loss. Dividing by the RMS over all ranks keeps the paper's rule for the *direction* (which ranks
grow, which shrink, and by how much relative to each other) and makes one step move a rank by about `lr`,
whatever the loss scale; the budget term, whose gradient is O(beta) by construction, then acts at the same scale.
At initialisation (B = 0) the task gradient is exactly zero and stays zero after normalisation.

Why the budget gradient is applied here and not through autograd: it keeps the task part separable for the
normalisation, and loops that cannot change the loss (`transformers.Trainer`) run the identical search.
`loss()` returns the budget term's *value* (for the total loss you log); adding it to your loss is harmless,
it carries no gradient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .model import RankMoEModel

__all__ = ["RankSearch", "RankSearchCallback"]

STATE_WEIGHTS = "rank_search.safetensors"
STATE_JSON = "rank_search.json"


def _tuner(model: Any) -> RankMoEModel:
    """The RankMoE tuner behind a PeftModel (or the tuner itself), unwrapping DDP/Accelerate wrappers."""
    model = getattr(model, "module", model)
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, RankMoEModel):
            return candidate
    raise ValueError(
        f"RankSearch needs a peft model with RankMoE adapters (get_peft_model(model, RankMoEConfig(...))), "
        f"got {type(model).__name__}"
    )


class RankSearch:
    """Searches the continuous ranks of a RankMoE adapter, then discretizes them.

    Args:
        model: a `PeftModel` (or `RankMoEModel`) with a RankMoE adapter.
        lr: SGD learning rate of the ranks.
        momentum: SGD momentum (Nesterov when `nesterov`).
        nesterov: use Nesterov momentum, as the paper does.
        search_steps: `step()` calls after which `finish()` runs by itself; None: the caller calls `finish()`.
        normalize_grad: divide the task part of the rank gradient by its RMS over all ranks (module docstring).
        adapter_name: the adapter searched; None: the active one.
    """

    def __init__(
        self,
        model: Any,
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        search_steps: int | None = None,
        normalize_grad: bool = True,
        adapter_name: str | None = None,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"RankSearch needs lr > 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
        if search_steps is not None and search_steps < 0:
            raise ValueError(f"search_steps must be None or >= 0, got {search_steps}")
        self.tuner = _tuner(model)
        self.adapter_name = self.tuner._adapter(adapter_name)
        self.config = self.tuner.peft_config[self.adapter_name]
        self.ranks = self.tuner.rank_parameters(self.adapter_name)
        self.optimizer = torch.optim.SGD(self.ranks, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        self.search_steps = search_steps
        self.normalize_grad = normalize_grad
        self.steps = 0
        self.finished = bool(self.config.rank_pattern) or not any(r.requires_grad for r in self.ranks)
        if search_steps == 0 and not self.finished:
            self.finish()

    @property
    def searching(self) -> bool:
        return not self.finished

    def loss(self) -> torch.Tensor:
        """beta * |C - sum of ranks| while searching, 0 once finished (a value: `step()` applies its gradient)."""
        device = self.ranks[0].device
        if self.finished:
            return torch.zeros((), device=device)
        with torch.no_grad():
            return self.tuner.rank_budget_loss(self.adapter_name)

    @torch.no_grad()
    def step(self) -> None:
        """One rank update from the gradients in `.grad` (a no-op once finished), then clamp to [0, max_rank]."""
        if self.finished:
            return
        max_rank = float(self.config.max_rank)
        task = [r.grad if r.grad is not None else torch.zeros_like(r) for r in self.ranks]
        if self.normalize_grad:
            flat = torch.cat([g.flatten() for g in task])  # (total experts,)
            scale = flat.square().mean().sqrt().clamp_min(torch.finfo(flat.dtype).tiny)  # all zero stays zero
            task = [g / scale for g in task]
        excess = self.tuner.total_rank(self.adapter_name) - self.tuner.rank_budget(self.adapter_name)
        push = self.config.budget_weight * torch.sign(excess)  # d beta|C - sum r| / d r for r inside [0, R]
        for rank, grad in zip(self.ranks, task):
            inside = ((rank >= 0) & (rank <= max_rank)).to(rank.dtype)
            rank.grad = grad + push * inside
        self.optimizer.step()
        self.tuner.clamp_ranks_(self.adapter_name)
        self.zero_grad()
        self.steps += 1
        if self.search_steps is not None and self.steps >= self.search_steps:
            self.finish()

    def zero_grad(self) -> None:
        for rank in self.ranks:
            rank.grad = None

    def finish(self) -> dict[str, list[int]]:
        """Round half up, freeze and switch to hard masks (`discretize_ranks`); returns the rank pattern."""
        self.zero_grad()
        pattern = self.tuner.discretize_ranks(self.adapter_name)
        self.finished = True
        return pattern

    def summary(self) -> dict[str, list[float]]:
        return self.tuner.rank_summary(self.adapter_name)

    # --- checkpointing: `accelerator.register_for_checkpointing(search)` uses these two -----------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "finished": self.finished, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the search; the ranks themselves are model parameters and come with the model's weights."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        if state["finished"] and not self.finished:
            self.finish()

    def save(self, directory: str | os.PathLike) -> None:
        """The state as safetensors (momentum buffers) + JSON, for loops that checkpoint folders themselves."""
        state = self.state_dict()
        buffers = {str(i): s["momentum_buffer"].contiguous() for i, s in state["optimizer"]["state"].items()
                   if s.get("momentum_buffer") is not None}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(buffers, str(directory / STATE_WEIGHTS))
        meta = {"steps": state["steps"], "finished": state["finished"], "param_groups": state["optimizer"]["param_groups"]}
        (directory / STATE_JSON).write_text(json.dumps(meta))

    def load(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        missing = [name for name in (STATE_WEIGHTS, STATE_JSON) if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{str(directory)!r} holds no rank search state (missing {missing})")
        meta = json.loads((directory / STATE_JSON).read_text())
        buffers = load_file(str(directory / STATE_WEIGHTS))
        optimizer = {"state": {int(i): {"momentum_buffer": b} for i, b in buffers.items()}, "param_groups": meta["param_groups"]}
        self.load_state_dict({"steps": meta["steps"], "finished": meta["finished"], "optimizer": optimizer})


class RankSearchCallback(TrainerCallback):
    """The rank search inside `transformers.Trainer`.

    Before each optimizer step it runs `search.step()` and clears the rank gradients, so the Trainer's own
    optimizer (which holds every trainable parameter) skips the ranks; with `search_steps` the search finishes
    by itself. Checkpoints get the search state beside the Trainer's (`rank_search.*` in `checkpoint-N/`), and
    `trainer.train(resume_from_checkpoint=...)` restores it.

        search = RankSearch(peft_model, search_steps=100)
        trainer = Trainer(model=peft_model, args=..., train_dataset=..., callbacks=[RankSearchCallback(search)])
    """

    def __init__(self, search: RankSearch) -> None:
        self.search = search

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming: the Trainer has loaded checkpoint-N and its state already
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (checkpoint / STATE_JSON).is_file():
                self.search.load(checkpoint)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.search.step()  # also clears the rank gradients: the Trainer's optimizer then leaves ranks alone

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.search.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")
