"""Samplers: draw responses for a phase's prompts from the behavior LLM.

A sampler turns prompts into token ids with ``encode_prompt`` (the same function the training batches use, so the
model is trained on exactly the context it sampled from) and returns the generated token ids and texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from bpo_lightning.arguments import RecordsArguments
from bpo_lightning.batches import left_pad
from bpo_lightning.errors import InputError, RunError, one_line
from bpo_lightning.hookspecs import hookimpl
from bpo_lightning.logprobs import accepts, cache_argument, prompt_sharing, split_head

if TYPE_CHECKING:  # transformers is imported when sampling starts, not when plugins are listed
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


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
    # the sampling model's own log-probabilities, when the sampler records them (else None): per response, the sum
    # over ``response_ids`` and the EOS token's log-probability right after them (for a response cut at
    # max_new_tokens, at the position that would have followed)
    logps: list[list[float]] | None = None
    eos_logps: list[list[float]] | None = None


class LogpRecorder:
    """The log-probabilities of the tokens a decode loop draws, from the raw logits of each forward (before
    temperature, top-k or top-p), in float32 as the scoring forward computes them.

    ``feed(logits)`` takes each forward's next-token logits, (rows, V); ``take(tokens)`` the tokens then drawn,
    (rows,). Forward k predicts token k, so after ``n + 1`` forwards the sums over any response of at most ``n``
    tokens and the EOS log-probability after it are known (``totals``)."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos = eos_token_id
        self.token: list[torch.Tensor] = []  # per position: log p(drawn token), (rows,)
        self.end: list[torch.Tensor] = []  # per position: log p(EOS), (rows,)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.broken = False  # a forward without input ids: positions unknown

    def feed(self, logits: torch.Tensor) -> None:
        logits = logits.float()
        norm = logits.logsumexp(-1)
        self.end.append(logits[:, self.eos] - norm)
        self._pending = (logits, norm)

    def take(self, tokens: torch.Tensor) -> None:
        if self._pending is None:
            return
        logits, norm = self._pending
        self._pending = None
        self.token.append(logits.gather(-1, tokens.reshape(-1, 1).to(logits.device)).squeeze(-1) - norm)

    def hook(self, module, args, kwargs, output) -> None:
        """A forward hook (``with_kwargs=True``) for a model that ``generate`` calls once per token."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if ids is None or logits is None:
            self.broken = True
            return
        self.take(ids[:, -1])  # forward k's input ends with token k − 1 (nothing is pending before the first)
        self.feed(logits[:, -1])

    def totals(self, lengths: list[int]) -> tuple[list[float], list[float]] | None:
        """Per row: the sum over its first ``lengths[row]`` tokens and log p(EOS) after them; ``None`` when a row's
        positions were not all computed (a generate that made fewer forwards, or no usable hook)."""
        if self.broken or not lengths or max(lengths) >= len(self.end) or max(lengths) > len(self.token):
            return None
        rows = len(lengths)
        token = torch.stack(self.token, 1)[:rows].double().cpu() if self.token else torch.zeros(rows, 0)
        end = torch.stack(self.end, 1)[:rows].double().cpu()
        sums = [float(token[r, :n].sum()) for r, n in enumerate(lengths)]
        return sums, [float(end[r, n]) for r, n in enumerate(lengths)]


DRAWS = ("candidates", "vocabulary")


class TokenDraw:
    """Draws one token per row from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens and
    then to the most likely of those whose probability mass reaches ``top_p`` — the distribution transformers'
    temperature, top-k and top-p warpers define, in that order (``temperature`` 0: the most likely token).

    ``draw: candidates`` (the default) draws among the top-k candidates only: one random number per candidate, not
    per vocabulary entry (a multinomial draw over 49,152 tokens took 18 % of SmolLM2-135M's sampling time on CPU).
    ``draw: vocabulary`` draws over the whole vocabulary as transformers' ``generate`` does (its exact samples for a
    seed, at that cost). Both sample the same distribution (``tests/test_sampling.py``); they consume the random
    stream differently, so one seed gives other samples under each. top-k keeps exactly k tokens here; transformers
    also keeps tokens tied with the k-th.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float, draw: str = "candidates") -> None:
        if draw not in DRAWS:
            raise InputError(f"sampler: draw must be 'candidates' or 'vocabulary', got {draw!r}")
        self.temperature, self.top_k, self.top_p, self.draw = temperature, top_k, top_p, draw

    def __call__(self, logits: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, V) next-token logits -> (rows,) token ids. ``uniforms``: one number in [0, 1) per row (``candidates``
        only), from which each row's token is drawn by inversion instead of from the global random stream."""
        if self.temperature == 0:
            return logits.argmax(-1)
        scores = logits.float()
        if self.temperature != 1:
            scores = scores / self.temperature
        if self.draw == "vocabulary":
            return self._vocabulary(scores)
        index = None
        if 0 < self.top_k < scores.shape[-1]:
            scores, index = scores.topk(self.top_k, dim=-1)  # sorted, most likely first
        if self.top_p < 1:
            if index is None:
                scores, index = scores.sort(dim=-1, descending=True)
            probs = scores.softmax(-1)
            before = probs.cumsum(-1) - probs  # the mass of the more likely tokens; the first always stays
            scores = scores.masked_fill(before >= self.top_p, float("-inf"))
        probs = scores.softmax(-1)
        if uniforms is None:
            pick = torch.multinomial(probs, num_samples=1)  # (rows, 1)
        else:  # the first candidate whose cumulative probability exceeds u (a masked one adds nothing: never it)
            cdf = probs.double().cumsum(-1)
            target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]
            pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
        return (pick if index is None else index.gather(-1, pick)).squeeze(1)

    def _vocabulary(self, scores: torch.Tensor) -> torch.Tensor:
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        if self.top_k:
            scores = TopKLogitsWarper(self.top_k)(None, scores)
        if self.top_p < 1:
            scores = TopPLogitsWarper(self.top_p)(None, scores)
        return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


class PromptSeededDraw:
    """``TokenDraw``'s ``candidates`` draw with a random stream of its own per row: the ``j``-th response to the
    ``k``-th prompt of a block seeded ``seed`` draws its ``t``-th token with the ``t``-th number of
    ``torch.Generator().manual_seed((seed + k) · n + j)`` (``n`` responses per prompt), so a prompt's samples depend on
    its seed and position only, not on the other prompts of its block (VLLMSampler's per-request seeds, the same
    formula). The numbers for a block's steps are drawn up front on the CPU: one generator call per row."""

    def __init__(self, draw: TokenDraw, seed: int, prompts: int, samples: int, steps: int, device) -> None:
        self.draw, self.step = draw, 0
        table = torch.empty(prompts * samples, steps, dtype=torch.float64)
        generator = torch.Generator()
        for row in range(prompts * samples):
            generator.manual_seed((seed + row // samples) * samples + row % samples)
            table[row] = torch.rand(steps, generator=generator, dtype=torch.float64)
        self.uniforms = table.to(device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        uniforms = self.uniforms[:, self.step]
        self.step += 1
        if logits.shape[0] > uniforms.shape[0]:  # a static cache's stand-in rows (discarded): any number will do
            uniforms = torch.cat([uniforms, uniforms.new_full((logits.shape[0] - uniforms.shape[0],), 0.5)])
        return self.draw(logits, uniforms)


def _drawn_token_processor(draw: Callable[[torch.Tensor], torch.Tensor]):
    """A transformers logits processor that draws the next token with ``draw`` and leaves it the only finite
    score, so that ``generate``'s greedy step picks it."""
    from transformers import LogitsProcessor

    class DrawnToken(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            tokens = draw(scores)
            return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)

    return DrawnToken()


def check_settings(
    num_samples: int, max_new_tokens: int, temperature: float, top_p: float, batch_size: int
) -> list[str]:
    """What is wrong with a sampler's common settings (nothing: an empty list)."""
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
    return problems


class Sampler(RecordsArguments):
    """Base class of samplers, and the whole contract collection and evaluation rely on (docs/plugins.md).

    A sampler implements ``sample_batches``; every other member has a default here, and collection and evaluation
    read nothing else. ``settings()`` is saved with every phase and compared on resume: by default the class and
    the arguments its ``__init__`` was called with (``self.arguments``, recorded automatically; ``progress`` left
    out). ``bpo_lightning.testing.check_sampler`` checks a sampler against this contract.
    """

    num_samples: int = 2
    """Responses drawn per prompt (exactly 2 with a pairwise annotator, a judge)."""
    batch_size: int = 128
    """Prompts per block. Collection hands the sampler one block at a time, seeded with the phase's seed plus the
    block's first position, so a block's samples depend on neither the number of processes nor a resume; another
    block size draws other samples (it is part of ``settings()``), unless ``seeds_per_prompt``."""
    seeds_per_prompt: bool = False
    """Whether the ``k``-th prompt of a call seeded ``s`` is drawn from its own seed ``s + k``, whatever else its block
    holds: its samples then depend on its position in the phase only, and collection splits each round's prompts
    evenly over the processes (within one prompt), not in whole blocks. ``False`` (the default): a block is
    sampled as a whole, and collection hands out whole blocks."""
    max_new_tokens: int | None = None
    """Longest response in tokens (without its EOS), or ``None`` when the sampler sets no limit. With
    ``max_prompt_tokens`` it lets collection refuse a prompt that would not fit the policy's context before any
    sampling; held-out answers use it unless ``model.evaluation.max_new_tokens`` is set."""
    max_prompt_tokens: int | None = None
    """Prompts longer than this keep their last tokens (``encode_prompt``); ``None``: no limit."""
    add_bos: bool = True
    """Whether ``encode_prompt`` prepends the tokenizer's BOS token. Training batches are built from the
    ``prompt_ids`` the sampler returns, so the policy trains on exactly the context it sampled from."""
    progress: bool = False
    """Show the sampler's own progress bar (collection turns it off while it shows one bar for the phase)."""

    def sample_batches(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, seed: int
    ) -> Iterator[tuple[int, Samples]]:
        """Yield ``(start, samples)`` for consecutive blocks of ``prompts``, as soon as each block is sampled,
        so that callers can annotate and save it before the next one.

        ``Samples.response_ids`` exclude EOS (the training batches append it), ``finished`` says which responses
        ended with EOS, and ``logps`` / ``eos_logps`` (π_β's log-probabilities, optional) are the raw model's,
        before temperature, top-k or top-p. The same ``seed`` and prompts must give the same samples."""
        raise NotImplementedError

    def sample(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, seed: int
    ) -> Samples:
        blocks = [block for _, block in self.sample_batches(model, tokenizer, prompts, seed=seed)]

        def joined(name: str) -> list:
            return [item for block in blocks for item in getattr(block, name)]

        out = Samples(*(joined(name) for name in ("prompt_ids", "response_ids", "responses", "finished")))
        if blocks and all(b.logps is not None and b.eos_logps is not None for b in blocks):  # for all or for none
            out.logps, out.eos_logps = joined("logps"), joined("eos_logps")
        return out

    def prepare(self, model: PreTrainedModel, weights: str) -> None:
        """Called before each sampling pass with the model about to be sampled from and a name for the weights it
        computes with: ``behavior-<version>`` when a phase starts collecting, ``policy-<step>`` for held-out
        answers. The name changes exactly when the weights do. A sampler that keeps its own copy of the weights
        (an inference engine) refreshes it when the name changed; the default samples from ``model`` itself and
        does nothing."""

    def release(self) -> None:
        """Called when sampling is over until the next ``prepare``: after a phase's collection and after an
        evaluation. A sampler that holds memory of its own (an inference engine's weights and KV cache) frees it
        here, so that training gets it back; the default does nothing."""

    def take_counts(self) -> dict[str, float]:
        """The sampler's own measurements since the last call (e.g. an engine's weight-sync seconds), summed into
        the phase's stats (``PhaseStats.sampler``, logged as ``data/sampler_<name>``); default: none."""
        return {}

    def evaluation_sampler(
        self,
        *,
        num_samples: int,
        temperature: float,
        top_k: int,
        max_new_tokens: int,
        max_prompt_tokens: int,
        batch_size: int,
    ) -> Sampler:
        """The sampler that answers held-out prompts (and draws the KL samples) with these settings, drawing
        tokens as this one does. Default: ``GenerateSampler`` with this sampler's ``add_bos``."""
        return GenerateSampler(num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=1.0,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                               batch_size=batch_size, add_bos=self.add_bos, progress=False)  # fmt: skip

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
        batch_size: prompts per ``generate`` call (each expands to ``num_samples`` sequences). A block's KV cache
            grows to ``batch_size`` × ``num_samples`` × (longest prompt + ``max_new_tokens``) positions: 2 ×
            layers × key/value heads × head size × dtype bytes each (a 7B model with 32 full-attention heads in
            bfloat16: 0.5 MiB, so 128 prompts at 512 + 128 tokens take 80 GiB; with 8 key/value heads, 20 GiB).
            With ``draw: candidates`` each prompt has its own seed (``PromptSeededDraw``), so the block size does
            not change the samples and collection splits prompts evenly across processes; with ``vocabulary``
            each block is seeded as a whole, and another size draws other samples.
        max_prompt_tokens: prompts longer than this keep their last tokens.
        add_bos: prepend the tokenizer's BOS token to every prompt.
        progress: show a progress bar while sampling.
        draw: ``candidates`` draws each token among the top-k candidates from one random number per response and
            token, each response from its own seeded stream (``PromptSeededDraw``); ``vocabulary`` over the whole
            vocabulary from the block's stream, as transformers' ``generate`` does (its samples for a seed); the
            same distribution either way (``TokenDraw``).
        share_prompts: run each prompt once for its ``num_samples`` responses: all but its last token go through the
            model's backbone once, and ``generate`` continues every response from that KV cache, expanded
            (``prompt_cache``). The same computation up to float rounding; ``false`` runs every response's prompt,
            as ``generate`` on repeated prompts does (its samples for a seed, bit for bit).
    """

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
        draw: str = "candidates",
        share_prompts: bool = True,
    ) -> None:
        problems = check_settings(num_samples, max_new_tokens, temperature, top_p, batch_size)
        if draw not in DRAWS:
            problems.append(f"draw must be 'candidates' or 'vocabulary', got {draw!r}")
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
        self.draw = draw
        self.share_prompts = share_prompts

    @property
    def token_draw(self) -> TokenDraw:
        """How each token is drawn, from the sampler's settings."""
        return TokenDraw(self.temperature, self.top_k, self.top_p, self.draw)

    @property
    def seeds_per_prompt(self) -> bool:  # greedy decoding draws nothing
        return self.draw == "candidates" or self.temperature == 0

    def block_draw(self, seed: int, prompts: int, steps: int, device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The draw for one block of ``prompts`` prompts seeded ``seed``, over up to ``steps`` tokens: a stream per
        response (``candidates``), or the global random stream, which the block seeds (``vocabulary``)."""
        if self.draw == "candidates" and self.temperature > 0:
            return PromptSeededDraw(self.token_draw, seed, prompts, self.num_samples, steps, device)
        return self.token_draw

    def evaluation_sampler(
        self,
        *,
        num_samples: int,
        temperature: float,
        top_k: int,
        max_new_tokens: int,
        max_prompt_tokens: int,
        batch_size: int,
    ) -> GenerateSampler:
        return GenerateSampler(num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=1.0,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                               batch_size=batch_size, add_bos=self.add_bos, progress=False, draw=self.draw,
                               share_prompts=self.share_prompts)  # fmt: skip

    not_provenance = ("share_prompts",)  # how the samples are computed, not what they are

    def settings(self) -> dict:
        # the block size stays recorded: with ``draw: vocabulary`` it seeds the blocks (another size draws other
        # samples), and run.json records what the class declares, whatever the draw; sharing a prompt's prefill is
        # how the samples are computed, not what they are
        keys = ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "batch_size", "max_prompt_tokens",
                "add_bos", "draw")  # fmt: skip
        extra = {k: v for k, v in self.arguments.items() if k not in keys}  # a subclass's own
        return {"class": type(self).__name__, **{k: getattr(self, k) for k in keys}, **extra}

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """transformers' settings for one ``generate`` call over prompts already repeated ``num_samples`` times: its
        greedy step picks the token ``TokenDraw`` drew (``generate``)."""
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )

    def sample_batches(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]], *, seed: int
    ) -> Iterator[tuple[int, Samples]]:
        config = self.generation_config(tokenizer)
        # one forward more than the longest response: the EOS log-probability after a response cut at the limit
        # (the extra token drawn there is dropped; each block's random stream is its own, so nothing else changes)
        config.max_new_tokens = self.max_new_tokens + 1
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
                    with _out_of_memory(len(batch), self.num_samples):
                        cache = self.prompt_cache(model, input_ids, attention_mask) if self.share_prompts else {}
                        recorder = LogpRecorder(tokenizer.eos_token_id)
                        with self.recording(model, recorder):  # (b·n, ≤ new + 1)
                            draw = self.block_draw(seed + start, len(batch), config.max_new_tokens, model.device)
                            generated = self.generate(model, input_ids, attention_mask, config, draw, **cache)
                generated = generated[:, : self.max_new_tokens]
                yield start, self._collect(batch, generated.tolist(), tokenizer, recorder)
        finally:
            model.train(was_training)

    @contextmanager
    def recording(self, model: PreTrainedModel, recorder: LogpRecorder):
        """Context in which every forward of ``model`` that ``generate`` makes feeds ``recorder`` (a forward hook
        on the transformers model; a PEFT wrapper's generate calls its base model)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        handle = base.register_forward_hook(recorder.hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def generate(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        draw: Callable[[torch.Tensor], torch.Tensor],
        **cache,
    ) -> torch.Tensor:
        """The new tokens, ``num_samples`` consecutive rows per prompt: (b·n, ≤ max_new_tokens), padded after EOS.

        Each prompt is repeated ``num_samples`` times (as ``generate``'s ``num_return_sequences`` does) and every
        token is drawn by ``draw`` (``block_draw``), through a logits processor that leaves ``generate``'s greedy
        step nothing else to pick. ``cache``: what ``prompt_cache`` returned, which ``generate`` continues."""
        from transformers import LogitsProcessorList

        ids = input_ids.repeat_interleave(self.num_samples, dim=0)
        mask = attention_mask.repeat_interleave(self.num_samples, dim=0)
        drawn = [] if self.temperature == 0 else [_drawn_token_processor(draw)]
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             logits_processor=LogitsProcessorList(drawn), **cache)  # fmt: skip
        return out[:, ids.shape[1] :]

    def prompt_cache(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """``generate``'s cache argument holding every prompt but its last token, run once per prompt through the
        backbone (before the log-probabilities are recorded) and expanded to the ``num_samples`` rows of each; empty
        where that is not the same computation or buys nothing: one sample per prompt, a prompt of one token, a
        model without a separate output head or whose cache cannot be expanded (``prompt_sharing``), a model whose
        generation config names its own cache (``cache_implementation``, which ``generate`` will not combine with a
        given one), or ZeRO-3 over several processes (each must run as many forwards as the others)."""
        n, width = self.num_samples, input_ids.shape[1]
        mask = attention_mask[:, : width - 1]  # every prompt but its last token
        if n < 2 or width < 2 or bool(mask.sum(-1).eq(0).any()) or _zero3_processes() > 1:
            return {}
        if getattr(getattr(model, "generation_config", None), "cache_implementation", None) is not None:
            return {}
        split = split_head(model)
        if split is None or not prompt_sharing(model, split[0]):
            return {}
        name = cache_argument(model)
        out = split[0](input_ids=input_ids[:, : width - 1], attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)  # fmt: skip
        cache = out.get(name)
        if cache is None:
            return {}
        cache.reorder_cache(torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(n))
        return {name: cache}

    def _collect(
        self, prompt_ids: list[list[int]], generated: list[list[int]], tokenizer, recorder: LogpRecorder | None = None
    ) -> Samples:
        out = Samples(prompt_ids, [], [], [])
        eos = tokenizer.eos_token_id
        lengths = []
        for i in range(0, len(generated), self.num_samples):
            ids, done = [], []
            for seq in generated[i : i + self.num_samples]:
                end = seq.index(eos) if eos in seq else len(seq)
                ids.append(seq[:end])
                done.append(end < len(seq))
                lengths.append(end)
            out.response_ids.append(ids)
            out.finished.append(done)
            out.responses.append(tokenizer.batch_decode(ids, skip_special_tokens=True))
        totals = recorder.totals(lengths) if recorder is not None else None
        if totals is not None:
            n = self.num_samples
            out.logps = [totals[0][i : i + n] for i in range(0, len(lengths), n)]
            out.eos_logps = [totals[1][i : i + n] for i in range(0, len(lengths), n)]
        return out


class StaticCacheSampler(GenerateSampler):
    """``GenerateSampler``'s sampling with a preallocated (static) KV cache and its own decode loop, which a GPU
    runs as one compiled step reused by every block of every phase.

    The behavior LLM is frozen for a whole phase and its shapes repeat from block to block, so the decode step can
    be compiled once per run: prompt widths are rounded up to a multiple of ``prompt_bucket`` and, when compiling,
    a short last block is padded to ``batch_size`` prompts, so a run meets a handful of shapes. Compiling is
    worth it on CUDA (``compile: null`` compiles there); on CPU the loop runs eagerly, about as fast as ``generate``
    (``benchmarks/sampler_speed.py``).

    Sampling is the same as ``GenerateSampler``'s: the same ``TokenDraw`` once per step over all rows, pad after
    EOS; run eagerly it draws the same tokens as ``GenerateSampler`` for the same seed (``tests/test_sampling.py``).
    The loop stops when every row has finished (not under DeepSpeed ZeRO-3 with several processes, where every
    process must run as many forwards as the others).

    Args (besides ``GenerateSampler``'s):
        compile: compile the decode step with ``torch.compile``; ``null`` compiles on CUDA only.
        compile_mode: ``torch.compile`` mode (``reduce-overhead`` uses CUDA graphs).
        prompt_bucket: prompt widths are rounded up to a multiple of this (fewer shapes to compile).
    """

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
        draw: str = "candidates",
        compile: bool | None = None,
        compile_mode: str = "reduce-overhead",
        prompt_bucket: int = 32,
    ) -> None:
        super().__init__(
            num_samples,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            batch_size,
            max_prompt_tokens,
            add_bos,
            progress,
            draw,
        )
        if prompt_bucket < 1:
            raise InputError(f"sampler: prompt_bucket must be >= 1, got {prompt_bucket}")
        self.compile = compile
        self.compile_mode = compile_mode
        self.prompt_bucket = prompt_bucket
        self._cache = None  # (key, StaticCache), reused while the shapes repeat
        self._steps = {}  # id(model) -> compiled forward
        self._recorder: LogpRecorder | None = None

    # compiling the decode step changes how the samples are computed, not what they are (it draws GenerateSampler's
    # tokens, tested); the class name stays in settings(), as run.json's data.sampler.class_path names it
    not_provenance = ("share_prompts", "compile", "compile_mode", "prompt_bucket")

    def __getstate__(self) -> dict:  # caches and compiled graphs are not pickled with the sampler
        return {**self.__dict__, "_cache": None, "_steps": {}, "_recorder": None}

    @contextmanager
    def recording(self, model: PreTrainedModel, recorder: LogpRecorder):
        # fed by the decode loop itself: a hook would change the compiled graph's guards at every block
        self._recorder = recorder
        try:
            yield
        finally:
            self._recorder = None

    def prompt_cache(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {}  # the decode loop fills its own static cache

    def _compiling(self, model, synced: bool) -> bool:
        if self.compile is False or synced:  # ZeRO-3's hooks gather parameters inside the forward
            return False
        return bool(self.compile) or model.device.type == "cuda"

    def _step(self, model, compiling: bool):
        if not compiling:
            return model
        step = self._steps.get(id(model))
        if step is None:
            step = self._steps[id(model)] = torch.compile(model, mode=self.compile_mode, dynamic=False)
        return step

    def _static_cache(self, model, rows: int, length: int, dtype: torch.dtype):
        key = (id(model), rows, length, dtype, model.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the previous one first
            from transformers import StaticCache

            self._cache = (key, StaticCache(config=model.config, max_cache_len=length))
        cache = self._cache[1]
        cache.reset()
        return cache

    def generate(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        draw: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        prompts, rows = input_ids.shape[0], input_ids.shape[0] * self.num_samples
        synced = _zero3_processes() > 1  # every process must run as many forwards: no early stop, no compiling
        compiling = self._compiling(model, synced)
        width = -(-input_ids.shape[1] // self.prompt_bucket) * self.prompt_bucket
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        extra = self.batch_size - prompts if compiling and prompts < self.batch_size else 0
        if width > input_ids.shape[1] or extra:  # bucketed shapes: more left padding, dummy prompts
            ids = torch.full((prompts + extra, width), pad, dtype=input_ids.dtype, device=input_ids.device)
            mask = torch.zeros_like(ids)
            ids[:prompts, width - input_ids.shape[1] :] = input_ids
            mask[:prompts, width - input_ids.shape[1] :] = attention_mask
            ids[prompts:], mask[prompts:] = ids[0], mask[0]
            input_ids, attention_mask = ids, mask
        ids = input_ids.repeat_interleave(self.num_samples, dim=0)  # generate's expansion: rows i·n … i·n+n−1
        mask = attention_mask.repeat_interleave(self.num_samples, dim=0)
        new_tokens = config.max_new_tokens
        batch, length = ids.shape[0], width + new_tokens
        device = ids.device
        recorder = self._recorder

        eos = torch.tensor(_as_list(config.eos_token_id), device=device)

        dtype = next(model.parameters()).dtype
        cache = self._static_cache(model, batch, length, dtype)
        full_mask = torch.zeros((batch, length), dtype=mask.dtype, device=device)
        full_mask[:, :width] = mask
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        step = self._step(model, compiling)
        cache_key = cache_argument(model)
        last_only = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}  # no (rows, width, V)
        out = model(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=position,
            **{cache_key: cache},
            cache_position=torch.arange(width, device=device),
            use_cache=True,
            **last_only,
        )
        logits = out.logits[:, -1].float()
        del out
        position = position[:, -1:]
        tokens = torch.full((batch, new_tokens), pad, dtype=torch.long, device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        for t in range(new_tokens):
            if recorder is not None:
                recorder.feed(logits)
            new = torch.where(unfinished, draw(logits), pad)
            if recorder is not None:
                recorder.take(new)
            tokens[:, t] = new
            unfinished &= ~torch.isin(new, eos)
            if t + 1 == new_tokens or (not synced and not bool(unfinished.any())):
                tokens = tokens[:, : t + 1]
                break
            full_mask[:, width + t] = 1
            position = position + 1
            if compiling:
                torch.compiler.cudagraph_mark_step_begin()
            logits = (
                step(
                    input_ids=new[:, None],
                    attention_mask=full_mask,
                    position_ids=position,
                    **{cache_key: cache},
                    cache_position=torch.tensor([width + t], device=device),
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )
        return tokens[:rows]


@contextmanager
def _out_of_memory(prompts: int, samples: int):
    """An accelerator's out-of-memory error while sampling as a ``RunError`` naming the block size (the blocks
    sampled before it are saved, and a resumed run starts from the first missing one)."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise RunError(f"data.sampler.init_args.batch_size: a block of {prompts} prompts × {samples} samples ran out "
                       f"of accelerator memory while sampling; set a smaller batch_size ({one_line(err)[:160]})"
                       ) from err  # fmt: skip


def _as_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _zero3_processes() -> int:
    """The number of processes when DeepSpeed ZeRO-3 partitions the model (each must run every forward), else 1."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size()


@hookimpl
def register_samplers(register):
    register(GenerateSampler)
    register(StaticCacheSampler)


def check_context(
    sampler: Sampler,
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    key: str = "data.prompts",
    settings: str = "data.sampler.init_args",
) -> None:
    """Refuse, naming the keys, prompts whose tokens plus the longest response (and its EOS) do not fit the model's
    context: the model would fail deep inside with an index error (a sampler without length limits is trusted).
    ``key`` names the prompts, ``settings`` where ``max_new_tokens`` / ``max_prompt_tokens`` are set."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    new, most = sampler.max_new_tokens, sampler.max_prompt_tokens
    if not isinstance(limit, int) or new is None or most is None:
        return
    lengths = [len(encode_prompt(tokenizer, p, most, sampler.add_bos)) for p in prompts]
    longest = max(lengths)
    prompt = prompts[lengths.index(longest)]
    if longest + new + 1 > limit:
        text = prompt if isinstance(prompt, str) else str(prompt)
        raise InputError(
            f"{key}: the prompt {text[:60]!r}… has {longest} tokens; with {settings}.max_new_tokens "
            f"({new}) and the EOS token that exceeds the policy's context of {limit} positions. Set "
            f"{settings}.max_prompt_tokens to at most {limit - new - 1} (prompts keep their last tokens)."
        )
