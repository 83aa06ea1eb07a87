"""bpo-lightning: online preference alignment of LLMs with the behavior LLM as the trust-region centre (BPO).

The names below are imported on first use (``from bpo_lightning import DPOLoss`` works as usual), so that importing
the package, and the ``bpo`` command's help, do not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Annotator": "annotation",
    "RewardModelAnnotator": "annotation",
    "RuleAnnotator": "annotation",
    "EMA": "behavior",
    "BehaviorUpdate": "behavior",
    "Frozen": "behavior",
    "HardSync": "behavior",
    "hookimpl": "hookspecs",
    "DPOLoss": "losses",
    "IPOLoss": "losses",
    "LossOutput": "losses",
    "PreferenceLoss": "losses",
    "SLiCLoss": "losses",
    "GenerateSampler": "sampling",
    "PromptSource": "prompts",
    "ReviewPrompts": "tasks.reviews",
    "Pretrained": "policy",
    "EmbeddedSFT": "policy",
    "FromConfig": "policy",
    "LoRA": "lora",
    "Evaluation": "evaluation",
    "StaticCacheSampler": "sampling",
    "Sampler": "sampling",
}

__all__ = [
    "EMA",
    "EmbeddedSFT",
    "Evaluation",
    "FromConfig",
    "LoRA",
    "Pretrained",
    "PromptSource",
    "ReviewPrompts",
    "Annotator",
    "BehaviorUpdate",
    "DPOLoss",
    "Frozen",
    "GenerateSampler",
    "StaticCacheSampler",
    "HardSync",
    "IPOLoss",
    "LossOutput",
    "PreferenceLoss",
    "RewardModelAnnotator",
    "RuleAnnotator",
    "SLiCLoss",
    "Sampler",
    "hookimpl",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
