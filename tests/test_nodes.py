"""Two "nodes" on one machine: two torchrun launchers on 127.0.0.1, one process each, running `bpo fit` as a user
with a cluster does. With a shared run folder the job fits and resumes; with a run folder private to node 1 (its
own mount namespace, a tmpfs over the runs folder) every process stops at start with one line, fresh or resumed,
instead of waiting in different collectives forever.

Needs ``unshare`` and the right to mount (root); skipped otherwise.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import stop_stalled

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
HANG_GUARD_S = 300  # a run takes ~30-60 s here; a stall is reported with every process's stacks


def _can_mount_privately() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _can_mount_privately(), reason="needs unshare and mount (root)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bpo_args(run: Path, sft_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        "--model.policy=bpo_lightning.policy.Pretrained",
        f"--model.policy.init_args.name_or_path={sft_dir}",
        f"--trainer.default_root_dir={run}",
        "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp",
        "--trainer.devices=1",
        "--trainer.num_nodes=2",
        "--data.budget=32",
        "--data.num_phases=2",
        "--data.batch_size=8",
        "--data.sampler.init_args.max_new_tokens=12",
        "--data.sampler.init_args.batch_size=8",
        "--data.sampler.init_args.progress=false",
        "--data.eval_prompts.init_args.limit=8",
        *extra,
    ]


def two_nodes(runs: Path, args: list[str], private: bool) -> list[tuple[int, str]]:
    """(exit status, output) of node 0 and node 1; with ``private`` node 1 sees an empty tmpfs at ``runs``."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    bpo = shutil.which("bpo", path=str(Path(sys.executable).parent)) or "bpo"
    procs = []
    for node in (0, 1):
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "--no-python", bpo, *args,
        ]  # fmt: skip
        if private and node == 1:  # its own view of the runs folder: an empty tmpfs that node 0 never sees
            launch = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                      'mount -t tmpfs tmpfs "$0" && exec "$@"', str(runs), *launch]  # fmt: skip
        procs.append(
            subprocess.Popen(
                launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
            )  # fmt: skip
        )
    results = []
    for node, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            stacks = [stop_stalled(p) for p in procs]
            pytest.fail(f"node {node} gave no result after {HANG_GUARD_S} s (a deadlock?):\n" + "\n".join(
                f"--- node {n} ---\n{text[-5000:]}" for n, text in enumerate(stacks)))  # fmt: skip
        results.append((proc.returncode, output))
    return results


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("bpo: error:")]


def test_a_run_folder_private_to_one_node_stops_every_process_in_one_line_fresh_or_resumed(tmp_path, sft_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    run = runs / "r"
    fresh = two_nodes(runs, bpo_args(run, sft_dir), private=True)
    for node, (code, output) in enumerate(fresh):
        assert code != 0, (node, output[-3000:])
    lines = error_lines(fresh[0][1])
    assert len(lines) == 1 and "trainer.default_root_dir" in lines[0] and "not one folder for every process" in lines[0]
    assert "process 1 on" in lines[0], lines
    assert not (run / "data" / "phase_0001.samples.jsonl").exists()  # stopped before collecting anything
    # a resume of a finished phase, with node 1 still seeing nothing: refused the same way, before any restore
    done = two_nodes(runs, bpo_args(run, sft_dir), private=False)
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:]
    assert (run / "checkpoints" / "phase-2.ckpt").exists()
    resumed = two_nodes(runs, bpo_args(run, sft_dir, "--ckpt_path=last"), private=True)
    for node, (code, output) in enumerate(resumed):
        assert code != 0, (node, output[-3000:])
    lines = error_lines(resumed[0][1])
    assert len(lines) == 1 and "trainer.default_root_dir" in lines[0], resumed[0][1][-3000:]


def test_two_nodes_sharing_the_run_folder_fit_and_resume(tmp_path, sft_dir):
    runs = tmp_path / "runs"
    run = runs / "r"
    first = two_nodes(runs, bpo_args(run, sft_dir), private=False)
    assert [code for code, _ in first] == [0, 0], first[0][1][-3000:]
    assert "phase 2/2 | pairs" in first[0][1]
    again = two_nodes(
        runs, bpo_args(run, sft_dir, f"--ckpt_path={run / 'checkpoints' / 'phase-1.ckpt'}"), private=False
    )
    assert [code for code, _ in again] == [0, 0], again[0][1][-3000:]
    assert "phase 2/2 | pairs" in again[0][1] and "phase 1/2 | pairs" not in again[0][1]
    assert not list(run.glob(".bpo-shared-check*"))  # the token is gone
    assert (run / "checkpoints" / "phase-2.ckpt").exists()
