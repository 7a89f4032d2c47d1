"""rankmoe_peft: rank-adaptive mixtures of LoRA experts (UniSTD's RankMoE) as a peft method.

`import rankmoe_peft` registers the method "rankmoe" with peft, so the usual peft calls work:

    from peft import get_peft_model
    from rankmoe_peft import RankMoEConfig
    model = get_peft_model(base_model, RankMoEConfig(target_modules=["q_proj", "v_proj"]))
"""

from .registration import register

register()

from .config import RankMoEConfig  # noqa: E402
from .functional import FractionalRankMask, fractional_rank_mask, hard_rank_mask, route  # noqa: E402
from .layer import Linear, RankMoELayer  # noqa: E402
from .model import RankMoEModel  # noqa: E402
from .routing import ExpertUsage, RouterRecorder, load_balancing_loss  # noqa: E402
from .search import RankSearch, RankSearchCallback  # noqa: E402

__all__ = [
    "RankMoEConfig",
    "RankMoEModel",
    "RankSearch",
    "RankSearchCallback",
    "RouterRecorder",
    "ExpertUsage",
    "load_balancing_loss",
    "RankMoELayer",
    "Linear",
    "FractionalRankMask",
    "fractional_rank_mask",
    "hard_rank_mask",
    "route",
    "register",
]
__version__ = "0.1.0"
