"""Register "rankmoe" with peft at import time, without editing peft's files.

peft only registers names that are members of its `PeftType` enum, so the enum is extended first (with
aenum's `extend_enum`); a second registration would raise, so peft's mapping is checked before registering.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import PeftType, register_peft_method

__all__ = ["register"]

METHOD_NAME = "rankmoe"


def register() -> None:
    """Make `get_peft_model`, `PeftConfig.from_pretrained` and `PeftModel.from_pretrained` know "rankmoe"."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import RankMoEConfig
    from .model import RankMoEModel

    member = METHOD_NAME.upper()
    if member not in PeftType.__members__:
        extend_enum(PeftType, member, member)
    if PeftType[member] in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=METHOD_NAME, config_cls=RankMoEConfig, model_cls=RankMoEModel, prefix=RankMoEModel.prefix)
