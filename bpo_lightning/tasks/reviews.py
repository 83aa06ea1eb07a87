"""The embedded ``reviews`` task: positive, on-topic review continuation, fully offline.

A prompt names a product or place category and opens a review (``"hotel review : we checked in late last week ."``);
the policy continues it with short sentences (``" the staff was friendly . the pool was noisy ."``). The gold reward
:func:`gold_reward` scores how positive, on-topic, well-formed and concise a continuation is. This module also holds
the data files, a tokenizer trained locally, a tiny GPT-2 configuration and the SFT stage (:func:`ensure_sft`) that
produces the starting policy as a plain ``transformers`` folder. Lexicon and generator: :mod:`.reviews_data`.

Regenerate the shipped data files with::

    python -m bpo_lightning.tasks.reviews

Conventions: a prompt ends with ``" ."`` and has no trailing space; a response starts with a space. Tokenizing the two
separately and concatenating the ids therefore gives the same ids as tokenizing ``prompt + response``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from bpo_lightning.files import shareable
from bpo_lightning.prompts import PromptSource

from .reviews_data import (
    ADJECTIVES,
    ASPECT_CATEGORY,
    CATEGORIES,
    DATA_SEED,
    END,
    VERBS,
    VOCABULARY,
    make_splits,
    parse_sentence,
)

# --------------------------------------------------------------------------------------------------------------------
# Gold reward constants (see docs/task.md for the formula)
# --------------------------------------------------------------------------------------------------------------------

SENTENCE_SCALE = 0.5  # a sentence earns at most 0.5, so three perfect sentences reach the maximum 1.5
MAX_SENTENCES = 3  # only the first three distinct sentences earn credit
GENERIC_WEIGHT = 0.25  # weight of a clause without a (new) aspect of the prompt's category
OFF_TOPIC_PENALTY = 0.3  # per clause about another category's aspect (the clause earns nothing)
REPEAT_ASPECT_PENALTY = 0.1  # per clause about an aspect already covered
REPEAT_SENTENCE_PENALTY = 0.3  # per exact repetition of an earlier sentence (earns nothing)
EXTRA_SENTENCE_PENALTY = 0.1  # per distinct sentence beyond MAX_SENTENCES (earns nothing)
MALFORMED_PENALTY = 0.25  # per sentence that does not parse under the grammar (earns nothing)
NONWORD_PENALTY = 0.2  # per token outside the task vocabulary
UNTERMINATED_PENALTY = 0.3  # trailing words without a final " ." (earn nothing)
EMPTY_SCORE = -0.5  # a response without a single token
SCORE_RANGE = (-2.0, 1.5)  # the score is clipped to this range so garbage cannot run away

_PROMPT_RE = re.compile(r"(\w+) review :")


def parse_category(prompt: str) -> str:
    """Return the category of a task prompt (``"hotel review : ..."`` -> ``"hotel"``).

    Raises:
        ValueError: If the prompt does not name a known category.
    """
    match = _PROMPT_RE.search(prompt)
    if match is None or match.group(1) not in CATEGORIES:
        raise ValueError(f"not a reviews prompt: {prompt!r}")
    return match.group(1)


def split_sentences(tokens: Sequence[str]) -> list[list[str]]:
    """Split tokens at every ``"."``; the last item holds the words after the final ``"."`` (empty if none)."""
    sentences: list[list[str]] = [[]]
    for token in tokens:
        if token == END:
            sentences.append([])
        else:
            sentences[-1].append(token)
    return sentences


@dataclass
class GoldDetails:
    """Breakdown of :func:`gold_reward`: ``score = clip(sum(credits) - sum(penalties.values()))``."""

    score: float
    credits: list[float] = field(default_factory=list)  # per credited sentence
    penalties: dict[str, float] = field(default_factory=dict)  # total per kind, all >= 0


def gold_details(prompt: str, response: str) -> GoldDetails:  # noqa: C901 (the reward's terms, in order)
    """Score ``response`` for ``prompt`` and return the breakdown (see :func:`gold_reward`)."""
    category = parse_category(prompt)
    tokens = response.split()
    if not tokens:
        return GoldDetails(EMPTY_SCORE)
    pen: dict[str, float] = {}

    def charge(kind: str, amount: float) -> None:
        pen[kind] = pen.get(kind, 0.0) + amount

    if n_nonwords := sum(t not in VOCABULARY for t in tokens):
        charge("nonword", NONWORD_PENALTY * n_nonwords)
    sentences = split_sentences(tokens)
    if sentences[-1]:  # text after the last " ." is an unterminated sentence
        charge("unterminated", UNTERMINATED_PENALTY)
    credits: list[float] = []
    seen_sentences: set[tuple[str, ...]] = set()
    seen_aspects: set[str] = set()
    for sentence in sentences[:-1]:
        if tuple(sentence) in seen_sentences:
            charge("repeated_sentence", REPEAT_SENTENCE_PENALTY)
            continue
        seen_sentences.add(tuple(sentence))
        if len(seen_sentences) > MAX_SENTENCES:
            charge("extra_sentence", EXTRA_SENTENCE_PENALTY)
            continue
        clauses = parse_sentence(sentence)
        if clauses is None:
            charge("malformed", MALFORMED_PENALTY)
            continue
        values = []
        for aspect, sentiment in clauses:
            if aspect is not None and ASPECT_CATEGORY[aspect] != category:
                charge("off_topic", OFF_TOPIC_PENALTY)
                values.append(0.0)
            elif aspect is None or aspect in seen_aspects:
                if aspect is not None:
                    charge("repeated_aspect", REPEAT_ASPECT_PENALTY)
                values.append(GENERIC_WEIGHT * sentiment)
            else:
                seen_aspects.add(aspect)
                values.append(CATEGORIES[category][aspect] * sentiment)
        credits.append(SENTENCE_SCALE * sum(values) / len(values))
    raw = sum(credits) - sum(pen.values())
    return GoldDetails(min(max(raw, SCORE_RANGE[0]), SCORE_RANGE[1]), credits, pen)


def gold_reward(prompt: str, response: str) -> float:
    """Gold reward of a response in [-2.0, 1.5]; higher is a better (positive, on-topic, clean) review.

    Per distinct sentence among the first :data:`MAX_SENTENCES`: ``SENTENCE_SCALE * mean_clause(w * sentiment)``
    where ``w`` is the aspect's weight for a new aspect of the prompt's category, :data:`GENERIC_WEIGHT` for a clause
    without one (or a repeated aspect), and 0 for another category's aspect. Penalties are subtracted for off-topic
    clauses, repeated aspects and sentences, extra sentences, malformed sentences, non-words and a missing final
    " .". Pure and deterministic; ``docs/task.md`` gives the full formula.

    Args:
        prompt: A task prompt (its category is read with :func:`parse_category`).
        response: The continuation only (without the prompt), e.g. ``" the room was clean ."``.
    """
    return gold_details(prompt, response).score


# --------------------------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("sft", "prompts", "eval")


def data_path(split: str) -> Path:
    """Path of a shipped split: ``"sft"`` (SFT targets), ``"prompts"`` (online prompt pool) or ``"eval"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return DATA_DIR / f"reviews_{split}.jsonl"


class ReviewPrompts(PromptSource):
    """The embedded review task's prompts (docs/task.md).

    Args:
        split: ``prompts`` (the online pool), ``eval`` (held out) or ``sft``.
        limit: read at most this many rows.
    """

    def __init__(self, split: str = "prompts", limit: int | None = None) -> None:
        super().__init__(str(data_path(split)), limit=limit)


def load_split(split: str) -> list[dict[str, str]]:
    """Rows ``{"prompt": ..., "reference": ...}`` of a shipped split."""
    with data_path(split).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(out_dir: str | os.PathLike[str] = DATA_DIR, seed: int = DATA_SEED) -> list[Path]:
    """Generate every split with ``seed`` and write ``reviews_<split>.jsonl`` files into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in make_splits(seed).items():
        path = out / f"reviews_{split}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------------------------

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 768  # nearly every task word is one token: sequences ~30 % shorter than with 512
N_POSITIONS = 128
MODEL_CONFIG: dict[str, int | float] = {
    "n_positions": N_POSITIONS,
    "n_embd": 128,
    "n_layer": 2,
    "n_head": 4,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "summary_first_dropout": 0.0,
}


def build_tokenizer(texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train the task's byte-level BPE (deterministic, well under a second) and wrap it for ``transformers``.

    Args:
        texts: Training text; defaults to ``prompt + reference`` of the ``sft`` split.

    Returns:
        A fast tokenizer with ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``. It adds no special tokens by itself: callers
        prepend ``bos`` (and append ``eos`` for training targets) explicitly.
    """
    if texts is None:
        texts = [row["prompt"] + row["reference"] for row in load_split("sft")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable: no unknown token
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=N_POSITIONS,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised tiny GPT-2 (:data:`MODEL_CONFIG`) sized to ``tokenizer`` (initialised from ``seed``)."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


# --------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning
# --------------------------------------------------------------------------------------------------------------------

SFT_VERSION = 2  # bump whenever data, tokenizer, model or recipe change, so cached folders are rebuilt
SFT_STEPS = 400
SFT_BATCH_SIZE = 32
SFT_LR = 6e-3
SFT_WARMUP = 20


def encode_example(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str) -> tuple[list[int], int]:
    """Ids ``[bos] + prompt + response + [eos]`` and the number of leading (prompt) ids to mask from the loss."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    return [*prompt_ids, *response_ids, tokenizer.eos_token_id], len(prompt_ids)


def _collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])  # response tokens and eos only
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_sft(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    *,
    steps: int = SFT_STEPS,
    seed: int = 0,
    batch_size: int = SFT_BATCH_SIZE,
    lr: float = SFT_LR,
    progress: bool = False,
) -> list[float]:
    """Fine-tune ``model`` in place on ``prompt -> reference`` rows (loss on response tokens and eos only).

    Plain PyTorch: AdamW with warmup and cosine decay, batches drawn without replacement from a ``seed``-ed shuffle.
    ``progress`` shows a bar over the steps on stderr.

    Returns:
        The training loss of every step.
    """
    examples = [encode_example(tokenizer, r["prompt"], r["reference"]) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(SFT_WARMUP, steps // 4), steps)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="starting policy: SFT", unit="step", leave=False, disable=not progress):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = _collate([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def sft_dir_name(steps: int, seed: int) -> str:
    """Cache folder name of an SFT run; encodes the settings and :data:`SFT_VERSION`."""
    return f"reviews-sft-v{SFT_VERSION}-steps{steps}-seed{seed}"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def ensure_sft(
    cache_dir: str | os.PathLike[str], *, steps: int = SFT_STEPS, seed: int = 0, progress: bool = False
) -> Path:
    """Return a folder holding the SFT starting policy and its tokenizer, training it first if needed.

    The folder ``<cache_dir>/<sft_dir_name(steps, seed)>`` is built in a temporary folder and renamed into place, so
    an existing folder is always complete and is reused as is. It loads offline with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. ``progress``: say on stderr that
    it is being built, with a bar over the SFT steps.
    """
    cache = Path(cache_dir)
    target = cache / sft_dir_name(steps, seed)
    if _is_complete(target):
        return target
    if progress:
        print(
            f"building the starting policy ({steps} SFT steps, once; cached for later runs) in {target}",
            file=sys.stderr,
            flush=True,
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed)
        train_sft(model, tokenizer, load_split("sft"), steps=steps, seed=seed, progress=progress)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if _is_complete(target):  # another process finished first: keep its folder
            return target
        if target.exists():  # leftover from an interrupted copy made by other means
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp makes the folder private; the cache is meant to be shared like any model folder
        shareable(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: regenerate the shipped JSONL files (``python -m bpo_lightning.tasks.reviews``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(DATA_DIR), help="where to write reviews_<split>.jsonl")
    parser.add_argument("--seed", type=int, default=DATA_SEED, help="generator seed of the shipped files")
    args = parser.parse_args(argv)
    for path in write_data(args.out_dir, args.seed):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------------------------------------------------
# A proxy annotator, distinct from the gold reward
# --------------------------------------------------------------------------------------------------------------------

PROXY_WORD_SCALE = 0.25  # each sentiment word adds its lexicon value times this


def proxy_reward(prompt: str, response: str) -> float:
    """A cheap, biased stand-in for :func:`gold_reward`, for studying over-optimisation.

    It sums the lexicon sentiment of every adjective and verb in the response (scaled by
    :data:`PROXY_WORD_SCALE`), ignoring what the gold reward checks: the topic, the grammar, negation, repetition,
    non-words and length. It agrees with the gold reward on ordinary answers (more positive is better), but a
    policy optimised against it is paid for piling up positive words, e.g. ``"great great great ."`` scores
    3·0.9·0.25 = 0.675 here and is penalised by the gold reward as a malformed sentence.
    """
    del prompt  # the proxy does not look at the prompt: it cannot tell on-topic from off-topic
    lexicon = {**ADJECTIVES, **VERBS}
    return PROXY_WORD_SCALE * sum(lexicon.get(token, 0.0) for token in response.lower().split())
