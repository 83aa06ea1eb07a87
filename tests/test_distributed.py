"""Training on several processes: DDP and DeepSpeed ZeRO-2/3 on CPU (gloo) give the result of one process.

Every multi-process fit runs ``tests/distributed/fit.py`` in a subprocess of its own session (Lightning's CPU
launcher re-executes ``sys.argv`` for the extra processes). DeepSpeed runs through a test-only strategy that lifts
the stock strategy's CUDA-only guards (``tests/distributed/cpu_deepspeed.py``).
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import CountingAnnotator, make_run, sample_row
from torch.testing import assert_close

from bpo_lightning.batches import weighted_pair_batch
from bpo_lightning.collection import global_batches
from bpo_lightning.data import Shard
from bpo_lightning.distributed import Ranks
from bpo_lightning.evaluation import Evaluation, EvaluationMetrics, evaluation_step
from bpo_lightning.store import PhaseStore, atomic_write
from bpo_lightning.types import PreferenceRecord

SCRIPT = Path(__file__).parent / "distributed" / "fit.py"
HANG_GUARD_S = 900  # a run takes ~10-25 s; this only turns a deadlock into a failure instead of a stalled suite


class Run:
    """What one fit (all of its processes) left in its output folder."""

    def __init__(self, out: Path, returncode: int, output: str) -> None:
        self.out, self.returncode, self.output = out, returncode, output

    @property
    def weights(self) -> dict:
        return torch.load(self.out / "weights.pt")

    @property
    def initial(self) -> dict:
        return torch.load(self.out / "initial.pt")

    @property
    def stats(self) -> dict:
        return json.loads((self.out / "stats.json").read_text())

    def calls(self) -> list[tuple[str, str]]:
        """Every (prompt, response) scored, over all processes, sorted."""
        return sorted(tuple(c) for f in self.out.glob("calls.rank*.json") for c in json.loads(f.read_text()))

    def hooks(self, rank: int) -> list:
        return json.loads((self.out / f"hooks.rank{rank}.json").read_text())


def fit(out: Path, sft_dir: Path, *args: str, killed: bool = False, env: dict | None = None) -> Run:
    """Run the fit script (``env``: extra environment); the whole process group is killed if it outlives the hang
    guard."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    cmd = [sys.executable, str(SCRIPT), "--sft", str(sft_dir), "--out", str(out), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        output = stop_stalled(proc)
        pytest.fail(f"{' '.join(args)}: no result after {HANG_GUARD_S} s (a deadlock?)\n{output[-6000:]}")
    run = Run(out, proc.returncode, output)
    if killed:
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
    else:
        assert proc.returncode == 0, output[-3000:]
    return run


def stop_stalled(proc: subprocess.Popen) -> str:
    """Kill a stalled job's whole process group, after asking each of its processes to print where every thread
    waits (SIGUSR1: ``faulthandler``, registered by the fit script and by ``bpo``); the output, stacks included."""
    os.killpg(proc.pid, signal.SIGUSR1)
    try:
        output, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    return output


_SINGLE: dict[tuple, Run] = {}


def single(tmp_path_factory, sft_dir, *args: str) -> Run:
    """The one-process run of a setup (computed once per session)."""
    if args not in _SINGLE:
        _SINGLE[args] = fit(tmp_path_factory.mktemp("single"), sft_dir, *args)
    return _SINGLE[args]


SETUPS = {  # strategy, arguments: each behavior, full fine-tuning and the LoRA ensemble, every strategy
    "ddp-bpo-eval": ("ddp", ("--eval-prompts", "5")),
    "ddp-bpo-lora-ensemble": ("ddp", ("--members", "3")),
    "zero2-ema-lora-ensemble": ("zero2", ("--behavior", "EMA", "--members", "3")),
    "zero3-bpo-eval": ("zero3", ("--eval-prompts", "5")),
    "zero3-offline": ("zero3", ("--behavior", "Frozen")),
    "zero3-ema": ("zero3", ("--behavior", "EMA")),
    "zero3-bpo-lora-ensemble": ("zero3", ("--members", "3")),
    "zero3-ema-gathered-sampling": ("zero3", ("--behavior", "EMA", "--gather-for-sampling", "--eval-prompts", "5")),
    "zero3-from-config": ("zero3", ("--from-config",)),  # a random init, the same as on one process
}


_TWO: dict[str, Run] = {}


def two_processes(tmp_path_factory, sft_dir, setup: str) -> Run:
    """The two-process run of a setup (computed once per session)."""
    if setup not in _TWO:
        strategy, args = SETUPS[setup]
        _TWO[setup] = fit(tmp_path_factory.mktemp(setup), sft_dir, *args, "--strategy", strategy, "--devices", "2")
    return _TWO[setup]


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_two_processes_equal_one_process(setup, tmp_path_factory, sft_dir):
    strategy, args = SETUPS[setup]
    one = single(tmp_path_factory, sft_dir, *args)
    two = two_processes(tmp_path_factory, sft_dir, setup)
    # the same final weights (float tolerance: gradients are summed in another order), and training moved them
    atol = 1e-5
    moved = max((one.weights[k] - one.initial[k]).abs().max().item() for k in one.weights)
    assert moved > 30 * atol, moved
    assert one.weights.keys() == two.weights.keys()
    for name, value in one.weights.items():
        assert_close(two.weights[name], value, atol=atol, rtol=0, msg=name)
    # every prompt was annotated exactly once, across processes: the same scores were asked for as by one process
    assert two.calls() == one.calls() and len(two.calls()) > 0
    assert two.stats["phases"] == one.stats["phases"]  # pairs kept, dropped, annotations paid and cached
    assert two.stats["steps"] == one.stats["steps"] == 4  # a global batch of 8 pairs, split over the processes
    for phase in range(2):  # each prompt's row written once, by one writer
        rows = PhaseStore(two.out / "run" / "data", phase).samples_path.read_text().splitlines()
        indices = [json.loads(row)["index"] for row in rows]
        assert sorted(indices) == list(range(phase * 16, phase * 16 + 16))
        pairs = PhaseStore(two.out / "run" / "data", phase).load_pairs()[0]
        assert len(pairs) == one.stats["phases"][str(phase)]["kept"]
    # observation hooks fire once per phase, on process 0
    assert two.hooks(0) == one.hooks(0) and [e[0] for e in two.hooks(0)] == ["on_phase_start", "on_pairs_ready"] * 2
    assert two.hooks(1) == []
    assert "It is recommended to use `self.log('data/" not in two.output  # totals already, not per-process values
    if "--eval-prompts" in args:  # 5 held-out prompts over 2 processes: no hang, each prompt counted once
        e1, e2 = one.stats["evaluation"], two.stats["evaluation"]
        assert e2["count"] == e1["count"] == 5
        for key in ("win_rate", "tie_rate", "reward", "length"):  # greedy answers: the same as one process
            assert math.isclose(e2[key], e1[key], abs_tol=1e-9), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_killed_job_resumes_to_the_uninterrupted_weights(strategy, tmp_path, sft_dir):
    """24 prompts per phase in blocks of 8: 2 rounds over 2 processes (8 + 8 prompts, then 4 + 4). SIGKILL to every
    process at process 0's 4th annotator call (phase 2, second round: the first round's rows are saved), then
    resume."""
    args = ("--strategy", strategy, "--devices", "2", "--budget", "48")
    uninterrupted = fit(tmp_path / "full", sft_dir, *args)
    fit(tmp_path / "split", sft_dir, *args, "--kill-at", "4", killed=True)
    data = tmp_path / "split" / "run" / "data"
    assert (data / "phase_0000.pairs.jsonl").exists() and not (data / "phase_0001.pairs.jsonl").exists()
    assert len(PhaseStore(data, 1).load_samples()) == 16  # killed inside phase 2, with its first round saved
    resumed = fit(tmp_path / "split", sft_dir, *args, "--resume")
    for name, value in uninterrupted.weights.items():
        assert_close(resumed.weights[name], value, atol=1e-5, rtol=0, msg=name)
    # killed + resumed runs asked for every score, and for none twice but at most the one answer process 1 may have
    # had between paid and stored when process 0 killed the job (a SIGKILL from another process can land in that
    # window of process 1's; process 0's own kill point waits for its window to close)
    asked, once = Counter(resumed.calls()), Counter(uninterrupted.calls())
    assert not once - asked and sum((asked - once).values()) <= 1, asked - once
    assert resumed.stats["phases"] == uninterrupted.stats["phases"]


# a run saved after its first phase by one world size and strategy, resumed by another: (saved by, resumed by, args)
MOVES = {
    "zero3x2-to-1": (("zero3", 2), ("single", 1), ()),
    "zero3x2-to-zero3x3": (("zero3", 2), ("zero3", 3), ()),
    "1-to-zero3x2": (("single", 1), ("zero3", 2), ()),
    "zero2x2-ensemble-to-1": (("zero2", 2), ("single", 1), ("--members", "3")),
    "ddpx2-ensemble-to-zero3x3": (("ddp", 2), ("zero3", 3), ("--members", "3")),
}
_SAVED: dict[tuple, tuple[Run, Path]] = {}


def saved_after_phase_1(tmp_path_factory, sft_dir, strategy: str, devices: int, args: tuple) -> tuple[Run, Path]:
    """The uninterrupted 2-phase run of a setup, and the output folder of the same run killed as phase 2 starts
    (its phase-1 checkpoint written); computed once per session."""
    key = (strategy, devices, args)
    if key not in _SAVED:
        where = ("--strategy", strategy, "--devices", str(devices), *args)
        full = fit(tmp_path_factory.mktemp("uninterrupted"), sft_dir, *where)
        cut = tmp_path_factory.mktemp("cut")
        fit(cut, sft_dir, *where, "--kill", "between:1", killed=True)
        _SAVED[key] = full, cut
    return _SAVED[key]


@pytest.mark.slow
@pytest.mark.parametrize("move", list(MOVES))
def test_a_checkpoint_moves_to_another_world_size_with_its_optimizer_state(move, tmp_path, tmp_path_factory, sft_dir):
    """Saved by N processes (DDP: one file; ZeRO-2/3: DeepSpeed's folder of N partitions), resumed by M with another
    strategy: weights, float32 master weights and AdamW's moments are cut for M, so phase 2 ends where the
    uninterrupted run of N ends (within float rounding). Without the moments the weights differ by ~5e-4 (a fresh
    AdamW's first steps), 5000 times the tolerance."""
    import shutil

    (strategy, devices), (to_strategy, to_devices), args = MOVES[move]
    full, cut = saved_after_phase_1(tmp_path_factory, sft_dir, strategy, devices, args)
    out = tmp_path / "moved"
    shutil.copytree(cut, out, symlinks=True)
    checkpoint = out / "run" / "ckpt" / "phase-1.ckpt"
    assert checkpoint.is_dir() == strategy.startswith("zero")
    resumed = fit(out, sft_dir, "--strategy", to_strategy, "--devices", str(to_devices), *args, "--resume")
    assert "Restored all states from the checkpoint" in resumed.output
    for name, value in full.weights.items():
        assert_close(resumed.weights[name], value, atol=1e-6, rtol=0, msg=name)
    assert resumed.stats["phases"] == full.stats["phases"]
    assert Counter(resumed.calls()) == Counter(full.calls())  # phase 1's answers are not asked again
    assert not list((out / "run" / "ckpt").glob("*universal*"))  # the conversion is removed once read


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["zero3-ema", "zero3-bpo-lora-ensemble"])
def test_export_from_a_deepspeed_checkpoint_folder(setup, tmp_path, tmp_path_factory, sft_dir):
    """The folder DeepSpeed wrote under ``last.ckpt`` (ZeRO-3 partitions of 2 processes) is consolidated: its
    weights are the trained ones, the exported model decodes greedily like the trained policy."""
    from transformers import AutoModelForCausalLM

    from bpo_lightning.export import consolidated, export_policy, load_checkpoint
    from bpo_lightning.lora import LoRA
    from bpo_lightning.module import BPOModule
    from bpo_lightning.policy import Pretrained

    two = two_processes(tmp_path_factory, sft_dir, setup)
    folder = two.out / "run" / "ckpt" / "last.ckpt"
    assert folder.is_dir()
    checkpoint = load_checkpoint(folder)
    weights = two.weights
    for name, value in weights.items():
        assert_close(checkpoint["state_dict"][f"policy.{name}"], value, atol=0, rtol=0, msg=name)
    assert checkpoint["bpo"]["phases_started"] == 2
    lora = LoRA(r=4, alpha=8, members=3) if "--members" in SETUPS[setup][1] else None
    module = BPOModule(policy=Pretrained(str(sft_dir)), lora=lora)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    if "EMA" in SETUPS[setup][1]:  # the EMA behavior is saved whole, not as process 0's shard of each tensor
        params = dict(module.policy.named_parameters())
        snapshot = checkpoint["bpo"]["behavior_snapshot"]
        assert snapshot.keys() == module.weights.state().keys()
        assert all(v.shape == params[k].shape for k, v in snapshot.items())
    prompt = module.tokenizer("hotel review : we checked in late .", return_tensors="pt")
    with module.policy_weights():
        expected = module.policy.generate(**prompt, max_new_tokens=12, do_sample=False)
    exported = AutoModelForCausalLM.from_pretrained(export_policy(module, tmp_path / "exported"))
    assert torch.equal(exported.generate(**prompt, max_new_tokens=12, do_sample=False), expected)
    file = consolidated(folder)  # what `bpo validate/test --ckpt_path <folder>` loads without DeepSpeed
    assert torch.load(file, weights_only=True)["state_dict"].keys() == checkpoint["state_dict"].keys()


@pytest.mark.slow
def test_three_processes_sample_within_one_prompt_of_each_other(tmp_path, tmp_path_factory, sft_dir):
    """100 prompts a phase in blocks of 64 on 3 processes: each samples and annotates 33 or 34 prompts a phase (whole
    blocks would give 64, 36 and 0), and they are the samples one process draws."""
    args = ("--budget", "200", "--block", "64")
    three = fit(tmp_path / "three", sft_dir, *args, "--strategy", "ddp", "--devices", "3")
    one = single(tmp_path_factory, sft_dir, *args)
    assert three.calls() == one.calls() and len(one.calls()) > 300  # (an identical pair is scored once)
    assert three.stats["phases"] == one.stats["phases"]
    # each process scored answers to the prompts of its own share only (33, 33 and 34 prompts a phase), and the
    # union of what they scored is what one process scores. The call logs span both phases, and a short answer (an
    # empty one, say) to a prompt that both phases ask can fall in one process's share in phase 1 and another's in
    # phase 2: shares are compared over the whole run.
    calls = [{tuple(c) for c in json.loads((three.out / f"calls.rank{r}.json").read_text())} for r in range(3)]
    shares = [set(), set(), set()]
    for phase in range(2):
        lines = PhaseStore(three.out / "run" / "data", phase).samples_path.read_text().splitlines()
        rows = sorted((json.loads(line) for line in lines), key=lambda row: row["index"])
        assert len(rows) == 100
        for rank, (start, stop) in enumerate([(0, 33), (33, 66), (66, 100)]):
            shares[rank] |= {(row["prompt"], text) for row in rows[start:stop] for text in row["responses"]}
    for rank in range(3):
        others = set().union(*(shares[r] for r in range(3) if r != rank)) - shares[rank]
        assert len(calls[rank] & shares[rank]) >= 0.9 * len(shares[rank]) and not calls[rank] & others, rank


@pytest.mark.slow
def test_an_annotator_slower_than_the_process_group_timeout_does_not_stop_the_job(tmp_path, tmp_path_factory, sft_dir):
    """Process 1's annotator takes 12 s at its first call of each phase (a slow judge) under a 5 s process-group
    timeout: process 0 waits for it outside any collective, and the run ends as one process's does."""
    slow = fit(tmp_path / "slow", sft_dir, "--strategy", "ddp", "--devices", "2", "--pg-timeout", "5", "--slow", "12")
    one = single(tmp_path_factory, sft_dir)
    assert slow.calls() == one.calls() and slow.stats["phases"] == one.stats["phases"]
    for name, value in one.weights.items():
        assert_close(slow.weights[name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_a_slow_evaluator_under_zero3_does_not_meet_the_process_group_timeout(tmp_path, tmp_path_factory, sft_dir):
    """Under ZeRO-3 every forward is collective. Process 1's evaluator takes 12 s at its first two calls (the start
    evaluation: 20 held-out prompts, two batches per process) under a 5 s timeout: each process answers all its
    batches, then judges them, so nobody waits for process 1 inside a collective (judging each batch before the
    next one's answers stopped this job at the timeout)."""
    args = ("--eval-prompts", "20")
    slow = fit(tmp_path / "slow", sft_dir, *args, "--strategy", "zero3", "--devices", "2", "--pg-timeout", "5",
               "--slow", "12")  # fmt: skip
    one = single(tmp_path_factory, sft_dir, *args)
    assert slow.stats["phases"] == one.stats["phases"]
    assert slow.stats["evaluation"]["win_rate"] == one.stats["evaluation"]["win_rate"]
    for name, value in one.weights.items():
        assert_close(slow.weights[name], value, atol=1e-5, rtol=0, msg=name)


# --- the pieces, in one process ---------------------------------------------------------------------------------------


def test_collection_rounds_split_prompts_evenly_for_a_sampler_seeded_per_prompt():
    from bpo_lightning.collection import shares

    assert shares(100, 64, 3, per_prompt=True) == [[(0, 33), (33, 66), (66, 100)]]
    assert shares(100, 64, 3, per_prompt=False) == [[(0, 64), (64, 100), (100, 100)]]  # whole blocks: one idle
    for n, size, world in ((100, 64, 3), (7, 2, 2), (1, 4, 3), (513, 128, 8), (40, 8, 3)):
        rounds = shares(n, size, world, per_prompt=True)
        flat = [i for r in rounds for start, stop in r for i in range(start, stop)]
        assert flat == list(range(n))  # every position once, in order
        for r in rounds:
            lengths = [stop - start for start, stop in r]
            assert max(lengths) - min(lengths) <= 1 and max(lengths) <= size


def test_global_batches_split_each_step_over_processes():
    one = global_batches(11, 4, seed=3, ranks=Ranks())
    assert [total for _, total in one] == [4, 4, 3]
    for world in (2, 3, 5):
        shares = [global_batches(11, 4, seed=3, ranks=Ranks(r, world)) for r in range(world)]
        for step, (pairs, total) in enumerate(one):
            assert sorted(i for s in shares for i in s[step][0]) == sorted(pairs)  # the same pairs in every step
            assert all(s[step][1] == total for s in shares)
    # 5 processes, a last step of 3 pairs: two processes have nothing of it (they get a stand-in of weight 0)
    assert [len(global_batches(11, 4, 3, Ranks(r, 5))[2][0]) for r in range(5)] == [1, 1, 1, 0, 0]


def test_weighted_shares_average_to_the_global_mean():
    """Σ_processes loss_scale·Σ_own w·ℓ, averaged over processes as DDP averages gradients, is the step's mean."""
    records = [
        PreferenceRecord(0, i, "p", "c", "r", 1.0, 0.0, [1], [2], [3], 0, -1.0, -2.0, -1.0, -2.0) for i in range(3)
    ]
    losses = torch.tensor([0.3, 0.7, 1.1])  # per-pair losses of the step's 3 pairs
    world = 4
    total = 0.0
    for rank in range(world):
        mine = [0, 1, 2][rank::world]
        batch = weighted_pair_batch(records, mine, 3, world, pad_id=0, eos_id=0)
        own = losses[mine] if mine else torch.zeros(1)  # a stand-in pair's loss is weighted 0
        total += (own * batch["pair_weight"]).sum() * batch["loss_scale"]
        assert batch["pair_weight"].tolist() == ([1.0] * len(mine) or [0.0])
    assert_close(total / world, losses.mean())


def test_shards_hold_whole_blocks_and_stand_ins():
    assert [list(Shard(5, r, 2, pad=True)) for r in range(2)] == [[0, 2, 4], [1, 3, 5]]  # 5: the stand-in
    assert [list(Shard(5, r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert list(Shard(1, 2, 3, pad=True)) == [1]  # fewer prompts than processes: a stand-in only
    assert [list(Shard(7, r, 2, pad=True, block=2)) for r in range(2)] == [[0, 1, 4, 5], [2, 3, 6]]
    assert [list(Shard(5, r, 2, pad=True, block=2)) for r in range(2)] == [[0, 1, 4], [2, 3, 5]]


def test_stand_in_prompts_are_answered_but_not_counted(tmp_path, sft_dir):
    module, data, trainer = make_run(tmp_path, sft_dir, eval_prompts=3, evaluation=Evaluation(kl_samples=2))
    data.annotation_cache = None
    data.setup("validate")
    module.configure_model()
    rows = data.eval_rows
    plain, padded = EvaluationMetrics(), EvaluationMetrics()
    records = evaluation_step(module, data.evaluation_inputs(), list(enumerate(rows)), plain)
    with_stand_in = evaluation_step(module, data.evaluation_inputs(), [*enumerate(rows), (-1, rows[0])], padded)
    assert records == with_stand_in  # the stand-in leaves no record
    a, b = plain.compute(), padded.compute()
    assert a["count"] == b["count"] == 3 and a["win_rate"] == b["win_rate"] and a["reward"] == b["reward"]
    # only stand-ins: the metrics are updated (every process must take part in their reduction) with nothing
    empty = EvaluationMetrics()
    assert evaluation_step(module, data.evaluation_inputs(), [(-1, rows[0])], empty) == []
    assert empty.compute()["count"] == 0 and "kl_initial" not in empty.compute()


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    """Two writers replacing one file 200 times each (the race two processes had on one fixed temporary name)."""
    path, errors = tmp_path / "phase_0000.json", []

    def write(tag: str) -> None:
        for i in range(200):
            try:
                atomic_write(path, json.dumps({"writer": tag, "i": i}))
            except OSError as err:  # pragma: no cover - the failure this test guards against
                errors.append(err)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(path.read_text())["i"] == 199
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase_0000.json"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the mode a plain open() gives


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_append_after_a_torn_line_keeps_every_line_whole(tmp_path):
    store = PhaseStore(tmp_path, 0)
    store.append_samples([sample_row(0)])
    with store.samples_path.open("a") as f:
        f.write('{"index": 1, "respo')  # a job killed mid-append
    store.append_samples([sample_row(1), sample_row(2)])
    assert [json.loads(line)["index"] for line in store.samples_path.read_text().splitlines()] == [0, 1, 2]


def test_the_loader_asked_for_before_the_model_exists_collects_nothing(tmp_path, sft_dir):
    """DeepSpeed asks for the training loader before ``configure_model`` to guess a micro-batch size."""
    annotator = CountingAnnotator()
    module, data, trainer = make_run(tmp_path, sft_dir, annotator=annotator)
    data.trainer = trainer
    trainer.strategy.connect(module)
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.batch_sampler.batch_size == 8 and len(loader.dataset) == 0
    assert annotator.calls == [] and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_bf16_mixed_behavior_log_probs_are_computed_as_training_computes(tmp_path, sft_dir):
    """Stored π_β log-probs come from forwards under the same autocast as training's (before, they were float32:
    |h| at a phase start reached 0.09 here). h at the first step of a phase is then 0 up to bf16 rounding; the
    forwards differ only in batch shape (scoring chunks vs shuffled training batches), which bf16 kernels feel."""
    from test_loop import FirstBatchOfPhase, RecordingDPOLoss, fresh_logps, load_pairs

    recorder = FirstBatchOfPhase()
    module, data, trainer = make_run(tmp_path, sft_dir, callbacks=[recorder], loss=RecordingDPOLoss(),
                                     evaluation=Evaluation(kl_samples=0), scoring_batch_size=64,
                                     behavior_logps="forward", trainer_args={"precision": "bf16-mixed"})  # fmt: skip
    trainer.fit(module, datamodule=data)
    h = module.loss.margins[recorder.first_call[0]]
    assert h.abs().max() < 0.05  # the same weights: 0 up to bf16 rounding of the kernels' shapes (sums of ~10 terms)
    records = load_pairs(tmp_path, 1)
    stored = torch.tensor([r.behavior_chosen_logps for r in records])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the policy as phase 2 began, one chunk, under autocast
        autocast, _ = fresh_logps(sft_dir, records, module.tokenizer, recorder.end_weights[0], share_prompts=True)
    float32, _ = fresh_logps(sft_dir, records, module.tokenizer, recorder.end_weights[0], share_prompts=True)
    assert_close(stored, autocast, atol=1e-5, rtol=0)
    assert (stored - float32).abs().max() > 1e-3  # the check can tell the two precisions apart
    h = module.loss.margins[recorder.first_call[1]]
    assert h.abs().max() < 0.05  # bf16 rounding of sums of ~10 token log-probs, not a float32/bf16 mismatch


@pytest.mark.slow
def test_bf16_mixed_sampler_log_probs_are_the_sampling_autocasts(tmp_path, sft_dir):
    """The sampler's own log-probs (the default) under bf16 autocast: decoding token by token and training's whole
    sequences round differently in bf16, so h at a phase start is 0 only to bf16 rounding of sums of ~10-30 token
    log-probs (measured up to 0.022 nats on this model with whole-vocabulary draws, 0.060 with the candidate draws'
    samples; bf16 keeps 8 bits of a logit's mantissa). The stored values are the bf16 computation's, not float32's."""
    from test_loop import FirstBatchOfPhase, RecordingDPOLoss, fresh_logps, load_pairs

    recorder = FirstBatchOfPhase()
    module, data, trainer = make_run(
        tmp_path,
        sft_dir,
        callbacks=[recorder],
        loss=RecordingDPOLoss(),
        evaluation=Evaluation(kl_samples=0),
        trainer_args={"precision": "bf16-mixed"},
    )
    trainer.fit(module, datamodule=data)
    for phase in range(2):
        h = module.loss.margins[recorder.first_call[phase]]
        assert h.abs().max() < 0.1
    records = load_pairs(tmp_path, 1)
    stored = torch.tensor([r.behavior_chosen_logps for r in records])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = fresh_logps(sft_dir, records, module.tokenizer, recorder.end_weights[0])
    float32, _ = fresh_logps(sft_dir, records, module.tokenizer, recorder.end_weights[0])
    assert_close(stored, autocast, atol=0.05, rtol=0)
    assert (stored - autocast).abs().max() < (stored - float32).abs().max()  # bf16 values, not float32 ones


def test_a_process_of_this_host_that_dies_stops_the_others_wait_naming_it(monkeypatch):
    """Processes waiting for each other at the end of a collection round poll the process group's store (no
    collective, no timeout): one that died would be waited for forever. The wait checks the job's processes on this
    host and stops with one line naming the dead one (here a child that exited: a zombie until reaped)."""
    import socket
    from datetime import timedelta

    import bpo_lightning.distributed as distributed
    from bpo_lightning.errors import RunError

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while not Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        pass  # exited, not reaped: what a launcher's dead child looks like until it polls
    store = torch.distributed.HashStore()
    store.set_timeout(timedelta(seconds=5))
    monkeypatch.setattr(distributed, "_default_store", lambda: store)
    host = socket.gethostname()
    monkeypatch.setattr(distributed, "PROCESSES", [(host, os.getpid()), (host, child.pid)])
    with pytest.raises(RunError, match=rf"process 1 of 2 \(pid {child.pid} on {host}\) stopped \(killed or crashed\)"):
        Ranks(0, 2).arrive("round-1")
    child.wait()
    monkeypatch.setattr(distributed, "PROCESSES", [(host, os.getpid()), (host, os.getpid())])
    store.set("bpo/round-2/1", "1")  # the other process arrived: no error
    Ranks(0, 2).arrive("round-2")


def test_a_collective_that_lost_its_peer_is_one_line_naming_the_dead_process(monkeypatch):
    import socket

    import bpo_lightning.distributed as distributed
    from bpo_lightning.cli import _user_error

    host = socket.gethostname()
    monkeypatch.setattr(distributed, "PROCESSES", [(host, os.getpid()), (host, 2**22 + 7)])  # no such pid
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8103: Connection reset by peer.")
    try:
        try:
            raise gloo
        except RuntimeError as err:
            raise ValueError("while training") from err
    except ValueError as err:
        message, code = _user_error(err)
    assert code == 1 and "\n" not in message
    assert message.startswith(f"process 1 of 2 (pid {2**22 + 7} on {host}) stopped (killed or crashed)"), message
    assert "Connection reset by peer" in message and "--ckpt_path last" in message
    assert _user_error(RuntimeError("CUDA out of memory")) is None  # not a lost peer: the traceback as it is
    monkeypatch.setattr(distributed, "PROCESSES", [])
    assert _user_error(gloo) is None  # one process: not a job's collective


@pytest.mark.slow
# process 1 dying is not tested here: process 0 is also Lightning's launcher, whose observer thread (every 5 s) may
# SIGKILL it before its collective fails, and then no line comes (seen in about one run in four)
@pytest.mark.parametrize("dies", [0])
def test_bpo_fit_names_the_process_that_died_in_one_line_and_resumes(dies, tmp_path, sft_dir):
    """`bpo fit` on 2 DDP processes, one SIGKILLed as its second training step starts: the other's all-reduce fails,
    and it says so in one line naming the dead process and its pid, no traceback; the same command with
    `--ckpt_path last` then finishes the run. Process 0 is also Lightning's launcher: when it dies the job's exit
    status is its SIGKILL, and process 1 (its child) still prints the line and exits."""
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "bpo_lightning", "fit", "--config", str(SCRIPT.parents[2] / "configs/quickstart.yaml"),
        "--model.policy=bpo_lightning.policy.Pretrained", f"--model.policy.init_args.name_or_path={sft_dir}",
        f"--trainer.default_root_dir={run}", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--data.budget=32", "--data.num_phases=2", "--data.batch_size=8", "--data.sampler.init_args.max_new_tokens=12",
        "--data.sampler.init_args.batch_size=8", "--data.sampler.init_args.progress=false",
        "--data.eval_prompts.init_args.limit=8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent), "BPO_TEST_DIES": str(dies)}
    env.pop("BPO_DEBUG", None)
    dying = [*args, "--trainer.callbacks+=dying.DieAlone"]
    done = subprocess.run(
        dying, capture_output=True, text=True, timeout=HANG_GUARD_S, env={**env, "BPO_TEST_DIES_AT": "step:2"}
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("bpo: error:")]
    # process 1 dead: process 0 exits 1 at once, unless Lightning's launcher (its own thread, polling every 5 s for
    # dead children) kills it first; process 0 dead: the launcher itself was killed
    assert done.returncode in ((1, -signal.SIGKILL) if dies else (-signal.SIGKILL,)), done.stderr[-3000:]
    launcher = [line for line in done.stderr.splitlines() if "Child process with PID" in line and "code -9" in line]
    if errors or not launcher:
        assert len(errors) == 1 and f"bpo: error: process {dies} of 2 (pid " in errors[0], done.stderr[-3000:]
        assert f"stopped (killed or crashed) while process {1 - dies} waited for it" in errors[0]
    else:  # Lightning's launcher killed process 0 before its collective failed: its own line names the child
        assert dies == 1 and done.returncode == -signal.SIGKILL and len(launcher) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    resumed = subprocess.run([*args, "--ckpt_path=last"], capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "data" / "phase_0001.pairs.jsonl").exists()
