"""Where the initial policy comes from: a hub id or local directory, an inline config, or the embedded task.

A policy source returns a causal LM and its tokenizer. The tokenizer is loaded eagerly (the datamodule needs it);
the model is loaded in ``LightningModule.configure_model`` so a sharding strategy can wrap its creation. A model that
cannot be there (a local folder that does not exist or lacks ``config.json`` or weights, a hub id missing from the
local cache with ``HF_HUB_OFFLINE=1``) is an :class:`~bpo_lightning.errors.InputError` as soon as it is configured.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bpo_lightning.errors import InputError, one_line

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what ``from_pretrained`` finds weights in (one file, or the index of a sharded checkpoint)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# a hub id is in the local hub cache when one of these files is
_HUB_FILES = {"model": ("config.json", "adapter_config.json"), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}


def looks_like_path(text: str) -> bool:
    """Whether a model source can only be a local path, not a hub id (``gpt2``, ``org/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith(("/", "./", "../", "~")) or text in (".", "..") or "\\" in text:
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:  # more than one "/", spaces, …
        return True
    return False


def check_source(name_or_path: str, key: str, revision: str | None = None, kind: str = "model") -> None:
    """Refuse a ``kind`` (``model`` or ``tokenizer``) that cannot load, naming ``key``: a local folder that does not
    exist, a model folder without ``config.json`` or weights, or, with ``HF_HUB_OFFLINE=1``, a hub id that is not in
    the local hub cache. Anything else is left to ``from_pretrained``."""
    from huggingface_hub import constants, try_to_load_from_cache

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if kind == "model" and not (path / "adapter_config.json").is_file():  # a PEFT adapter names its base model
            if not (path / "config.json").is_file():
                raise InputError(f"{key}: the model folder {text} has no config.json")
            if not any((path / name).is_file() for name in _WEIGHTS):
                raise InputError(f"{key}: the model folder {text} has no weights (none of {', '.join(_WEIGHTS)})")
        return
    if path.exists():
        raise InputError(f"{key}: {text} is a file; a {kind} is a folder or a hub id")
    if looks_like_path(text):
        where = f" ({path.resolve()})" if not path.is_absolute() else ""
        raise InputError(f"{key}: no {kind} folder {text}{where}, and it is not a hub id")
    if constants.HF_HUB_OFFLINE:
        if not any(isinstance(try_to_load_from_cache(text, f, revision=revision), str) for f in _HUB_FILES[kind]):
            raise InputError(
                f"{key}: no {kind} folder {text}, and the hub id {text!r} is not in the local hub cache "
                f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1 forbids downloading it)"
            )


def load_error(err: Exception, key: str, name_or_path: str) -> InputError:
    """``from_pretrained``'s ``OSError`` (no such model, files missing) as an ``InputError`` naming ``key``."""
    return InputError(f"{key}: cannot load {name_or_path} ({one_line(err)})")


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
    tokenizer.source_padding_side = tokenizer.padding_side  # what `bpo export` saves (the source's own)
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
            raise InputError(f"model.policy.init_args.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.name_or_path = os.path.expanduser(str(name_or_path))  # hub ids have no "~": unchanged
        self.tokenizer_path = os.path.expanduser(tokenizer) if tokenizer else self.name_or_path
        self.dtype = dtype
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        check_source(self.name_or_path, "model.policy.init_args.name_or_path", revision)
        if tokenizer:
            check_source(self.tokenizer_path, "model.policy.init_args.tokenizer", revision, kind="tokenizer")

    def tokenizer(self) -> PreTrainedTokenizerBase:
        key = "model.policy.init_args." + ("tokenizer" if self.tokenizer_path != self.name_or_path else "name_or_path")
        try:
            tok = AutoTokenizer.from_pretrained(
                self.tokenizer_path, revision=self.revision, trust_remote_code=self.trust_remote_code
            )
        except OSError as err:
            raise load_error(err, key, self.tokenizer_path) from err
        return prepare_tokenizer(tok, "model.policy")

    def model(self) -> PreTrainedModel:
        try:
            return AutoModelForCausalLM.from_pretrained(
                self.name_or_path,
                dtype=_DTYPES[self.dtype],
                revision=self.revision,
                trust_remote_code=self.trust_remote_code,
            )
        except OSError as err:
            raise load_error(err, "model.policy.init_args.name_or_path", self.name_or_path) from err


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
            raise InputError("model.policy.init_args.config needs a `model_type` entry (e.g. gpt2, llama)")
        self.config = dict(config)
        self.tokenizer_path = os.path.expanduser(str(tokenizer))
        self.seed = seed
        check_source(self.tokenizer_path, "model.policy.init_args.tokenizer", kind="tokenizer")

    def tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        except OSError as err:
            raise load_error(err, "model.policy.init_args.tokenizer", self.tokenizer_path) from err
        return prepare_tokenizer(tok, "model.policy")

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
        first = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"  # one process tells
        path = reviews.ensure_sft(Path(cache_dir).expanduser(), steps=steps, seed=seed, progress=first)
        super().__init__(str(path))
        self.cache_dir, self.steps, self.seed = cache_dir, steps, seed
