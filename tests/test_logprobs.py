"""Sequence log-probs from hidden states, chunk by chunk: the same values and gradients as a full log-softmax over
the model's logits, for GPT-2 (tied head), Llama- and Qwen-style heads, Gemma's soft-capped logits and a LoRA
policy; a model whose logits are transformed further falls back to its full logits with a warning."""

import functools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.testing import assert_close

import bpo_lightning.logprobs as logprobs
from bpo_lightning.batches import right_padded
from bpo_lightning.logprobs import chunk_positions, sequence_logps, split_head

V = 97


@pytest.fixture(autouse=True)
def chunks_of_chunk_size(monkeypatch):
    """This file's models have 97 tokens, which ``chunk_positions`` would score in one chunk: test the chunk loop
    with ``chunk`` positions per chunk, as a large vocabulary has."""
    monkeypatch.setattr(logprobs, "FULL_CHUNK_VOCAB", 0)


def test_small_vocabularies_take_more_positions_per_chunk(monkeypatch):
    monkeypatch.setattr(logprobs, "FULL_CHUNK_VOCAB", 131_072)
    sized = [chunk_positions(SimpleNamespace(config=SimpleNamespace(vocab_size=v)), 32) for v in (768, 49_152, 262_144)]
    assert sized == [5461, 85, 32]  # a chunk holds at most 32 × 131,072 logits
    model = tiny("gpt2").eval()
    b = batch()
    one = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 1).sums  # 1351 positions a chunk
    monkeypatch.setattr(logprobs, "FULL_CHUNK_VOCAB", 0)
    per_position = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 1).sums
    assert_close(one, per_position, atol=1e-5, rtol=1e-5)


def tiny(kind: str):
    torch.manual_seed(0)
    common = {
        "vocab_size": V,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    if kind == "qwen2-tied":
        config = transformers.Qwen2Config(tie_word_embeddings=True, num_key_value_heads=2, **common)
        return transformers.Qwen2ForCausalLM(config)
    if kind == "gemma2-softcap":
        config = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, **common)
        return transformers.Gemma2ForCausalLM(config)
    if kind == "cohere-scaled":  # logits = head(h) * logit_scale: not separable
        return transformers.CohereForCausalLM(
            transformers.CohereConfig(num_key_value_heads=2, logit_scale=0.3, **common)
        )
    raise ValueError(kind)


def batch():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (12, 20, 7, 16)]
    return right_padded(seqs, [3, 8, 2, 5], pad_id=0)


def reference(model, b):
    """The naive definition: log_softmax over the full logits, response positions summed."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * b["loss_mask"][:, 1:]).sum(-1)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2-tied", "gemma2-softcap"])
@pytest.mark.parametrize("chunk", [1, 5, 128])
def test_flat_logps_equal_the_full_log_softmax_with_gradients(kind, chunk):
    model = tiny(kind).eval()
    b = batch()
    assert split_head(model) is not None  # the chunked path is taken
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], chunk)
    assert_same_as_reference(model, b, got, weights)


def assert_same_as_reference(model, b, got, weights):
    """``got`` equals the naive definition on batch ``b``: values, token counts, and the gradients of the weighted
    sum for every parameter (none missing)."""
    model.zero_grad()
    (got.sums * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = reference(model, b)
    (want * weights).sum().backward()
    assert_close(got.sums, want, atol=1e-5, rtol=1e-5)
    assert got.counts.tolist() == b["loss_mask"][:, 1:].sum(-1).float().tolist()
    assert len(grads) == len([p for p in model.parameters() if p.grad is not None])
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_lora_policy_takes_the_chunked_path():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for module in model.modules():  # non-zero adapters, so that they matter
        if hasattr(module, "lora_B"):
            for b_weight in module.lora_B.values():
                torch.nn.init.normal_(b_weight.weight, std=0.5)
    model.eval()
    b = batch()
    assert split_head(model) is not None
    got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 4)
    assert_close(got.sums, reference(model, b), atol=1e-5, rtol=1e-5)


def test_logits_transformed_after_the_head_fall_back_to_full_logits():
    model = tiny("cohere-scaled").eval()
    b = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 4)
    assert any("logits are not the output head" in str(w.message) for w in caught)
    assert split_head(model) is None
    assert_close(got.sums, reference(model, b), atol=1e-5, rtol=1e-5)


def test_stand_in_head_calls_change_neither_values_nor_gradients():
    """Under ZeRO-3 every process calls the head as often as the busiest one (``min_chunks``)."""
    model = tiny("gpt2").eval()  # no dropout
    b = batch()
    results = []
    for least in (0, 40):
        model.zero_grad()
        out = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 8, min_chunks=least)
        out.sums.sum().backward()
        results.append((out.sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["gpt2", "gemma2-softcap"])
def test_small_logits_are_kept_for_the_backward_pass_not_recomputed(kind):
    """Below ``keep_bytes`` the head runs once and its logits serve the backward pass: the same values and
    gradients as the full log-softmax, with one head call instead of two per chunk (forward + recomputation).
    Above it, the chunks are recomputed."""
    model = tiny(kind).eval()
    b = batch()
    positions = int(b["loss_mask"][:, 1:].sum())
    head = split_head(model)[1]
    calls = []
    handle = head.register_forward_hook(lambda *_: calls.append(1))
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    try:
        for keep, head_calls in ((positions * V * 4, 1), (positions * V * 4 - 1, 2 * math.ceil(positions / 8))):
            calls.clear()
            model.zero_grad()
            got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 8, keep_bytes=keep)
            (got.sums * weights).sum().backward()
            assert len(calls) == head_calls
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad()
            want = reference(model, b)
            (want * weights).sum().backward()
            assert_close(got.sums, want, atol=1e-5, rtol=1e-5)
            for name, p in model.named_parameters():
                if p.grad is not None:
                    assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        handle.remove()


def shared_batch():
    """Three pairs: each prompt (3, 8 and 2 tokens) with two responses of different lengths, chosen rows first."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 8, 2)]
    lengths = ((9, 4), (12, 12), (5, 1))
    responses = [[torch.randint(0, V, (n,), generator=g).tolist() for n in pair] for pair in lengths]
    seqs = [p + r[side] for side in (0, 1) for p, r in zip(prompts, responses, strict=True)]
    return right_padded(seqs, [len(p) for p in prompts] * 2, pad_id=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2-tied", "gemma2-softcap", "lora"])
def test_a_shared_prompt_runs_once_with_the_same_values_and_gradients(kind):
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for module in model.modules():  # non-zero adapters, so that they matter
            if hasattr(module, "lora_B"):
                for b_weight in module.lora_B.values():
                    torch.nn.init.normal_(b_weight.weight, std=0.5)
    else:
        model = tiny(kind)
    model.eval()
    b = shared_batch()
    backbone = split_head(model)[0]
    assert logprobs.prompt_sharing(model, backbone)
    seen = []  # (rows, tokens) of every backbone call
    handle = backbone.register_forward_pre_hook(
        lambda _, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    try:
        got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 4, share_prompts=True)
    finally:
        handle.remove()
    assert seen == [(3, 8), (6, 12)]  # 3 prompts, left-padded to 8 tokens; 6 responses of at most 12 tokens
    assert_same_as_reference(model, b, got, weights)


def test_a_model_whose_cache_cannot_be_shared_runs_every_sequence_whole():
    """A backbone that ignores the positions it is given (here: they are dropped) gives other hidden states on the
    shared path when its position embeddings are absolute (GPT-2's; rotary ones see only relative positions): found
    by the one-time check, warned about, and every sequence then runs whole."""
    model = tiny("gpt2").eval()
    backbone = split_head(model)[0]
    forward = backbone.forward

    @functools.wraps(forward)
    def without_positions(*args, position_ids=None, **kwargs):
        return forward(*args, **kwargs)

    backbone.forward = without_positions
    b = shared_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 4, share_prompts=True)
    assert any("cannot be run once through its KV cache" in str(w.message) for w in caught)
    assert not logprobs.prompt_sharing(model, backbone)
    assert_close(got.sums, reference(model, b), atol=1e-5, rtol=1e-5)


def test_a_batch_with_a_response_at_its_first_token_runs_whole():
    """A sequence without prompt tokens (no BOS, empty prompt) has nothing to share: its batch runs every sequence
    whole, with the same values as the full log-softmax."""
    model = tiny("llama").eval()
    b = right_padded([[5, 6, 7, 8], [9, 10, 11]], [0, 1], pad_id=0)  # the first one has no prompt
    backbone = split_head(model)[0]
    seen = []
    handle = backbone.register_forward_pre_hook(
        lambda _, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        got = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], 4, share_prompts=True)
    finally:
        handle.remove()
    assert seen == [(2, 4)]  # one call, on the whole sequences
    assert_close(got.sums, reference(model, b), atol=1e-5, rtol=1e-5)
