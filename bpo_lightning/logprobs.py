"""Sequence log-probabilities of responses, with memory that does not grow with the vocabulary times the length.

log π(y|x) is the sum of the response tokens' log-probabilities (the prompt is masked; the response ends with
EOS; docs/concepts.md). Real vocabularies reach 128k-262k entries, where an (N, T, V) float32 logits tensor is
gigabytes: the output head and the per-token normaliser (logsumexp) run on chunks of response positions from the
backbone's hidden states, recomputed in the backward pass, so the extra memory is (chunk, V) whatever N and T.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class SequenceLogps:
    """Summed log-probabilities and the number of scored tokens per sequence, both (N,)."""

    sums: torch.Tensor
    counts: torch.Tensor

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """log softmax(logits)[target] for every position, chunked over positions.

    Args:
        logits: (N, T, V) next-token logits, any float dtype.
        targets: (N, T) token ids to score.
        chunk_size: positions per chunk; each chunk upcasts (N, chunk, V) to float32.

    Returns:
        (N, T) float32 log-probabilities.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[1], chunk_size):
        chunk = logits[:, start : start + chunk_size].float()  # (N, c, V)
        picked = chunk.gather(-1, targets[:, start : start + chunk_size, None]).squeeze(-1)  # (N, c)
        out[:, start : start + chunk_size] = picked - chunk.logsumexp(-1)
    return out


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (N, T), right-padded prompt + response + EOS
    attention_mask: torch.Tensor,  # (N, T)
    loss_mask: torch.Tensor,  # (N, T), 1 on response tokens (incl. EOS)
    chunk_size: int = 32,
    min_chunks: int = 0,
    keep_bytes: int = 0,
    share_prompts: bool = False,
) -> SequenceLogps:
    """Summed response log-probabilities of a causal LM, without ever holding an (N, T, V) logits tensor.

    The backbone's hidden states at the response positions are gathered, (M, H), and the output head plus
    logsumexp run over ``chunk_size`` of them at a time (more with a vocabulary under 131,072 tokens: see
    ``chunk_positions``); with gradients, each chunk is recomputed in the backward
    pass (activation checkpointing), so the extra memory is one chunk's (chunk_size, V) float32 logits and their
    gradient, whatever T. A model whose logits are not ``head(hidden states)`` (see ``split_head``) is scored from its
    full logits instead, chunked over positions (``token_logps``).

    ``keep_bytes``: when the float32 logits of all M response positions take at most this many bytes, the head
    runs once over them and, with gradients, its logits are kept for the backward pass instead of recomputed (the
    recomputation costs a second head forward; below this size memory is not worth it).

    ``min_chunks``: run the head at least this many times (extra calls on a stand-in position, their result
    discarded). Under ZeRO-3 every call of the head is collective, so every process must make as many.

    ``share_prompts``: rows with the same prompt (a pair's chosen and rejected response) run it through the backbone
    once; the responses attend to its cached keys and values, through which gradients flow (``shared_prompt_states``).
    Taken only where the model's cache gives the unshared values (checked once per model, ``prompt_sharing``); the
    backbone is then called twice per batch whether or not a prompt repeats, so that every process calls it as often.
    """
    split = split_head(model)
    chunk_size = chunk_positions(model, chunk_size)
    mask = loss_mask[:, 1:].bool()  # position t predicts token t+1
    counts = mask.sum(-1).to(torch.float32)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
        logps = token_logps(logits[:, :-1], input_ids[:, 1:], chunk_size)
        return SequenceLogps((logps * mask).sum(-1), counts)
    backbone, head, cap = split
    # a sequence whose response starts at its first token (no prompt: no BOS, an empty prompt text) has nothing to
    # share; its batch runs whole
    if share_prompts and bool(loss_mask[:, 0].eq(0).all()) and prompt_sharing(model, backbone):
        hidden, targets, mask = shared_prompt_states(backbone, input_ids, attention_mask, loss_mask)
    else:  # hidden[:, t] predicts token t + 1
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0][:, :-1]
        targets = input_ids[:, 1:]
    rows = mask.nonzero(as_tuple=True)[0]  # (M,) the sequence of each response position
    states, targets = hidden[mask], targets[mask]  # (M, H), (M,)
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad
    if not min_chunks and states.shape[0] * _vocab(model) * 4 <= keep_bytes:  # small: one call, nothing recomputed
        chunk_size, checkpointed = max(states.shape[0], 1), False
    parts, padding = [], []
    for k in range(max(math.ceil(states.shape[0] / chunk_size), min_chunks)):
        start = k * chunk_size
        if start < states.shape[0]:
            args = (head, cap, states[start : start + chunk_size], targets[start : start + chunk_size])
        else:  # a stand-in call: the first position of the batch, scored and discarded
            args = (head, cap, hidden[:1, 0], input_ids[:1, 0])
        out = checkpoint(_head_logps, *args, use_reentrant=False) if checkpointed else _head_logps(*args)
        (parts if start < states.shape[0] else padding).append(out)
    token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token)
    if padding:  # kept in the graph with weight 0, so the backward pass recomputes them as well
        sums = sums + 0.0 * torch.cat(padding).sum()
    return SequenceLogps(sums, counts)


def shared_prompt_states(
    backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backbone's hidden states that predict each response token, with every distinct prompt run once.

    A row's prompt is its tokens before the first ``loss_mask`` position. The K distinct prompts run left-padded
    (positions counted from each prompt's first token) with the KV cache on; the cache is expanded to the N rows and
    the responses run on it, right-padded, at positions continuing their prompt's. Response token j is predicted by
    the response's hidden state j − 1, the first one by its prompt's last.

    Returns:
        states (N, R, H), targets (N, R) and mask (N, R) bool (``loss_mask`` at the response positions); R is the
        longest response.
    """
    width = input_ids.shape[1]
    device = input_ids.device
    starts = loss_mask.int().argmax(-1)  # first response position, (N,)
    ends = attention_mask.sum(-1)
    ids = input_ids.tolist()
    groups: dict[tuple, int] = {}
    group = [groups.setdefault(tuple(row[:s]), len(groups)) for row, s in zip(ids, starts.tolist(), strict=True)]
    prompts = list(groups)
    if not all(prompts):
        raise ValueError("every sequence needs at least one prompt token before its response")
    p = max(len(prompt) for prompt in prompts)
    prompt_ids = torch.zeros((len(prompts), p), dtype=input_ids.dtype)
    prompt_mask = torch.zeros((len(prompts), p), dtype=attention_mask.dtype)
    for k, prompt in enumerate(prompts):  # left-padded, so every prompt's last token is at p - 1
        prompt_ids[k, p - len(prompt) :] = torch.tensor(prompt, dtype=input_ids.dtype)
        prompt_mask[k, p - len(prompt) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    name = cache_argument(backbone)
    prompt_states, cache = out[0], out.get(name)  # (K, p, H)
    if cache is None:
        raise ValueError(f"{type(backbone).__name__} returned no KV cache")
    index = torch.tensor(group, device=device)
    cache.reorder_cache(index)  # (K, ...) -> (N, ...), differentiable (index_select)
    r = int((ends - starts).max())
    at = starts[:, None] + torch.arange(r, device=device)  # (N, r) positions of the response tokens
    inside = at < width
    at = at.clamp(max=width - 1)
    targets = input_ids.gather(1, at)
    response_mask = attention_mask.gather(1, at) * inside
    hidden = backbone(
        input_ids=targets,
        attention_mask=torch.cat([prompt_mask[index], response_mask], dim=1),
        position_ids=starts[:, None] + torch.arange(r, device=device),
        use_cache=True,
        **{name: cache},
    )[0]  # (N, r, H)
    states = torch.cat([prompt_states[index, -1:], hidden[:, :-1]], dim=1)
    return states, targets, (loss_mask.gather(1, at) * inside).bool()


def cache_argument(model: torch.nn.Module) -> str:
    """The name of the KV cache in a transformers model's arguments and outputs (a PEFT wrapper's: its base model's):
    ``cache`` in recent transformers, ``past_key_values`` in earlier ones."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether a transformers model's ``forward`` takes the argument ``name`` (a PEFT wrapper forwards its keyword
    arguments to its base model, whose signature decides)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


_SHARING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> whether shared prompts give the same


def prompt_sharing(model: torch.nn.Module, backbone: torch.nn.Module) -> bool:
    """Whether ``shared_prompt_states`` gives the model's unshared hidden states: checked once per model on two short
    responses to one prompt and a second, shorter prompt (left padding), in eval mode. A model whose cache cannot be
    expanded, or whose positions or masks it does not follow, shares nothing (with a warning)."""
    if model in _SHARING:
        return _SHARING[model]
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 0], [2, 4, 6, 0, 0, 0]]  # prompts of 3, 3 and 2 tokens
    ids = torch.tensor(rows, device=device) % vocab
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 3 + [0] * 3], device=device)
    loss = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0][:, :-1][loss[:, 1:].bool()]
            states, _, picked = shared_prompt_states(backbone, ids, mask, loss)
            ok = states[picked].shape == want.shape and torch.allclose(states[picked], want, atol=1e-4, rtol=1e-3)
            problem = "its hidden states differ"
    except Exception as err:  # noqa: BLE001 - any model that cannot do it falls back
        ok, problem = False, f"{type(err).__name__}: {err}"
    finally:
        model.train(was_training)
    if not ok:
        name = type(getattr(model, "get_base_model", lambda: model)()).__name__
        warnings.warn(
            f"{name}: a prompt shared by several responses cannot be run once through its KV cache "
            f"({problem}); every sequence runs its own prompt",
            stacklevel=3,
        )
    _SHARING[model] = ok
    return ok


FULL_CHUNK_VOCAB = 131_072  # vocabularies this large or larger take chunk_size positions per chunk


def chunk_positions(model: torch.nn.Module, chunk_size: int) -> int:
    """Positions per chunk: ``chunk_size`` at vocabularies of 131,072 tokens or more; proportionally more below, so
    that a chunk's logits never exceed ``chunk_size`` × 131,072 values (a smaller vocabulary then needs fewer chunks,
    each a recomputed head call)."""
    return max(chunk_size, chunk_size * FULL_CHUNK_VOCAB // _vocab(model))


def _vocab(model: torch.nn.Module) -> int:
    return getattr(getattr(model, "config", None), "vocab_size", None) or FULL_CHUNK_VOCAB


def _head_logps(head: torch.nn.Module, cap: float | None, states: torch.Tensor, targets: torch.Tensor):
    """log softmax(head(states))[targets], (c,) float32, for c positions."""
    logits = head(states).float()  # (c, V)
    if cap:  # final-logit soft-capping (Gemma 2/3)
        logits = torch.tanh(logits / cap) * cap
    return _PickedLogSoftmax.apply(logits, targets)


class _PickedLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[targets], (c,), whose backward pass needs the logits and one more tensor of their size
    (autograd's logsumexp and gather keep and allocate about four): softmax − one-hot, scaled, in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        norm = logits.logsumexp(-1)
        ctx.save_for_backward(logits, norm, targets)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, norm, targets = ctx.saved_tensors
        out = (logits - norm[:, None]).exp_().mul_(-grad[:, None])  # −g·softmax
        return out.scatter_add_(-1, targets[:, None], grad[:, None]), None


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (backbone, head, cap), or None


def split_head(model: torch.nn.Module) -> tuple | None:
    """``(backbone, output head, soft-cap)`` of a transformers causal LM (also inside a PEFT wrapper), such that
    ``model(x).logits == head(backbone(x)[0])`` (soft-capped where the config says so); ``None`` when the model has no
    such split. Checked once per model on a short input against the model's own logits: a model that processes its
    logits further (a scale, another transform) falls back to the full-logits path with a warning."""
    if model in _SPLITS:
        return _SPLITS[model]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model: its wrapped LM
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = getattr(inner, "base_model", None)
    config = getattr(inner, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    split = None
    if isinstance(head, torch.nn.Module) and isinstance(backbone, torch.nn.Module) and backbone is not inner:
        split = (backbone, head, cap)
        if not _same_logits(model, split):
            name = type(inner).__name__
            warnings.warn(
                f"{name}: its logits are not the output head applied to the last hidden states; log-probs "
                "are computed from the full logits (more memory)",
                stacklevel=3,
            )
            split = None
    _SPLITS[model] = split
    return split


@torch.no_grad()
def _same_logits(model: torch.nn.Module, split: tuple) -> bool:
    backbone, head, cap = split
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or head.weight.shape[0]
    ids = torch.arange(min(8, vocab), device=head.weight.device)[None] % vocab  # (1, 8)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logits = head(backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0]).float()
    finally:
        model.train(was_training)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return want.shape == logits.shape and torch.allclose(want, logits, atol=1e-4, rtol=1e-4)
