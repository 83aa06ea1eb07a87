"""bpo-lightning: online preference alignment of LLMs with the behavior LLM as the trust-region centre (BPO)."""

from bpo_lightning.annotation import Annotator, RewardModelAnnotator, RuleAnnotator
from bpo_lightning.behavior import EMA, BehaviorUpdate, Frozen, HardSync
from bpo_lightning.hookspecs import hookimpl
from bpo_lightning.losses import DPOLoss, IPOLoss, LossOutput, PreferenceLoss, SLiCLoss
from bpo_lightning.sampling import GenerateSampler, Sampler

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "Annotator",
    "BehaviorUpdate",
    "DPOLoss",
    "Frozen",
    "GenerateSampler",
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
