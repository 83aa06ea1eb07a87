"""Samplers: draw responses for a phase's prompts from the behavior LLM.

A sampler turns prompts into token ids with ``encode_prompt`` (the same function the training batches use, so the
model is trained on exactly the context it sampled from) and returns the generated token ids and texts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from bpo_lightning.arguments import RecordsArguments
from bpo_lightning.errors import InputError
from bpo_lightning.hookspecs import hookimpl


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], max_tokens: int, add_bos: bool = True
) -> list[int]:
    """Token ids of ``prompt``: BOS (when the tokenizer has one and ``add_bos``) plus the prompt's tokens, keeping
    the *end* of an over-long prompt (its instruction cue, e.g. ``TL;DR:``, sits there). A list of chat messages
    (``{"role", "content"}``) goes through the tokenizer's chat template, which brings its own special tokens."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("model.policy: prompts are chat messages but the tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        add_bos = False
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    keep = max(max_tokens - len(bos), 1)
    return bos + ids[-keep:]


@dataclass
class Samples:
    """Responses for a list of prompts, ``n`` per prompt; outer lists are per prompt."""

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]  # generated tokens, cut at EOS (EOS itself not included)
    responses: list[list[str]]  # decoded response_ids
    finished: list[list[bool]]  # True when the model emitted EOS, False when cut at max_new_tokens


class Sampler(RecordsArguments):
    """Base class of samplers. ``num_samples`` responses are drawn for each prompt.

    ``settings()`` is saved with every phase and compared on resume: by default the class and the arguments its
    ``__init__`` was called with (``self.arguments``, recorded automatically; ``progress`` left out)."""

    num_samples: int = 2

    def sample_batches(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, seed: int
    ) -> Iterator[tuple[int, Samples]]:
        """Yield ``(start, samples)`` for consecutive blocks of ``prompts``, as soon as each block is sampled,
        so that callers can annotate and save it before the next one."""
        raise NotImplementedError

    def sample(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, seed: int
    ) -> Samples:
        out = Samples([], [], [], [])
        for _, block in self.sample_batches(model, tokenizer, prompts, seed=seed):
            for name in ("prompt_ids", "response_ids", "responses", "finished"):
                getattr(out, name).extend(getattr(block, name))
        return out

    def settings(self) -> dict:
        """Settings recorded with every sampled pair (provenance): the class and its constructor arguments."""
        cls = type(self)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", **self.arguments}


class GenerateSampler(Sampler):
    """Batched ancestral sampling with ``transformers`` ``generate`` (left padding, KV cache).

    Defaults are the BPO paper's (docs/algorithm.md §2.5): temperature 1, top-k 50, top-p 1, 128 new tokens, 2 samples.

    Args:
        num_samples: responses per prompt (≥ 2; with more, the pair is the best vs the worst by annotator score).
        max_new_tokens: length limit of a response.
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep the k most likely tokens (0 disables).
        top_p: nucleus sampling mass (1.0 disables).
        batch_size: prompts per ``generate`` call (each expands to ``num_samples`` sequences).
        max_prompt_tokens: prompts longer than this keep their last tokens.
        add_bos: prepend the tokenizer's BOS token to every prompt.
        progress: show a progress bar while sampling.
    """

    def __init__(
        self,
        num_samples: int = 2,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        batch_size: int = 16,
        max_prompt_tokens: int = 512,
        add_bos: bool = True,
        progress: bool = True,
    ) -> None:
        problems = []
        if num_samples < 1:
            problems.append(f"num_samples must be >= 1, got {num_samples}")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            problems.append(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {top_p}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if problems:
            raise InputError("sampler: " + "; ".join(problems))
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.add_bos = add_bos
        self.progress = progress

    def settings(self) -> dict:
        keys = ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "max_prompt_tokens", "add_bos")
        extra = {k: v for k, v in self.arguments.items() if k not in keys and k != "batch_size"}  # a subclass's own
        return {"class": type(self).__name__, **{k: getattr(self, k) for k in keys}, **extra}

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        greedy = self.temperature == 0
        sampling = {} if greedy else {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return GenerationConfig(
            do_sample=not greedy,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=self.num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )

    def sample_batches(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]], *, seed: int
    ) -> Iterator[tuple[int, Samples]]:
        config = self.generation_config(tokenizer)
        was_training = model.training
        model.eval()
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            starts = range(0, len(prompts), self.batch_size)
            for start in tqdm(starts, desc="sampling", disable=not self.progress, leave=False, unit="batch"):
                batch = [
                    encode_prompt(tokenizer, p, self.max_prompt_tokens, self.add_bos)
                    for p in prompts[start : start + self.batch_size]
                ]
                with torch.no_grad(), torch.random.fork_rng(devices=devices):  # keep the training RNG stream
                    torch.manual_seed(seed + start)  # a block's samples do not depend on earlier blocks
                    input_ids, attention_mask = left_pad(batch, tokenizer.pad_token_id, model.device)
                    generated = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                    )[:, input_ids.shape[1] :]  # (b·n, new)
                yield start, self._collect(batch, generated.tolist(), tokenizer)
        finally:
            model.train(was_training)

    def _collect(self, prompt_ids: list[list[int]], generated: list[list[int]], tokenizer) -> Samples:
        out = Samples(prompt_ids, [], [], [])
        eos = tokenizer.eos_token_id
        for i in range(0, len(generated), self.num_samples):
            ids, done = [], []
            for seq in generated[i : i + self.num_samples]:
                end = seq.index(eos) if eos in seq else len(seq)
                ids.append(seq[:end])
                done.append(end < len(seq))
            out.response_ids.append(ids)
            out.finished.append(done)
            out.responses.append(tokenizer.batch_decode(ids, skip_special_tokens=True))
        return out


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` of shape (N, T)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@hookimpl
def register_samplers(register):
    register(GenerateSampler)
