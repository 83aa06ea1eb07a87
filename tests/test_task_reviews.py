"""Tests of the embedded ``reviews`` task: gold reward arithmetic, data files, tokenizer and the SFT cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpo_lightning.tasks import reviews
from bpo_lightning.tasks.reviews import (
    data_path,
    encode_example,
    ensure_sft,
    gold_details,
    gold_reward,
    load_split,
    parse_category,
    write_data,
)
from bpo_lightning.tasks.reviews_data import CATEGORIES, SPLIT_ROWS, VOCABULARY, make_splits, parse_sentence

HOTEL = "hotel review : we checked in late last week ."
# Hotel aspect weights used below: room 1.0, staff 0.95, bed 0.9. Adjectives: excellent 1.0, perfect 0.97,
# good 0.6, clean 0.45, bad -0.7, awful -1.0; verb loved 0.95. A sentence earns 0.5 * mean over clauses of w * s.
PERFECT = " the room was excellent . the staff was perfect . i loved the bed ."
PERFECT_SCORE = 0.5 * 1.0 * 1.0 + 0.5 * 0.95 * 0.97 + 0.5 * 0.9 * 0.95  # 0.5 + 0.46075 + 0.4275 = 1.38825


def test_perfect_answer_scores_high() -> None:
    """Three positive sentences about three different hotel aspects: 0.5 + 0.46075 + 0.4275 = 1.38825."""
    assert gold_reward(HOTEL, PERFECT) == pytest.approx(1.38825)
    assert gold_reward(HOTEL, PERFECT) == pytest.approx(PERFECT_SCORE)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # Off-topic aspect (phone's battery): that clause earns 0 and costs 0.3: 0.5 + 0 - 0.3 + 0.4275 = 0.6275.
        (" the room was excellent . the battery was perfect . i loved the bed .", 0.6275),
        # Negative sentence: -0.5 + 0.46075 + 0.4275 = 0.38825.
        (" the room was awful . the staff was perfect . i loved the bed .", 0.38825),
        # Repeated sentence earns nothing and costs 0.3: 0.5 + 0.46075 - 0.3 = 0.66075.
        (" the room was excellent . the staff was perfect . the room was excellent .", 0.66075),
        # Repeated aspect: generic weight 0.25 and -0.1: 0.5 + 0.46075 + 0.5 * 0.25 * 0.95 - 0.1 = 0.9795.
        (" the room was excellent . the staff was perfect . i loved the room .", 0.9795),
        # Non-word "perfcet": -0.2, and its sentence is malformed: -0.25: 0.5 + 0.4275 - 0.45 = 0.4775.
        (" the room was excellent . the staff was perfcet . i loved the bed .", 0.4775),
        # Unterminated last sentence earns nothing and costs 0.3: 0.5 + 0.46075 - 0.3 = 0.66075.
        (" the room was excellent . the staff was perfect . i loved the bed", 0.66075),
        # A 4th and 5th distinct sentence earn nothing and cost 0.1 each: 1.38825 - 0.2 = 1.18825.
        (PERFECT + " the view was excellent . the pool was excellent .", 1.18825),
        # Word salad of good words does not parse: -0.25.
        (" excellent excellent room .", -0.25),
        # Generic clause (no aspect): 0.5 * 0.25 * 1.0 = 0.125.
        (" it was excellent .", 0.125),
        # Intensifier is an exponent: 0.5 * 0.6 ** 0.5 = 0.3872983.
        (" the room was very good .", 0.5 * math.sqrt(0.6)),
        # Negation flips and damps: 0.5 * (-0.7 * -0.7) = 0.245.
        (" the room was not bad .", 0.245),
        # Two clauses are averaged: 0.5 * (1.0 * 0.45 + 0.9 * -0.7) / 2 = -0.045.
        (" the room was clean but the bed was bad .", -0.045),
        # Empty answer.
        ("", -0.5),
        # 20 non-words and no terminator: -4.3, clipped to the floor -2.0.
        (" blah" * 20, -2.0),
    ],
)
def test_gold_reward_arithmetic(response: str, expected: float) -> None:
    assert gold_reward(HOTEL, response) == pytest.approx(expected)
    assert gold_reward(HOTEL, response) < gold_reward(HOTEL, PERFECT)


def test_gold_reward_depends_on_category_and_breakdown_adds_up() -> None:
    """The same answer is on-topic for hotels and off-topic for phones (3 clauses * -0.3 = -0.9)."""
    phone = "phone review : i bought this phone last month ."
    assert parse_category(phone) == "phone"
    assert gold_reward(phone, PERFECT) == pytest.approx(-0.9)
    details = gold_details(HOTEL, " the room was excellent . the staff was perfcet . i loved the bed")
    assert details.penalties == pytest.approx({"nonword": 0.2, "malformed": 0.25, "unterminated": 0.3})
    assert details.score == pytest.approx(sum(details.credits) - sum(details.penalties.values()))
    with pytest.raises(ValueError):
        parse_category("tell me a story")


def test_repeating_or_padding_does_not_pay() -> None:
    """Length and repetition hacks score below the plain three-sentence answer."""
    assert gold_reward(HOTEL, PERFECT * 3) < gold_reward(HOTEL, PERFECT)
    assert gold_reward(HOTEL, " the room was excellent ." * 6) < gold_reward(HOTEL, " the room was excellent .")


def test_shipped_files_regenerate_byte_for_byte(tmp_path) -> None:
    for path in write_data(tmp_path):
        split = path.stem.removeprefix("reviews_")
        assert path.read_bytes() == data_path(split).read_bytes(), split


def test_splits_are_disjoint_and_well_formed() -> None:
    splits = {name: load_split(name) for name in SPLIT_ROWS}
    assert {k: len(v) for k, v in splits.items()} == SPLIT_ROWS
    prompt_sets = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert all(not (a & b) for i, a in enumerate(prompt_sets) for b in prompt_sets[i + 1 :])
    assert {parse_category(p) for p in prompt_sets[2]} == set(CATEGORIES)  # eval covers every category
    sentences = [s.split() for r in splits["sft"] for s in r["reference"].split(" .")[:-1]]
    parsed = [p for s in sentences if (p := parse_sentence(s))]
    positive = sum(sum(v for _, v in p) > 0 for p in parsed) / len(parsed)
    assert 0.55 < positive < 0.65  # imperfect references: mixed sentiment
    assert all(r["reference"].startswith(" ") and r["reference"].endswith(" .") for r in splits["sft"])
    assert make_splits(seed=1)["eval"] != splits["eval"]  # the seed matters


def test_tokenizer_round_trips_and_splits_cleanly_at_the_boundary() -> None:
    tokenizer = reviews.build_tokenizer()
    assert tokenizer.backend_tokenizer.to_str() == reviews.build_tokenizer().backend_tokenizer.to_str()
    row = load_split("eval")[0]
    text = row["prompt"] + row["reference"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    full, n_prompt = encode_example(tokenizer, row["prompt"], row["reference"])
    assert full == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert tokenizer.decode(full[n_prompt:], skip_special_tokens=True) == row["reference"]
    words = sorted(VOCABULARY)
    assert tokenizer.decode(tokenizer(" " + " ".join(words)).input_ids) == " " + " ".join(words)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(specials) == 3 and not specials & set(ids)


def test_sft_loss_masks_the_prompt_and_decreases() -> None:
    tokenizer = reviews.build_tokenizer()
    model = reviews.build_model(tokenizer, seed=0)
    rows = load_split("sft")[:64]
    batch = reviews._collate([encode_example(tokenizer, r["prompt"], r["reference"]) for r in rows[:2]], 0)
    n_prompt = encode_example(tokenizer, rows[0]["prompt"], rows[0]["reference"])[1]
    assert (batch["labels"][0, :n_prompt] == -100).all() and (batch["labels"][0, n_prompt:] != -100).any()
    losses = reviews.train_sft(model, tokenizer, rows, steps=15, seed=0, batch_size=16)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_ensure_sft_builds_a_loadable_folder_once(tmp_path, monkeypatch) -> None:
    path = ensure_sft(tmp_path, steps=5, seed=0)
    assert path.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left over
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(HOTEL, add_special_tokens=False).input_ids]
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=4)
    assert out.shape == (1, len(prompt_ids) + 4)
    assert json.loads((path / "config.json").read_text())["n_positions"] == reviews.N_POSITIONS

    def no_training(*args, **kwargs):
        raise AssertionError("a complete cached folder must be reused")

    monkeypatch.setattr(reviews, "train_sft", no_training)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_sft(tmp_path, steps=5, seed=0) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="reused"):
        ensure_sft(tmp_path, steps=6, seed=0)  # other settings, other folder: would train


def test_proxy_reward_is_hackable_where_gold_is_not():
    """Proxy: 0.25·Σ lexicon values. " the staff was great ." → 0.25·0.9 = 0.225.
    " great great great ." → 0.25·2.7 = 0.675, while the gold reward calls it malformed (negative)."""
    from bpo_lightning.tasks.reviews import proxy_reward

    prompt = "hotel review : we stayed here for a week ."
    assert proxy_reward(prompt, " the staff was great .") == pytest.approx(0.225)
    assert proxy_reward(prompt, " great great great .") == pytest.approx(0.675)
    assert reviews.gold_reward(prompt, " great great great .") < 0
    assert reviews.gold_reward(prompt, " the staff was great .") > 0
