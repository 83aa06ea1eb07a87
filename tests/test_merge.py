"""Merging K LoRA members into one adapter: hand-checked numbers, and agreement with PEFT's own merge."""

import copy

import pytest
import torch
from torch.testing import assert_close

from bpo_lightning.merge import merge_adapter_states, merge_lora_pair, merged_delta, merged_rank

RULES = ["peft_linear", "mean"]
R, ALPHA, K = 4, 8, 3  # members' rank, lora_alpha and count in the PEFT tests: scaling s = 2
TARGETS = ["q_proj", "v_proj", "down_proj"]  # v_proj is 16 -> 8 and down_proj 32 -> 16, so in != out is covered


def random_factors(k, r=2, n_in=5, n_out=3, seed=0, dtype=torch.float64):
    """K random (A, B) factor lists with A (r, in) and B (out, r)."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, n_in, generator=g, dtype=dtype) for _ in range(k)]
    Bs = [torch.randn(n_out, r, generator=g, dtype=dtype) for _ in range(k)]
    return As, Bs


@pytest.mark.parametrize("rule", RULES)
def test_one_member_is_identity(rule):
    (A,), (B,) = random_factors(1)
    assert_close(merged_delta([A], [B], 2.0, rule), 2.0 * B @ A)
    a, b, scaling = merge_lora_pair([A], [B], 2.0, rule)
    assert scaling == 1.0 and a.shape == A.shape and b.shape == B.shape


def test_identical_members_give_k_times_under_peft_linear_and_once_under_mean():
    (A,), (B,) = random_factors(1)
    single = 2.0 * B @ A
    # Every cross term B_i·A_j equals B·A, so peft_linear's (s/K)·(K·B)·(K·A) is K·s·B·A.
    assert_close(merged_delta([A] * K, [B] * K, 2.0, "peft_linear"), K * single)
    assert_close(merged_delta([A] * K, [B] * K, 2.0, "mean"), single)


def test_hand_computed_two_by_two():
    """K = 2 members of rank 1 on a 2×2 weight, s = 2, so s/K = 1.

    A_1 = [1 2], B_1 = [1 0]ᵀ  ->  B_1 A_1 = [[1, 2], [0, 0]]
    A_2 = [0 1], B_2 = [3 1]ᵀ  ->  B_2 A_2 = [[0, 3], [0, 1]]

    mean:        ΔW = (s/K)(B_1 A_1 + B_2 A_2) = [[1, 5], [0, 1]]
    peft_linear: ΔW = (s/K)(B_1 + B_2)(A_1 + A_2) = [4 1]ᵀ [1 3] = [[4, 12], [1, 3]]
                 = mean + (s/K)(B_1 A_2 + B_2 A_1) = [[1, 5], [0, 1]] + ([[0, 1], [0, 0]] + [[3, 6], [1, 2]])

    Factors: peft_linear A = sqrt(1)·(A_1 + A_2) = [1 3], B = [4 1]ᵀ;
             mean A = (s/K)·[A_1; A_2] = [[1, 2], [0, 1]], B = [B_1 B_2] = [[1, 3], [0, 1]].
    """
    As = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])]
    Bs = [torch.tensor([[1.0], [0.0]]), torch.tensor([[3.0], [1.0]])]
    assert_close(merged_delta(As, Bs, 2.0, "mean"), torch.tensor([[1.0, 5.0], [0.0, 1.0]]))
    assert_close(merged_delta(As, Bs, 2.0, "peft_linear"), torch.tensor([[4.0, 12.0], [1.0, 3.0]]))

    a, b, s = merge_lora_pair(As, Bs, 2.0, "peft_linear")
    assert_close(a, torch.tensor([[1.0, 3.0]]))
    assert_close(b, torch.tensor([[4.0], [1.0]]))
    assert s == 1.0
    a, b, s = merge_lora_pair(As, Bs, 2.0, "mean")
    assert_close(a, torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    assert_close(b, torch.tensor([[1.0, 3.0], [0.0, 1.0]]))
    assert s == 1.0


@pytest.mark.parametrize("rule", RULES)
def test_decomposition_into_mean_and_cross_terms(rule):
    As, Bs = random_factors(K)
    s = 2.0
    mean = sum(s * b @ a for a, b in zip(As, Bs, strict=True)) / K
    cross = sum(s / K * Bs[i] @ As[j] for i in range(K) for j in range(K) if i != j)
    assert_close(merged_delta(As, Bs, s, rule), mean + cross if rule == "peft_linear" else mean)


def test_low_precision_members_keep_their_dtype():
    As, Bs = random_factors(K, dtype=torch.bfloat16)
    for rule in RULES:
        a, b, _ = merge_lora_pair(As, Bs, 2.0, rule)
        assert a.dtype == b.dtype == torch.bfloat16


def test_merged_rank():
    assert merged_rank(4, 3, "peft_linear") == 4
    assert merged_rank(4, 3, "mean") == 12


# --- agreement with PEFT ----------------------------------------------------------------------------------------
# A Llama-style tiny model, whose targets are plain nn.Linear (weight (out, in), ΔW added as is); GPT-2's Conv1D
# would store the transpose.


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def with_members(base):
    """Wrap ``base`` with K LoRA members m0..m{K-1}; random A and B (init_lora_weights=False) so ΔW != 0."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(base, config, adapter_name="m0")
    for i in range(1, K):
        torch.manual_seed(1 + i)
        model.add_adapter(f"m{i}", config)
    return model


def member_states(model):
    from peft import get_peft_model_state_dict

    return [get_peft_model_state_dict(model, adapter_name=f"m{i}") for i in range(K)]


def factor_pairs(state):
    """(A key, B key) of every LoRA layer in an adapter state."""
    return [(key, key.replace("lora_A.weight", "lora_B.weight")) for key in state if key.endswith("lora_A.weight")]


@pytest.mark.parametrize(("rule", "combination_type"), [("peft_linear", "linear"), ("mean", "cat")])
def test_matches_peft_add_weighted_adapter(rule, combination_type):
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    model = with_members(tiny_llama())
    states = member_states(model)
    model.add_weighted_adapter([f"m{i}" for i in range(K)], [1 / K] * K, "merged", combination_type=combination_type)
    theirs = get_peft_model_state_dict(model, adapter_name="merged")
    ours = merge_adapter_states(states, ALPHA / R, rule)

    # PEFT gives the merged adapter r = lora_alpha = new rank, i.e. scaling 1, like merge_lora_pair.
    assert model.peft_config["merged"].r == model.peft_config["merged"].lora_alpha == merged_rank(R, K, rule)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(TARGETS) and all(m.scaling["merged"] == 1.0 for m in layers)

    assert ours.keys() == theirs.keys()
    for a_key, b_key in factor_pairs(theirs):
        # Same factors (PEFT's layout), hence the same ΔW, to float32 rounding.
        assert_close(ours[a_key], theirs[a_key], rtol=0, atol=1e-6)
        assert_close(ours[b_key], theirs[b_key], rtol=0, atol=1e-6)
        assert_close(ours[b_key] @ ours[a_key], theirs[b_key] @ theirs[a_key], rtol=0, atol=1e-6)
        members_a = [s[a_key] for s in states]
        members_b = [s[b_key] for s in states]
        assert_close(merged_delta(members_a, members_b, ALPHA / R, rule), theirs[b_key] @ theirs[a_key])


@pytest.mark.parametrize("rule", RULES)
def test_merged_adapter_forward_equals_base_plus_delta(rule):
    from peft import LoraConfig, set_peft_model_state_dict

    base = tiny_llama()
    reference = copy.deepcopy(base)  # before PEFT wraps base's layers in place
    model = with_members(base)
    states = member_states(model)
    merged = merge_adapter_states(states, ALPHA / R, rule)

    rank = merged_rank(R, K, rule)
    model.add_adapter("soup", LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0))
    loaded = set_peft_model_state_dict(model, merged, adapter_name="soup")
    assert not loaded.unexpected_keys
    model.set_adapter("soup")

    with torch.no_grad():
        for a_key, b_key in factor_pairs(merged):
            name = a_key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            delta = merged_delta([s[a_key] for s in states], [s[b_key] for s in states], ALPHA / R, rule)
            reference.get_submodule(name).weight += delta
        input_ids = torch.tensor([[1, 5, 7, 2, 30, 11]])
        expected = reference(input_ids).logits
        got = model.eval()(input_ids).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            untouched = plain(input_ids).logits
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, untouched, atol=1e-3)  # the adapter does change the output


# --- bad input --------------------------------------------------------------------------------------------------


def test_no_members_raises():
    with pytest.raises(ValueError, match="K >= 1"):
        merge_lora_pair([], [], 2.0, "mean")
    with pytest.raises(ValueError, match="K >= 1"):
        merge_adapter_states([], 2.0, "mean")
    with pytest.raises(ValueError, match="K >= 1"):
        merged_rank(4, 0, "mean")


def test_unknown_rule_names_the_config_key():
    As, Bs = random_factors(2)
    with pytest.raises(ValueError, match=r"model\.lora\.merge.*'svd'"):
        merge_lora_pair(As, Bs, 2.0, "svd")
    with pytest.raises(ValueError, match=r"model\.lora\.merge"):
        merge_adapter_states([{}], 2.0, "linear")


def test_mismatched_shapes_raise():
    As, Bs = random_factors(2)
    with pytest.raises(ValueError, match="A factors must have the same shape"):
        merge_lora_pair([As[0], As[1][:, :4]], Bs, 2.0, "peft_linear")
    with pytest.raises(ValueError, match="B factors must have the same shape"):
        merge_lora_pair(As, [Bs[0], Bs[1][:2]], 2.0, "mean")
    with pytest.raises(ValueError, match=r"A of shape \(r, in\) and B of shape \(out, r\)"):
        merge_lora_pair([a[:1] for a in As], Bs, 2.0, "mean")  # rank 1 A with rank 2 B
    with pytest.raises(ValueError, match="one B per A"):
        merge_lora_pair(As, Bs[:1], 2.0, "mean")
    with pytest.raises(ValueError, match="scaling"):
        merge_lora_pair(As, Bs, 0.0, "mean")


def test_adapter_states_keys():
    As, Bs = random_factors(2)
    prefix = "base_model.model.layer.q_proj"
    states = [{f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b} for a, b in zip(As, Bs, strict=True)]

    # A non-factor key is kept when every member agrees on it, and refused when they differ.
    same = [dict(s, **{"base_model.model.score.weight": torch.ones(2)}) for s in states]
    assert_close(merge_adapter_states(same, 2.0, "mean")["base_model.model.score.weight"], torch.ones(2))
    differ = [dict(s, **{"base_model.model.score.weight": torch.full((2,), float(i))}) for i, s in enumerate(states)]
    with pytest.raises(ValueError, match="score.weight.*differs between members"):
        merge_adapter_states(differ, 2.0, "mean")

    with pytest.raises(ValueError, match="different keys"):
        merge_adapter_states([states[0], {f"{prefix}.lora_A.weight": As[1]}], 2.0, "mean")
    with pytest.raises(ValueError, match="no partner"):
        merge_adapter_states([{f"{prefix}.lora_A.weight": a} for a in As], 2.0, "mean")
