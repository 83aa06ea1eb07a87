"""Lexicon, grammar and the seeded data generator of the ``reviews`` task.

Everything the gold reward and the generator rely on lives in the module-level tables below, so the task is defined
in one place. The reward itself (:func:`bpo_lightning.tasks.reviews.gold_reward`) and the model side live in
:mod:`bpo_lightning.tasks.reviews`; ``python -m bpo_lightning.tasks.reviews`` regenerates the shipped JSONL files
from :func:`make_splits`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

K = TypeVar("K")

# --------------------------------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------------------------------

#: Aspect nouns per category with an importance weight: the reward credits a sentence about an important aspect more.
#: Weights are distinct inside a category so that two different answers rarely score exactly the same.
CATEGORIES: dict[str, dict[str, float]] = {
    "hotel": {"room": 1.0, "staff": 0.95, "bed": 0.9, "breakfast": 0.85, "location": 0.8, "pool": 0.75, "view": 0.7},
    "restaurant": {"food": 1.0, "waiter": 0.9, "dessert": 0.85, "soup": 0.8, "wine": 0.95, "menu": 0.75, "bread": 0.7},
    "phone": {
        "battery": 1.0,
        "screen": 0.95,
        "camera": 0.9,
        "signal": 0.85,
        "speaker": 0.8,
        "charger": 0.75,
        "case": 0.7,
    },
    "laptop": {
        "keyboard": 1.0,
        "processor": 0.95,
        "display": 0.9,
        "trackpad": 0.85,
        "fan": 0.8,
        "webcam": 0.75,
        "hinge": 0.7,
    },
    "movie": {
        "plot": 1.0,
        "acting": 0.95,
        "ending": 0.9,
        "script": 0.85,
        "soundtrack": 0.8,
        "villain": 0.75,
        "cast": 0.7,
    },
    "book": {
        "story": 1.0,
        "pacing": 0.95,
        "prose": 0.9,
        "hero": 0.85,
        "dialogue": 0.8,
        "translation": 0.75,
        "cover": 0.7,
    },
}

#: Every aspect noun mapped to the category it belongs to (aspects are unique across categories).
ASPECT_CATEGORY: dict[str, str] = {a: c for c, aspects in CATEGORIES.items() for a in aspects}

#: Graded sentiment of adjectives in [-1, 1]; values are spread out to keep scores continuous.
ADJECTIVES: dict[str, float] = {
    "excellent": 1.0,
    "perfect": 0.97,
    "amazing": 0.94,
    "wonderful": 0.92,
    "great": 0.9,
    "lovely": 0.83,
    "impressive": 0.77,
    "comfortable": 0.7,
    "friendly": 0.66,
    "good": 0.6,
    "nice": 0.55,
    "pleasant": 0.5,
    "clean": 0.45,
    "solid": 0.4,
    "decent": 0.3,
    "fine": 0.2,
    "okay": 0.1,
    "average": -0.05,
    "plain": -0.15,
    "bland": -0.3,
    "dull": -0.4,
    "slow": -0.5,
    "noisy": -0.55,
    "disappointing": -0.63,
    "bad": -0.7,
    "poor": -0.75,
    "broken": -0.85,
    "terrible": -0.93,
    "awful": -1.0,
}

#: Relative frequency of adjectives in reference answers (1 when absent): people reach for a few common words.
ADJECTIVE_FREQUENCY: dict[str, float] = {
    "great": 4.0,
    "good": 4.0,
    "nice": 3.0,
    "bad": 3.0,
    "excellent": 2.0,
    "amazing": 2.0,
    "okay": 2.0,
    "terrible": 2.0,
    "awful": 2.0,
}

#: Intensifiers as exponents on |sentiment|: ``s -> sign(s) * |s| ** gamma``. gamma < 1 pushes towards +-1, gamma > 1
#: softens. This never leaves [-1, 1] and, unlike a multiplier with clipping, keeps "very great" below "excellent".
INTENSIFIERS: dict[str, float] = {"very": 0.5, "really": 0.7, "fairly": 1.5, "slightly": 3.0}

#: "not" flips the sentiment of what follows and damps it ("not bad" is mildly positive, not "great").
NEGATION = "not"
NEGATION_FACTOR = -0.7

#: Verbs of the clause "i VERB the ASPECT" with their sentiment.
VERBS: dict[str, float] = {
    "loved": 0.95,
    "enjoyed": 0.8,
    "appreciated": 0.72,
    "liked": 0.62,
    "disliked": -0.6,
    "hated": -0.95,
}

#: Fixed clauses without an aspect (whole token sequences) with their sentiment.
FIXED_CLAUSES: dict[tuple[str, ...], float] = {
    ("i", "would", "recommend", "it"): 0.8,
    ("i", "would", "not", "recommend", "it"): -0.8,
    ("it", "was", "worth", "it"): 0.65,
    ("it", "was", "not", "worth", "it"): -0.65,
}

#: Subjects of the generic clause "[overall] it was [not] [INTENSIFIER] ADJECTIVE" (no aspect).
GENERIC_SUBJECTS: tuple[tuple[str, ...], ...] = (("it", "was"), ("overall", "it", "was"))
#: Copulas of the aspect clause "the ASPECT COPULA [not] [INTENSIFIER] ADJECTIVE".
COPULAS: tuple[str, ...] = ("was", "is")
#: Conjunctions joining two clauses into one sentence; at most two clauses per sentence are grammatical.
CONJUNCTIONS: tuple[str, ...] = ("and", "but")
MAX_CLAUSES = 2
#: Sentence terminator; responses are space-separated tokens and every sentence ends with " .".
END = "."

#: Every token a well-formed response may use. Anything else is a non-word for the reward.
VOCABULARY: frozenset[str] = frozenset(
    {"the", "i", END, NEGATION, *COPULAS, *CONJUNCTIONS, *ASPECT_CATEGORY, *ADJECTIVES, *INTENSIFIERS, *VERBS}
    | {w for clause in FIXED_CLAUSES for w in clause}
    | {w for subject in GENERIC_SUBJECTS for w in subject}
)

# --------------------------------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------------------------------


def _phrase_sentiment(tokens: Sequence[str]) -> float | None:
    """Sentiment of ``[not] [INTENSIFIER] ADJECTIVE``, or None when the tokens are not such a phrase."""
    rest = list(tokens)
    negated = rest[:1] == [NEGATION]
    if negated:
        rest.pop(0)
    gamma = 1.0
    if len(rest) == 2 and rest[0] in INTENSIFIERS:
        gamma = INTENSIFIERS[rest.pop(0)]
    if len(rest) != 1 or rest[0] not in ADJECTIVES:
        return None
    value = ADJECTIVES[rest[0]]
    value = math.copysign(abs(value) ** gamma, value)
    return NEGATION_FACTOR * value if negated else value


def parse_clause(tokens: Sequence[str]) -> tuple[str | None, float] | None:
    """Parse one clause into ``(aspect or None, sentiment)``; None when it is not grammatical.

    Grammar: ``the ASPECT was|is [not] [INTENSIFIER] ADJ`` | ``i VERB the ASPECT`` |
    ``[overall] it was [not] [INTENSIFIER] ADJ`` | one of :data:`FIXED_CLAUSES`.
    """
    t = tuple(tokens)
    if t in FIXED_CLAUSES:
        return None, FIXED_CLAUSES[t]
    if len(t) == 4 and t[0] == "i" and t[1] in VERBS and t[2] == "the" and t[3] in ASPECT_CATEGORY:
        return t[3], VERBS[t[1]]
    if len(t) >= 4 and t[0] == "the" and t[1] in ASPECT_CATEGORY and t[2] in COPULAS:
        value = _phrase_sentiment(t[3:])
        return None if value is None else (t[1], value)
    for subject in GENERIC_SUBJECTS:
        if t[: len(subject)] == subject:
            value = _phrase_sentiment(t[len(subject) :])
            return None if value is None else (None, value)
    return None


def parse_sentence(tokens: Sequence[str]) -> list[tuple[str | None, float]] | None:
    """Parse a sentence (without its final ".") into at most :data:`MAX_CLAUSES` clauses; None if malformed."""
    clauses: list[list[str]] = [[]]
    for token in tokens:
        if token in CONJUNCTIONS:
            clauses.append([])
        else:
            clauses[-1].append(token)
    if len(clauses) > MAX_CLAUSES:
        return None
    parsed = []
    for clause in clauses:
        if (result := parse_clause(clause)) is None:
            return None
        parsed.append(result)
    return parsed


# --------------------------------------------------------------------------------------------------------------------
# Prompts: "<category> review : <lead> <tail> ." -- neutral openings that never use response vocabulary words that
# carry sentiment or aspects, so only the category matters for the reward.
# --------------------------------------------------------------------------------------------------------------------

PROMPT_LEADS: dict[str, tuple[str, ...]] = {
    "hotel": (
        "we stayed here for a week",
        "we stayed here for two nights",
        "i booked a suite",
        "we spent a weekend here",
        "i stayed here for one night",
        "we checked in late",
    ),
    "restaurant": (
        "we had dinner here",
        "i came here for lunch",
        "we booked a table for four",
        "we ate here",
        "we had a late brunch here",
        "i stopped by for a quick meal",
    ),
    "phone": (
        "i bought this phone",
        "i have used this phone for a month",
        "i switched to this phone",
        "i got this phone as a gift",
        "i upgraded to this model",
        "i ordered this phone online",
    ),
    "laptop": (
        "i bought this laptop",
        "i have used this laptop for a month",
        "i use this laptop every day",
        "i got this laptop as a gift",
        "i ordered this laptop online",
        "i switched to this model",
    ),
    "movie": (
        "i watched this film",
        "we saw this movie at the cinema",
        "i watched it at home",
        "we rented this movie",
        "i saw the late show",
        "we streamed this film",
    ),
    "book": (
        "i read this book",
        "i finished this novel",
        "i borrowed this book",
        "i read it on the train",
        "i bought this novel",
        "i listened to the audio version",
    ),
}
PROMPT_TIMES: tuple[str, ...] = (
    "last week",
    "last month",
    "in the summer",
    "in the winter",
    "last year",
    "on a rainy day",
    "for my birthday",
    "over the holidays",
)
PROMPT_COMPANY: tuple[str, ...] = (
    "with my family",
    "with friends",
    "for work",
    "with my partner",
    "on my own",
    "with my kids",
)

# --------------------------------------------------------------------------------------------------------------------
# Generator settings (imperfect, human-style reference answers)
# --------------------------------------------------------------------------------------------------------------------

DATA_SEED = 1234
SPLIT_ROWS: dict[str, int] = {"sft": 3000, "prompts": 3000, "eval": 330}
#: Share of distinct prompt strings reserved for each split, so that the splits never share a prompt.
SPLIT_PROMPT_SHARE: dict[str, float] = {"sft": 0.4, "prompts": 0.4, "eval": 0.2}
#: Splits whose rows are distinct prompts (each drawn once): held-out evaluation measures many prompts, not a few
#: prompts many times.
DISTINCT_SPLITS: tuple[str, ...] = ("eval",)
SENTENCE_COUNTS: dict[int, float] = {1: 0.15, 2: 0.35, 3: 0.35, 4: 0.15}
P_POSITIVE = 0.6  # share of clauses written with positive polarity
P_TWO_CLAUSES = 0.3  # share of sentences with "and" / "but"
P_CLAUSE_KIND: dict[str, float] = {"aspect": 0.65, "verb": 0.2, "generic": 0.1, "fixed": 0.05}
P_NEGATED = 0.08  # "not" + an adjective of the opposite polarity
P_INTENSIFIED = 0.2
P_OFF_TOPIC = 0.1  # per reference: one clause talks about another category
P_TYPO = 0.05  # per reference: one word misspelled into a non-word
P_REPEAT = 0.05  # per reference: one sentence written twice


def all_prompts() -> list[str]:
    """Every distinct prompt string of the task, in a fixed order."""
    return [
        f"{cat} review : {lead} {when} {company} ."
        for cat, leads in PROMPT_LEADS.items()
        for lead in leads
        for when in PROMPT_TIMES
        for company in PROMPT_COMPANY
    ]


def _weighted(rng: random.Random, table: dict[K, float]) -> K:
    return rng.choices(list(table), weights=list(table.values()))[0]


def _adjective_phrase(rng: random.Random, positive: bool) -> list[str]:
    # A negated phrase uses an adjective of the opposite polarity: "not bad" reads positive, "not great" negative.
    negated = rng.random() < P_NEGATED
    want_positive = positive != negated
    pool = {w: ADJECTIVE_FREQUENCY.get(w, 1.0) for w, v in ADJECTIVES.items() if (v > 0) == want_positive}
    words = [NEGATION] if negated else []
    adjective = _weighted(rng, pool)
    if rng.random() < P_INTENSIFIED and abs(ADJECTIVES[adjective]) >= 0.4:
        words.append(rng.choice(sorted(INTENSIFIERS)))
    return [*words, adjective]


def _clause(rng: random.Random, category: str, positive: bool, used: list[str], off_topic: bool) -> list[str]:
    kind = "aspect" if off_topic else _weighted(rng, P_CLAUSE_KIND)
    if kind in ("aspect", "verb"):
        if off_topic:
            other = rng.choice([c for c in CATEGORIES if c != category])
            aspect = rng.choice(sorted(CATEGORIES[other]))
        else:
            # People mostly talk about a new aspect per clause but sometimes come back to one.
            fresh = [a for a in CATEGORIES[category] if a not in used] or list(CATEGORIES[category])
            aspect = rng.choice(fresh if rng.random() < 0.9 else list(CATEGORIES[category]))
            used.append(aspect)
        if kind == "verb":
            verb = rng.choice([v for v, s in VERBS.items() if (s > 0) == positive])
            return ["i", verb, "the", aspect]
        return ["the", aspect, rng.choice(COPULAS), *_adjective_phrase(rng, positive)]
    if kind == "fixed":
        return list(rng.choice([c for c, s in FIXED_CLAUSES.items() if (s > 0) == positive]))
    return [*rng.choice(GENERIC_SUBJECTS), *_adjective_phrase(rng, positive)]


def _typo(rng: random.Random, word: str) -> str:
    """Misspell ``word`` (drop, double or swap letters) into a token outside :data:`VOCABULARY`."""
    for _ in range(20):
        i = rng.randrange(len(word))
        edit = rng.choice(("drop", "double", "swap"))
        if edit == "drop" and len(word) > 2:
            new = word[:i] + word[i + 1 :]
        elif edit == "swap" and i + 1 < len(word):
            new = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        else:
            new = word[:i] + word[i] + word[i:]
        if new not in VOCABULARY:
            return new
    return word + word[-1]


def make_reference(rng: random.Random, category: str) -> str:
    """One imperfect human-style answer: 1-4 sentences, mixed sentiment, occasional slips.

    Returns:
        The answer with a leading space (``" the room was clean ."``) so that ``prompt + reference`` is the full
        text and the two parts tokenize the same separately and together.
    """
    n = _weighted(rng, SENTENCE_COUNTS)
    n_clauses = [2 if rng.random() < P_TWO_CLAUSES else 1 for _ in range(n)]
    off_topic_at = rng.randrange(sum(n_clauses)) if rng.random() < P_OFF_TOPIC else -1
    used: list[str] = []
    sentences: list[list[str]] = []
    k = 0
    for count in n_clauses:
        first_positive = rng.random() < P_POSITIVE
        words = _clause(rng, category, first_positive, used, off_topic=k == off_topic_at)
        k += 1
        if count == 2:
            # "but" joins clauses of opposite polarity, "and" clauses of the same polarity.
            conj = rng.choice(CONJUNCTIONS)
            second_positive = first_positive if conj == "and" else not first_positive
            words += [conj, *_clause(rng, category, second_positive, used, off_topic=k == off_topic_at)]
            k += 1
        sentences.append([*words, END])
    if rng.random() < P_REPEAT:
        sentences.append(list(rng.choice(sentences)))
    if rng.random() < P_TYPO:
        s = rng.randrange(len(sentences))
        w = rng.randrange(len(sentences[s]) - 1)  # never the final "."
        sentences[s][w] = _typo(rng, sentences[s][w])
    return " " + " ".join(w for sentence in sentences for w in sentence)


def split_prompts(prompts: Sequence[str], seed: int = DATA_SEED) -> dict[str, list[str]]:
    """Partition the distinct prompt strings between the splits, per category (shuffled with ``seed``)."""
    rng = random.Random(seed)
    out: dict[str, list[str]] = {split: [] for split in SPLIT_PROMPT_SHARE}
    for category in CATEGORIES:
        order = [p for p in prompts if p.startswith(category + " ")]
        rng.shuffle(order)
        start = 0
        for i, (split, share) in enumerate(SPLIT_PROMPT_SHARE.items()):
            stop = len(order) if i == len(SPLIT_PROMPT_SHARE) - 1 else start + round(share * len(order))
            out[split] += order[start:stop]
            start = stop
    return {split: sorted(pool) for split, pool in out.items()}


def make_splits(seed: int = DATA_SEED) -> dict[str, list[dict[str, str]]]:
    """Generate every split deterministically.

    Args:
        seed: Seed of the generator; the shipped files use :data:`DATA_SEED`.

    Returns:
        ``{"sft": rows, "prompts": rows, "eval": rows}`` with rows ``{"prompt": ..., "reference": ...}``. The splits
        use disjoint sets of prompt strings; categories are balanced by cycling through them.
    """
    pools = split_prompts(all_prompts(), seed)
    out: dict[str, list[dict[str, str]]] = {}
    for index, (split, n_rows) in enumerate(SPLIT_ROWS.items()):
        rng = random.Random(seed * 1000 + index)
        by_category = {c: [p for p in pools[split] if p.startswith(c + " ")] for c in CATEGORIES}
        for pool in by_category.values():
            rng.shuffle(pool)
        rows = []
        for i in range(n_rows):
            category = list(CATEGORIES)[i % len(CATEGORIES)]
            # distinct splits take the category's prompts in (shuffled) order, the others draw with replacement
            prompt = (
                by_category[category][i // len(CATEGORIES)]
                if split in DISTINCT_SPLITS
                else rng.choice(by_category[category])
            )
            rows.append({"prompt": prompt, "reference": make_reference(rng, category)})
        rng.shuffle(rows)
        out[split] = rows
    return out
