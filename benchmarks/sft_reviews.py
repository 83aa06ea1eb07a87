"""Measure the SFT starting policy of the ``reviews`` task against the eval references.

Run (offline, about half a minute on two idle CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/sft_reviews.py --cache-dir /tmp/bpo-cache

It trains (or reuses) the SFT folder with :func:`bpo_lightning.tasks.reviews.ensure_sft`, then samples on the eval
prompts and prints win rate against the references, mean gold rewards, how often two samples of one prompt differ in
gold reward, and which words the better sample of a pair uses more often (the preference signal).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpo_lightning.tasks.reviews import ensure_sft, gold_details, gold_reward, load_split, parse_sentence


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], *, do_sample: bool, max_new_tokens: int = 48, batch_size: int = 64
) -> list[str]:
    """Continue each prompt from ``[bos] + prompt ids`` (left padded) and decode the new tokens only."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False).input_ids]
            for p in prompts[start : start + batch_size]
        ]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 50} if do_sample else {"do_sample": False}
        new = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        out += tokenizer.batch_decode(new[:, width:], skip_special_tokens=True)
    return out


def _well_formed(response: str) -> bool:
    """All sentences parse, nothing trails after the last " ." and no token is a non-word."""
    d = gold_details("hotel review : x .", response)  # category is irrelevant for these checks
    return not ({"malformed", "unterminated", "nonword"} & d.penalties.keys()) and bool(response.split())


def _sentence_sentiment(response: str) -> float:
    values = [v for s in response.split(" .") if (p := parse_sentence(s.split())) for _, v in p]
    return statistics.mean(values) if values else 0.0


def compare(prompts: Sequence[str], refs: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Win / tie / loss rates of ``responses`` against ``refs`` under the gold reward, plus means."""
    g = [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]
    h = [gold_reward(p, r) for p, r in zip(prompts, refs, strict=True)]
    return {
        "win": sum(a > b for a, b in zip(g, h, strict=True)) / len(g),
        "tie": sum(a == b for a, b in zip(g, h, strict=True)) / len(g),
        "gold": statistics.mean(g),
        "gold_ref": statistics.mean(h),
        "well_formed": sum(map(_well_formed, responses)) / len(responses),
        "sentences": statistics.mean(r.count(" .") for r in responses),
    }


def evaluate_sft(path: str | Path, n: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Greedy and sampled responses of the policy at ``path`` on the first ``n`` eval rows, scored by gold reward."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = load_split("eval")[:n]
    prompts, refs = [r["prompt"] for r in rows], [r["reference"] for r in rows]
    greedy = generate(model, tokenizer, prompts, do_sample=False)
    first = generate(model, tokenizer, prompts, do_sample=True)
    second = generate(model, tokenizer, prompts, do_sample=True)
    g1 = [gold_reward(p, r) for p, r in zip(prompts, first, strict=True)]
    g2 = [gold_reward(p, r) for p, r in zip(prompts, second, strict=True)]
    pairs = [(a, b) if ga > gb else (b, a) for a, b, ga, gb in zip(first, second, g1, g2, strict=True) if ga != gb]
    better, worse = zip(*pairs, strict=True) if pairs else ((), ())
    return {
        "greedy": compare(prompts, refs, greedy),
        "sampled": compare(prompts, refs, first),
        "pairs": {
            "distinct_gold": len(pairs) / len(rows),
            "distinct_text": sum(a != b for a, b in zip(first, second, strict=True)) / len(rows),
            "sentiment_better": statistics.mean(map(_sentence_sentiment, better)) if pairs else 0.0,
            "sentiment_worse": statistics.mean(map(_sentence_sentiment, worse)) if pairs else 0.0,
            "gold_gap": statistics.mean(abs(a - b) for a, b in zip(g1, g2, strict=True) if a != b) if pairs else 0.0,
        },
        "examples": dict(enumerate(random.Random(seed).sample(list(zip(prompts, first, g1, strict=True)), 5))),
        "word_shift": dict(_word_shift(better, worse)),
    }


def _word_shift(better: Sequence[str], worse: Sequence[str], k: int = 8) -> list[tuple[str, int]]:
    """Words most over-represented in the better sample of a pair (positive) and in the worse one (negative)."""
    diff = collections.Counter(w for r in better for w in r.split())
    diff.subtract(w for r in worse for w in r.split())
    ranked = sorted(diff.items(), key=lambda kv: kv[1])
    return ranked[-k:][::-1] + ranked[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="/tmp/bpo-cache")
    parser.add_argument("--steps", type=int, default=None, help="SFT steps (default: the package default)")
    parser.add_argument("--n", type=int, default=None, help="number of eval rows (default: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    path = ensure_sft(args.cache_dir, **({} if args.steps is None else {"steps": args.steps}))
    print(f"sft folder {path} ready in {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    for name, values in evaluate_sft(path, args.n).items():
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()})
    print(f"evaluation took {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
