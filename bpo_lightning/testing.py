"""Conformance checks for preference losses and samplers, for a plugin's own tests.

    from bpo_lightning.testing import check_loss, check_sampler

    def test_my_loss_conforms():
        check_loss(MyLoss)                 # the class (built with its defaults) or an instance: MyLoss(beta=0.3)

    def test_my_sampler_conforms(model, tokenizer):
        check_sampler(MySampler(max_new_tokens=16), model, tokenizer, ["a prompt", "another prompt"])

Training runs in float32 or bfloat16, so every check runs in float64, float32 and bfloat16:

- the class is a ``PreferenceLoss`` and its docstring cites its paper (an arXiv id, a DOI or a URL);
- per-pair losses of shape (B,) and finite, with finite gradients, for margins h from −1000 to 1000 nats (sums of
  log-probabilities differ by that much on long responses; ``exp(−βh)`` overflows float32 there);
- no gradient reaches the behavior/reference log-probabilities, and the implicit rewards are detached;
- at h = 0 the gradient pushes the margin up (the loss falls as the chosen response gains on the rejected one).

``loss_problems`` returns what fails as a list of sentences; ``check_loss`` raises ``AssertionError`` listing them.
The built-in losses pass (``tests/test_losses.py``).

A sampler (``sampler_problems`` / ``check_sampler``) is held to the ``Sampler`` contract with a real model and
tokenizer: ``Samples`` with one entry per prompt and ``num_samples`` per prompt; ``prompt_ids`` as ``encode_prompt``
makes them with the sampler's ``max_prompt_tokens`` and ``add_bos`` (training sees exactly the sampled context);
no EOS inside ``response_ids`` (training appends it: a kept EOS is scored twice and h is not 0 at a phase start);
``finished`` consistent with ``max_new_tokens``; ``responses`` the decoded ids; recorded log-probabilities, where
there are any, equal to the model's own (raw logits, no temperature) within ``atol``; the same seed, the same
samples. The built-in samplers pass (``tests/test_sampling.py``).
"""

from __future__ import annotations

import re

import torch

from bpo_lightning.losses import PreferenceLoss
from bpo_lightning.sampling import Sampler, encode_prompt

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
EXTREME_MARGINS = (-1000.0, -100.0, -1e-3, 0.0, 1e-3, 100.0, 1000.0)
_CITATION = re.compile(r"arXiv[\s:]*\d{4}\.\d{4,5}|doi\.org/|\b10\.\d{4,9}/|https?://", re.I)


def loss_problems(loss: PreferenceLoss | type, dtypes=DTYPES) -> list[str]:
    """What ``loss`` (an instance, or a class built with its defaults) gets wrong; empty when it conforms."""
    cls = loss if isinstance(loss, type) else type(loss)
    name = cls.__name__
    if not issubclass(cls, PreferenceLoss):
        return [f"{name} is not a subclass of bpo_lightning.PreferenceLoss"]
    problems = []
    if not _CITATION.search(cls.__doc__ or ""):
        problems.append(f"{name}: the docstring must cite the loss's paper (an arXiv id, a DOI or a URL)")
    if not isinstance(cls.average_log_prob, bool):
        problems.append(f"{name}.average_log_prob must be True or False")
    instance = loss if not isinstance(loss, type) else cls()
    for dtype in dtypes:
        problems += [f"{name} in {str(dtype).removeprefix('torch.')}: {p}" for p in _problems(instance, dtype)]
    return problems


def check_loss(loss: PreferenceLoss | type, dtypes=DTYPES) -> None:
    """Raise ``AssertionError`` listing every way ``loss`` does not conform (see the module docstring)."""
    problems = loss_problems(loss, dtypes)
    if problems:
        raise AssertionError("; ".join(problems))


def _problems(loss: PreferenceLoss, dtype: torch.dtype) -> list[str]:
    problems = []
    margins = torch.tensor(EXTREME_MARGINS, dtype=torch.float64)
    # realistic magnitudes: sums of log-probs of long responses, with the margin split over chosen and rejected
    policy_c = (-1500.0 + margins / 2).to(dtype).requires_grad_()
    policy_r = (-1500.0 - margins / 2).to(dtype).requires_grad_()
    behavior_c = torch.full_like(policy_c, -1500.0, requires_grad=True)
    behavior_r = torch.full_like(policy_r, -1500.0, requires_grad=True)
    out = loss(policy_c, policy_r, behavior_c, behavior_r)
    if out.losses.shape != (len(EXTREME_MARGINS),):
        return [f"losses have shape {tuple(out.losses.shape)}, expected one per pair ({len(EXTREME_MARGINS)},)"]
    if not torch.isfinite(out.losses).all():
        finite = torch.isfinite(out.losses).tolist()
        bad = [m for m, ok in zip(EXTREME_MARGINS, finite, strict=True) if not ok]
        problems.append(f"the loss is not finite for margins h = {bad} (use log-sigmoid / softplus forms)")
    out.losses.sum().backward()
    if policy_c.grad is None or not torch.isfinite(policy_c.grad).all() or not torch.isfinite(policy_r.grad).all():
        problems.append("the gradient is not finite for margins from -1000 to 1000")
    if behavior_c.grad is not None or behavior_r.grad is not None:
        problems.append("a gradient reaches the behavior/reference log-probs (they must be constants)")
    if out.chosen_rewards.requires_grad or out.rejected_rewards.requires_grad:
        problems.append("the implicit rewards must be detached")
    h = torch.zeros(1, dtype=dtype, requires_grad=True)  # at h = 0 the margin must be pushed up
    zero = torch.zeros(1, dtype=dtype)
    loss(h, zero, zero, zero).losses.sum().backward()
    if not h.grad.item() < 0:
        problems.append(
            f"at margin 0 the loss's gradient with respect to h is {h.grad.item():g}, not negative: "
            "training would not prefer the chosen response"
        )
    return problems


def sampler_problems(sampler: Sampler, model, tokenizer, prompts: list, seed: int = 0, atol: float = 1e-3) -> list[str]:
    """What ``sampler`` gets wrong when it samples ``prompts`` from ``model``; empty when it conforms."""
    name = type(sampler).__name__
    if not isinstance(sampler, Sampler):
        return [f"{name} is not a subclass of bpo_lightning.Sampler"]
    out = sampler.sample(model, tokenizer, prompts, seed=seed)
    n, k = len(prompts), sampler.num_samples
    problems = [
        f"{name}: Samples.{field} has {len(value)} entries for {n} prompts"
        for field, value in _fields(out)
        if len(value) != n
    ]
    if problems:
        return problems
    limit = sampler.max_new_tokens
    most = sampler.max_prompt_tokens or 1 << 30
    for p, prompt in enumerate(prompts):
        expected = encode_prompt(tokenizer, prompt, most, sampler.add_bos)
        if out.prompt_ids[p] != expected:
            problems.append(
                f"{name}: prompt {p}'s prompt_ids are not encode_prompt(tokenizer, prompt, "
                f"max_prompt_tokens, add_bos): {out.prompt_ids[p][:8]}… vs {expected[:8]}…"
            )
        for field, value in _fields(out):
            if field != "prompt_ids" and len(value[p]) != k:
                problems.append(f"{name}: Samples.{field}[{p}] has {len(value[p])} entries, num_samples is {k}")
        for j, (ids, done) in enumerate(zip(out.response_ids[p], out.finished[p], strict=False)):
            text = out.responses[p][j] if j < len(out.responses[p]) else None
            problems += _response_problems(f"{name}: prompt {p} response {j}", ids, done, text, tokenizer, limit)
    if problems:
        return problems
    if out.logps is not None and out.eos_logps is not None:
        problems += _logp_problems(name, out, model, tokenizer, atol)
    again = sampler.sample(model, tokenizer, prompts, seed=seed)
    if again.response_ids != out.response_ids:
        problems.append(f"{name}: the same seed and prompts gave other samples")
    return problems


def _response_problems(where: str, ids: list[int], done, text: str | None, tokenizer, limit: int | None) -> list[str]:
    """What is wrong with one response's ids, ``finished`` flag and text."""
    problems, eos = [], tokenizer.eos_token_id
    if eos in ids:
        problems.append(
            f"{where}: response_ids hold EOS (token {eos}); leave it out, the training batches append it "
            "(else it is scored twice)"
        )
    if not isinstance(done, bool):
        problems.append(f"{where}: finished must be a bool, got {done!r}")
    elif limit is not None and (len(ids) > limit or (not done and len(ids) != limit)):
        problems.append(
            f"{where}: {len(ids)} tokens, finished={done}, max_new_tokens={limit} (a response without "
            "EOS is cut exactly at max_new_tokens)"
        )
    if text is not None and text != tokenizer.decode(ids, skip_special_tokens=True):
        problems.append(f"{where}: responses are not response_ids decoded (skip_special_tokens)")
    return problems


def check_sampler(sampler: Sampler, model, tokenizer, prompts: list, seed: int = 0, atol: float = 1e-3) -> None:
    """Raise ``AssertionError`` listing every way ``sampler`` does not conform (see the module docstring)."""
    problems = sampler_problems(sampler, model, tokenizer, prompts, seed, atol)
    if problems:
        raise AssertionError("; ".join(problems))


def _fields(out) -> list[tuple[str, list]]:
    names = ("prompt_ids", "response_ids", "responses", "finished", "logps", "eos_logps")
    return [(name, getattr(out, name)) for name in names if getattr(out, name) is not None]


@torch.no_grad()
def _logp_problems(name: str, out, model, tokenizer, atol: float) -> list[str]:
    """Recorded log-probs against one forward pass per response (float32 log-softmax of the raw logits)."""
    problems = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the sampling model's log-probs: no dropout
    try:
        problems = _compare_logps(name, out, model, tokenizer, atol, device)
    finally:
        model.train(was_training)
    return problems


def _compare_logps(name: str, out, model, tokenizer, atol: float, device) -> list[str]:
    problems = []
    for p, prompt_ids in enumerate(out.prompt_ids):
        for j, ids in enumerate(out.response_ids[p]):
            seq = torch.tensor([prompt_ids + ids], device=device)
            logps = model(input_ids=seq).logits[0].float().log_softmax(-1)  # (T, V)
            start = len(prompt_ids)
            total = sum(float(logps[start - 1 + t, token]) for t, token in enumerate(ids))
            end = float(logps[start - 1 + len(ids), tokenizer.eos_token_id])
            if abs(total - out.logps[p][j]) > atol or abs(end - out.eos_logps[p][j]) > atol:
                problems.append(
                    f"{name}: prompt {p} response {j}: recorded log-probs {out.logps[p][j]:.4f} / EOS "
                    f"{out.eos_logps[p][j]:.4f}, the model gives {total:.4f} / {end:.4f} (they must be "
                    "the raw model's, before temperature, top-k or top-p)"
                )
    return problems
