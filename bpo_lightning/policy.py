"""Where the initial policy comes from: a hub id or local directory, an inline config, or the embedded task.

A policy source returns a causal LM and its tokenizer. The tokenizer is loaded eagerly (the datamodule needs it);
the model is loaded in ``LightningModule.configure_model`` so a sharding strategy can wrap its creation.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PolicySource:
    """Base class: ``tokenizer()`` and ``model()`` of the initial policy."""

    def tokenizer(self) -> PreTrainedTokenizerBase:
        raise NotImplementedError

    def model(self) -> PreTrainedModel:
        raise NotImplementedError


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, key: str) -> PreTrainedTokenizerBase:
    """Make a tokenizer usable for batched generation and scoring: left padding, a pad token (EOS when it has
    none; attention masks keep padding out of every computation), and an EOS token, which responses end with."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{key}: the tokenizer has no EOS token; responses must end with one. Set `eos_token`.")
    if tokenizer.pad_token_id is None:
        warnings.warn(f"{key}: the tokenizer has no pad token; using its EOS token for padding", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


class Pretrained(PolicySource):
    """A transformers causal LM from the hub or a local directory.

    Args:
        name_or_path: hub id (``google/gemma-2b``) or a local directory.
        tokenizer: tokenizer id or path, if it differs from ``name_or_path``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow custom model code from the hub.
    """

    def __init__(
        self,
        name_or_path: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"model.policy.init_args.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.name_or_path = os.path.expanduser(str(name_or_path))  # hub ids have no "~": unchanged
        self.tokenizer_path = os.path.expanduser(tokenizer) if tokenizer else self.name_or_path
        self.dtype = dtype
        self.revision = revision
        self.trust_remote_code = trust_remote_code

    def tokenizer(self) -> PreTrainedTokenizerBase:
        tok = AutoTokenizer.from_pretrained(
            self.tokenizer_path, revision=self.revision, trust_remote_code=self.trust_remote_code
        )
        return prepare_tokenizer(tok, "model.policy")

    def model(self) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(
            self.name_or_path,
            dtype=_DTYPES[self.dtype],
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
        )


class FromConfig(PolicySource):
    """A randomly initialised causal LM built from an inline config (tiny test and debug models; built whole on each
    process, so keep it small).

    Args:
        config: ``model_type`` plus config fields, e.g. ``{model_type: gpt2, n_layer: 2, n_embd: 64}``.
        tokenizer: tokenizer id or local path; the config's vocabulary must cover it.
        seed: initialisation seed.
    """

    def __init__(self, config: dict, tokenizer: str, seed: int = 0) -> None:
        if "model_type" not in config:
            raise ValueError("model.policy.init_args.config needs a `model_type` entry (e.g. gpt2, llama)")
        self.config = dict(config)
        self.tokenizer_path = str(tokenizer)
        self.seed = seed

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(self.tokenizer_path), "model.policy")

    def model(self) -> PreTrainedModel:
        from bpo_lightning.distributed import outside_zero_init

        fields = dict(self.config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        # built whole (under ZeRO-3 DeepSpeed partitions it when training starts): the same initial weights on any
        # number of processes and with any strategy
        with torch.random.fork_rng(), outside_zero_init():
            torch.manual_seed(self.seed)
            return AutoModelForCausalLM.from_config(config)


class EmbeddedSFT(Pretrained):
    """The embedded review task's SFT model (docs/task.md), built into ``cache_dir`` on first use.

    Args:
        cache_dir: where the SFT model is kept; building it takes under a minute on two CPU cores.
        steps: SFT optimisation steps (default: the task's recipe).
        seed: SFT seed.
    """

    def __init__(self, cache_dir: str = "~/.cache/bpo-lightning", steps: int | None = None, seed: int = 0) -> None:
        from bpo_lightning.tasks import reviews

        steps = reviews.SFT_STEPS if steps is None else steps
        path = reviews.ensure_sft(Path(cache_dir).expanduser(), steps=steps, seed=seed)
        super().__init__(str(path))
        self.cache_dir, self.steps, self.seed = cache_dir, steps, seed
