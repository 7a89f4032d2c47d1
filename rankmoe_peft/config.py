"""`RankMoEConfig`: the configuration of a rank-adaptive mixture of LoRA experts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["RankMoEConfig", "ROUTERS"]

ROUTERS = ("token", "sequence")


def check_safetensors_file(path: str) -> None:
    """Raise a ValueError naming `path` if it is not a complete safetensors file (the header covers the data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); it was probably cut short while being written or "
            "downloaded. Save or download the adapter again."
        ) from error


def match_module_name(pattern: str, name: str) -> bool:
    """peft's matching rule for one key: exact name, `.`-suffix, or a full regex match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


@dataclass
class RankMoEConfig(PeftConfig):
    """Configuration of RankMoE: E LoRA experts per adapted Linear, a router, and one trainable rank per expert.

    The layer computes `y = base(x) + scaling * sum_e gate_e(x) * (x @ A_e) * mask(r_e) @ B_e` with
    `scaling = lora_alpha / max_rank` (constant: a rank change does not rescale the other experts).
    See `rankmoe_peft.functional` for the rank mask and its gradient.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or `.`-suffix) or one regex of the nn.Linear layers to adapt, "
            "e.g. ['q_proj', 'k_proj', 'v_proj', 'out_proj']; nn.Linear and transformers' Conv1D (GPT-2) layers. "
            "None uses the attention projections of known model types (CLIP, SigLIP, ViT, DINOv2, GPT-2; "
            "`rankmoe_peft.model.DEFAULT_TARGET_MODULES`)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Unsupported by RankMoE (kept for peft's target matching); must stay None."}
    )
    num_experts: int = field(default=6, metadata={"help": "E, the number of LoRA experts per adapted layer."})
    max_rank: int = field(default=8, metadata={"help": "R, the largest rank an expert can reach (columns of A)."})
    init_rank: float = field(default=4.5, metadata={"help": "Initial continuous rank of every expert, in [0, max_rank]."})
    lora_alpha: float = field(default=8.0, metadata={"help": "Scale numerator: scaling = lora_alpha / max_rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input."})
    router: str = field(
        default="token",
        metadata={
            "help": "'token': softmax over experts per token; 'sequence': one softmax per sequence from its mean "
            "token (a 2-D input (batch, features) is one token per sample)."
        },
    )
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Keep only the k largest gates per token and renormalise; None keeps all."}
    )
    rank_grad_scale: float = field(
        default=1.0, metadata={"help": "gamma of the rank gradient: dL/dr = gamma * <dL/dy, g_ceil - g_floor>."}
    )
    rank_budget: Optional[float] = field(
        default=None,
        metadata={
            "help": "C, the target total rank of all experts of all adapted layers. None: the initial total "
            "(init_rank times the number of experts), i.e. the search redistributes capacity without growing it."
        },
    )
    budget_weight: float = field(default=1.0, metadata={"help": "beta of the budget loss beta * |C - sum(ranks)|."})
    num_experts_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module-name suffix or regex -> expert count for matching layers, e.g. {'out_proj': 2}."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: B at zero so the adapted model starts equal to the base model. False: random non-zero "
            "B, router and ranks (for tests whose checks must not pass trivially)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save (peft's ModulesToSaveWrapper)."}
    )
    rank_pattern: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Set by `discretize_ranks()`: module name -> integer rank per expert. Loading an adapter with a "
            "rank pattern rebuilds A and B truncated to each layer's largest rank, with frozen ranks."
        },
    )
    base_model_config: Optional[dict[str, Any]] = field(
        default=None,
        metadata={
            "help": "Optional config dict of the base model, for models that are not on the hub (UniSTD stores its "
            "task specs here so that the adapter directory is enough to rebuild the model)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RANKMOE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_parameters is not None:
            raise ValueError("RankMoE adapts nn.Linear modules only; target_parameters must be None")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {self.num_experts!r}")
        if not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"max_rank must be an int >= 1, got {self.max_rank!r}")
        if not 0.0 <= float(self.init_rank) <= self.max_rank:
            raise ValueError(f"init_rank must lie in [0, max_rank={self.max_rank}], got {self.init_rank!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if self.rank_budget is not None and self.rank_budget < 0:
            raise ValueError(f"rank_budget must be None or >= 0, got {self.rank_budget!r}")
        if not self.rank_grad_scale > 0:
            raise ValueError(f"rank_grad_scale (gamma) must be > 0, got {self.rank_grad_scale!r}: a negative value "
                             "reverses the rank gradient")
        if self.budget_weight < 0:
            raise ValueError(f"budget_weight must be >= 0, got {self.budget_weight!r}")
        for pattern, count in self.num_experts_pattern.items():
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"num_experts_pattern[{pattern!r}] must be an int >= 1, got {count!r}")
        for name, ranks in self.rank_pattern.items():
            if any((not float(r).is_integer()) or not 0 <= r <= self.max_rank for r in ranks):
                raise ValueError(f"rank_pattern[{name!r}] must hold integers in [0, {self.max_rank}], got {ranks!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """peft's loader, plus a check of a local adapter's weights file: a truncated or corrupted file then
        fails here with its path named, instead of deep inside the weight loading."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        weights = os.path.join(str(pretrained_model_name_or_path), subfolder or "", "adapter_model.safetensors")
        if os.path.isfile(weights):
            check_safetensors_file(weights)
        return config

    def experts_for(self, module_name: str) -> int:
        """Expert count of the module: the first matching `num_experts_pattern` entry, else `num_experts`."""
        for pattern, count in self.num_experts_pattern.items():
            if match_module_name(pattern, module_name):
                return count
        return self.num_experts
