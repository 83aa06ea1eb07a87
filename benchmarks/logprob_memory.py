"""Train-step memory of sequence log-probs against the vocabulary size: bpo-lightning's chunked path from hidden
states, the previous path (full logits, log-softmax chunked over positions), a naive full log-softmax and, with
``--trl-python``, TRL's online DPO trainer's own ``_forward`` (run by that Python, where trl is installed).

Each cell runs in a fresh process: a 2-layer GPT-2 (hidden 64, tied head) with V tokens, or with ``--model llama``
a 2-layer Llama (hidden 64, its own untied output head), 4 pairs (8 sequences) of 128 tokens (16 prompt + 112
response), forward + backward of the summed response log-probs. Extra memory is the process's peak RSS during a step
minus its RSS before it, shown as a multiple of the fp32 logits tensor (8 × 128 × V × 4 bytes): for the first step
at that shape (after a one-token warm-up step, so kernels and the gradient buffers already exist) and for a second
step at the same shape. Training batches change shape at every step, so the first call is the one that counts.

    python benchmarks/logprob_memory.py                 # V = 32k, 128k, 256k
    python benchmarks/logprob_memory.py --vocab 32000 --repeats 3
    python benchmarks/logprob_memory.py --keep-mib 0      # bpo always recomputing the head (the least memory)
    python benchmarks/logprob_memory.py --model llama --vocab 128000   # an untied head
    python benchmarks/logprob_memory.py --trl-python .venv-trl/bin/python   # + TRL (see trl_online_dpo.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

N, T, PROMPT = 8, 128, 16
VARIANTS = ("bpo", "logits-chunked", "naive")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_above(run) -> int:
    """Peak RSS while ``run()`` runs minus the RSS before it (sampled every 0.2 ms: ``ru_maxrss`` keeps the process's
    high-water mark only, which a second call below the first never moves)."""
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], rss_bytes()) - before


def cell(variant: str, vocab: int, chunk: int, keep_mib: int, arch: str = "gpt2") -> dict:
    import torch
    import transformers

    from bpo_lightning.logprobs import sequence_logps, token_logps

    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=T, tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=T)
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (N, T))
    attention = torch.ones(N, T, dtype=torch.long)
    loss_mask = torch.zeros(N, T, dtype=torch.long)
    loss_mask[:, PROMPT:] = 1

    def step(ids, attention, loss_mask):
        if variant == "trl":  # OnlineDPOTrainer._forward: full logits, log_softmax, gather; masked sum as TRL does
            from types import SimpleNamespace

            from trl.experimental.online_dpo import OnlineDPOTrainer

            prompt = int((loss_mask[0] == 0).sum()) or 1
            per_token = OnlineDPOTrainer._forward(
                SimpleNamespace(max_length=T),
                model,
                ids[:, :prompt],
                attention[:, :prompt],
                ids[:, prompt:],
                attention[:, prompt:],
            )
            sums = per_token.sum(-1)
        elif variant == "bpo":  # the module's default model.logprob_keep_mib
            sums = sequence_logps(model, ids, attention, loss_mask, chunk, keep_bytes=keep_mib * 2**20).sums
        else:
            logits = model(input_ids=ids, attention_mask=attention).logits  # (N, T, V)
            targets, mask = ids[:, 1:], loss_mask[:, 1:]
            if variant == "naive":
                logps = logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            else:
                logps = token_logps(logits[:, :-1], targets)
            sums = (logps * mask).sum(-1)
        sums.sum().backward()
        model.zero_grad(set_to_none=False)  # the gradient buffers exist before the measured step

    # warm-up: kernels, autograd and the gradient buffers exist before the measured step
    step(ids[:1, :4], attention[:1, :4], torch.ones_like(loss_mask[:1, :4]))
    extra = [peak_above(lambda: step(ids, attention, loss_mask)) for _ in range(2)]  # first, then second step
    return {"variant": variant, "vocab": vocab, "extra": extra[0], "second": extra[1], "logits": N * T * vocab * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000, 256_000])
    parser.add_argument("--repeats", type=int, default=1, help="processes per cell (the minimum is shown)")
    parser.add_argument("--chunk", type=int, default=32, help="positions per chunk (model.logprob_chunk_size)")
    parser.add_argument(
        "--keep-mib",
        type=int,
        default=128,
        help="logits kept for backward up to this size, MiB (model.logprob_keep_mib; 0: always recomputed)",
    )
    parser.add_argument("--trl-python", help="a Python with trl installed: adds TRL's column")
    parser.add_argument("--model", choices=["gpt2", "llama"], default="gpt2", help="llama: an untied output head")
    parser.add_argument(
        "--malloc",
        choices=["returning", "glibc"],
        default="returning",
        help="returning: MALLOC_MMAP_THRESHOLD_=65536 (freed blocks leave the RSS); glibc: its default, whose "
        "retained heap makes the first step at a shape look larger than the memory it holds",
    )
    parser.add_argument("--cell", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell[0], int(args.cell[1]), args.chunk, args.keep_mib, args.model)))
        return
    # large blocks straight from mmap, so that freed memory leaves the RSS and its peak is the live memory's peak
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.malloc == "returning":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results = {}
    variants = VARIANTS + (("trl",) if args.trl_python else ())
    for vocab in args.vocab:
        for variant in variants:
            runs = []
            for _ in range(args.repeats):
                python = args.trl_python if variant == "trl" else sys.executable
                command = [python, __file__, "--cell", variant, str(vocab), "--chunk", str(args.chunk),
                           "--keep-mib", str(args.keep_mib), "--model", args.model]  # fmt: skip
                out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            results[variant, vocab] = min(runs, key=lambda r: r["extra"])
    mib = 2**20
    model = "Llama 2x64, untied head" if args.model == "llama" else "GPT-2 2x64, tied head"
    print(
        f"train-step extra memory, {N} sequences x {T} tokens, {model}, V tokens, logprob_chunk_size "
        f"{args.chunk} (positions per chunk at V >= 131,072, more below), logprob_keep_mib {args.keep_mib}, as a "
        "multiple of the fp32 logits tensor: first step at the shape (second step)"
    )
    print(
        f"{'V':>8} | {'fp32 logits':>11} | "
        + " | ".join(f"{v:>26}" for v in variants)
        + " | bpo / naive"
        + (" | bpo / TRL" if args.trl_python else "")
    )
    for vocab in args.vocab:
        row = [results[v, vocab] for v in variants]
        cells = [
            f"{r['extra'] / mib:6.0f} MiB {r['extra'] / r['logits']:5.2f}x ({r['second'] / r['logits']:4.2f}x)"
            for r in row
        ]
        ratios = [row[0]["extra"] / row[2]["extra"]] + ([row[0]["extra"] / row[3]["extra"]] if args.trl_python else [])
        print(
            f"{vocab:>8} | {row[0]['logits'] / mib:7.0f} MiB | "
            + " | ".join(f"{c:>26}" for c in cells)
            + "".join(f" | {r:.2f}" for r in ratios)
        )


if __name__ == "__main__":
    main()
