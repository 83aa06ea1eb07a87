"""bpo-lightning: online preference alignment of LLMs with the behavior LLM as the trust-region centre (BPO).

The names below are imported on first use (``from bpo_lightning import DPOLoss`` works as usual), so that importing
the package, and the ``bpo`` command's help, do not wait for torch.

Layers, lowest first. A module imports from its own layer or lower ones, never from a higher one (type-only imports
aside); ``tests/test_meta.py`` checks every import against this map, and a new module must be placed in it:

    0 base        errors arguments hookspecs types console logs
    1 records     files identity cache store checkpoints reshard distributed logprobs metrics merge plots batches
    2 components  plugins behavior lora weights losses prompts tasks tasks.reviews tasks.reviews_data tasks.smollm2
                  policy presets sampling engine annotation judge scoring
    3 phase       collection evaluation
    4 lightning   module data reporting
    5 commands    lightning_cli export cli testing __main__

One phase reads top to bottom in ``data.OnlineDataModule.train_dataloader`` and ``collection.collect_phase`` (layer
3 is given π_β, the sampler, the annotator and the phase's files, and returns a ``PhaseResult``); training reads in
``module.BPOModule.training_step``.
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
    "VLLMSampler": "engine",
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
    "VLLMSampler",
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
