"""Bad input through the `bpo` command: each case ends in one line, ``bpo: error: …``, that names the config key and
the file (and row) at fault, with no traceback — or, where the input is acceptable, works as documented.

Every case runs ``bpo fit`` in this process on a shrunk quickstart (1 phase of 8 prompts); docs/troubleshooting.md
lists them.
"""

import errno
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from bpo_lightning.cli import main

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bpo"])
    monkeypatch.delenv("BPO_DEBUG", raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sft-cache")  # the embedded SFT start, built once for the module


def shrunk(run: Path, cache: Path) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        f"--trainer.default_root_dir={run}",
        f"--model.policy.init_args.cache_dir={cache}",
        "--model.policy.init_args.steps=40",
        "--data.budget=8",
        "--data.num_phases=1",
        "--data.batch_size=4",
        "--data.sampler.init_args.max_new_tokens=8",
        "--data.sampler.init_args.batch_size=8",
        "--data.sampler.init_args.progress=false",
        "--data.eval_prompts=null",
        "--trainer.enable_checkpointing=true",
    ]


def bpo(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``bpo``; its exit status and the error line (asserting there is exactly one and no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bpo: error:") or line.startswith("error:")]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    return exit_info.value.code, lines[0]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def prompts_file(tmp: Path, name: str, text: str | bytes) -> list[str]:
    return ["--data.prompts=bpo_lightning.prompts.PromptSource", f"--data.prompts.path={write(tmp / name, text)}"]


GOOD_ROW = json.dumps({"prompt": "hotel review : we stayed here ."})


def returns_text(prompt, response):
    return "great"


def raises_midway(prompt, response):
    raise ConnectionError("the scoring service went away")


def constant(prompt, response):
    return 0.5


def annotator(function: str) -> list[str]:
    return ["--data.annotator=RuleAnnotator", f"--data.annotator.init_args.function=test_bad_input:{function}"]


def checkpoint(tmp: Path, kind: str) -> list[str]:
    path = tmp / f"{kind}.ckpt"
    if kind == "garbage":
        write(path, os.urandom(2048))
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)  # another program's checkpoint
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "bpo": {}}, path)
        data = path.read_bytes()
        write(path, data[: len(data) // 2])
    return [f"--ckpt_path={path}"]


# id: (arguments after the shrunk quickstart (a function of the tmp folder), exit status, what the line names)
CASES = {
    # --- settings --------------------------------------------------------------------------------------------------
    "unknown loss": (lambda t: ["--model.loss=FooLoss"], 2, ["model.loss", "'FooLoss'", "DPOLoss"]),
    "unknown annotator": (lambda t: ["--data.annotator=Oracle"], 2, ["data.annotator", "'Oracle'", "RuleAnnotator"]),
    "unknown sampler": (lambda t: ["--data.sampler=TopP"], 2, ["data.sampler", "'TopP'", "GenerateSampler"]),
    "unknown evaluator": (lambda t: ["--data.evaluator=Human"], 2, ["data.evaluator", "'Human'"]),
    "unknown behavior": (lambda t: ["--model.behavior=Sticky"], 2, ["model.behavior", "Sticky"]),
    "max_epochs given": (lambda t: ["--trainer.max_epochs=3"], 2, ["trainer.max_epochs", "data.num_phases"]),
    "max_epochs in a config": (
        lambda t: ["--config", str(write(t / "epochs.yaml", "trainer:\n  max_epochs: 3\n"))],
        2,
        ["trainer.max_epochs", "epochs.yaml", "data.num_phases"],
    ),
    "negative beta": (lambda t: ["--model.loss.init_args.beta=-1"], 2, ["model.loss.init_args.beta", "> 0"]),
    "zero phases": (lambda t: ["--data.num_phases=0"], 2, ["data.num_phases", ">= 1"]),
    "zero batch size": (lambda t: ["--data.batch_size=0"], 2, ["data.batch_size", ">= 1"]),
    "zero min_pairs": (lambda t: ["--data.min_pairs=0"], 2, ["data.min_pairs", ">= 1"]),
    "more phases than prompts": (lambda t: ["--data.num_phases=9"], 2, ["data.num_phases", "data.budget"]),
    "budget above the pool": (lambda t: ["--data.budget=100000"], 2, ["data.budget", "data.prompts"]),
    "bad reference": (lambda t: ["--model.reference=sft"], 2, ["model.reference", "sft"]),
    "misspelt key": (lambda t: ["--data.batchsize=3"], 2, ["data.batchsize"]),
    "missing config file": (lambda t: ["--config", str(t / "nope.yaml")], 2, ["nope.yaml"]),
    "YAML syntax error": (
        lambda t: ["--config", str(write(t / "broken.yaml", "data:\n  budget: [8\n"))],
        2,
        ["broken.yaml"],
    ),
    "YAML python tag": (
        lambda t: ["--config", str(write(t / "tag.yaml", "data:\n  budget: !!python/object/apply:os.system [id]\n"))],
        2,
        ["tag.yaml"],
    ),
    "class_path not a subclass": (lambda t: ["--model.loss=collections.OrderedDict"], 2, ["model.loss", "OrderedDict"]),
    "judge given a key instead of a variable name": (
        lambda t: [
            "--data.annotator=HTTPJudge",
            "--data.annotator.init_args.base_url=http://127.0.0.1:9/v1",
            "--data.annotator.init_args.model=m",
            "--data.annotator.init_args.api_key_env=sk-abc123secret",
        ],
        2,
        ["data.annotator.init_args.api_key_env", "NAME"],
    ),
    "judge template without a field": (
        lambda t: [
            "--data.annotator=HTTPJudge",
            "--data.annotator.init_args.base_url=http://127.0.0.1:9/v1",
            "--data.annotator.init_args.model=m",
            "--data.annotator.init_args.api_key_env=null",
            "--data.annotator.init_args.template=Which is better?",
        ],
        2,
        ["data.annotator.init_args.template", "{prompt}"],
    ),
    # --- models and checkpoints ------------------------------------------------------------------------------------
    "missing model folder": (
        lambda t: ["--model.policy=Pretrained", f"--model.policy.init_args.name_or_path={t / 'no-such-model'}"],
        2,
        ["model.policy.init_args.name_or_path", "no-such-model"],
    ),
    "model folder without config.json": (
        lambda t: [
            "--model.policy=Pretrained",
            f"--model.policy.init_args.name_or_path={write(t / 'm' / 'x.txt', '').parent}",
        ],
        2,
        ["model.policy.init_args.name_or_path", "config.json"],
    ),
    "missing reward model folder": (
        lambda t: [
            "--data.annotator=RewardModelAnnotator",
            f"--data.annotator.init_args.name_or_path={t / 'no-such-rm'}",
        ],
        2,
        ["data.annotator.init_args.name_or_path", "no-such-rm"],
    ),
    "prompt too long for the context": (
        lambda t: [
            "--data.sampler.init_args.max_prompt_tokens=200",
            "--data.sampler.init_args.max_new_tokens=100",
            *prompts_file(
                t,
                "long.jsonl",
                "".join(json.dumps({"prompt": f"hotel review {i} : " + "we stayed . " * 60}) + "\n" for i in range(8)),
            ),
        ],
        2,
        ["data.prompts", "data.sampler.init_args.max_prompt_tokens", "context"],
    ),
    "held-out prompt too long for the context": (
        lambda t: [
            "--data.eval_prompts=bpo_lightning.prompts.PromptSource",
            "--data.eval_prompts.path="
            + str(
                write(
                    t / "eval.jsonl",
                    json.dumps({"prompt": "hotel review : " + "we stayed . " * 60, "reference": "it was fine ."}),
                )
            ),
            "--model.evaluation.max_prompt_tokens=200",
            "--model.evaluation.max_new_tokens=8",
        ],
        2,
        ["data.eval_prompts", "model.evaluation.max_prompt_tokens", "context"],
    ),
    "missing checkpoint": (lambda t: [f"--ckpt_path={t / 'none.ckpt'}"], 2, ["ckpt_path", "none.ckpt"]),
    "garbage checkpoint": (lambda t: checkpoint(t, "garbage"), 2, ["ckpt_path", "garbage.ckpt", "not a complete"]),
    "truncated checkpoint": (lambda t: checkpoint(t, "truncated"), 2, ["ckpt_path", "truncated.ckpt"]),
    "foreign checkpoint": (lambda t: checkpoint(t, "foreign"), 2, ["ckpt_path", "foreign.ckpt", "not a bpo"]),
    # --- prompt files ----------------------------------------------------------------------------------------------
    "missing prompt file": (
        lambda t: ["--data.prompts=bpo_lightning.prompts.PromptSource", f"--data.prompts.path={t / 'none.jsonl'}"],
        2,
        ["data.prompts", "none.jsonl"],
    ),
    "malformed JSONL line": (
        lambda t: prompts_file(t, "bad.jsonl", f'{GOOD_ROW}\n{GOOD_ROW}\n{{"prompt": "cut\n{GOOD_ROW}\n'),
        2,
        ["data.prompts", "bad.jsonl", "line 3"],
    ),
    "non-UTF-8 prompt file": (
        lambda t: prompts_file(t, "latin1.jsonl", f"{GOOD_ROW}\n".encode() + '{"prompt": "café"}\n'.encode("latin-1")),
        2,
        ["data.prompts", "latin1.jsonl", "UTF-8"],
    ),
    "row without a prompt": (
        lambda t: prompts_file(t, "noprompt.jsonl", f"{GOOD_ROW}\n" + json.dumps({"text": "x"}) + "\n"),
        2,
        ["data.prompts", "noprompt.jsonl", "2"],
    ),
    "prompt that is not text": (
        lambda t: prompts_file(t, "number.jsonl", f"{GOOD_ROW}\n" + json.dumps({"prompt": 42}) + "\n"),
        2,
        ["data.prompts", "number.jsonl", "2"],
    ),
    "CSV without a prompt column": (
        lambda t: prompts_file(t, "cols.csv", "question,answer\nhow ?,fine\n"),
        2,
        ["data.prompts", "cols.csv"],
    ),
    "empty prompt file": (lambda t: prompts_file(t, "empty.jsonl", ""), 2, ["data.prompts", "empty.jsonl"]),
    "held-out prompts without references": (
        lambda t: [
            "--data.eval_prompts=bpo_lightning.prompts.PromptSource",
            f"--data.eval_prompts.path={write(t / 'noref.jsonl', GOOD_ROW + chr(10))}",
        ],
        2,
        ["data.eval_prompts", "noref.jsonl", "reference"],
    ),
    # --- the run folder --------------------------------------------------------------------------------------------
    "damaged phase file": (
        lambda t: write(t / "run" / "data" / "phase_0000.json", '{"provenance": {"phase": 0,') and [],
        1,
        ["phase_0000.json"],
    ),
    "cache file that is not a cache": (
        lambda t: ["--data.annotation_cache=" + str(write(t / "notes.sqlite", "just text " * 200))],
        1,
        ["data.annotation_cache", "notes.sqlite"],
    ),
    # --- annotators ------------------------------------------------------------------------------------------------
    "annotator returning text": (lambda t: annotator("returns_text"), 1, ["returned 'great'", "the prompt"]),
    "annotator failing": (lambda t: annotator("raises_midway"), 1, ["data.annotator", "ConnectionError", "failed"]),
    "annotator that ties every pair": (lambda t: annotator("constant"), 1, ["phase 1 kept 0 pairs", "tie"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_it(case, tmp_path, cache, capsys):
    arguments, code, names = CASES[case]
    extra = arguments(tmp_path)
    status, line = bpo(capsys, shrunk(tmp_path / "run", cache) + list(extra))
    assert status == code, line
    for name in names:
        assert name in line, (name, line)
    assert "sk-abc123secret" not in line  # a secret is never echoed


@pytest.mark.slow
def test_damaged_pairs_file_names_its_line(tmp_path, cache, capsys):
    """A complete phase whose pairs.jsonl was damaged afterwards: the resume names the file and the line."""
    run = tmp_path / "run"
    main(shrunk(run, cache))
    pairs = run / "data" / "phase_0000.pairs.jsonl"
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join([lines[0], lines[1][:30], *lines[2:]]) + "\n")
    status, line = bpo(capsys, shrunk(run, cache))  # the same command again: it reuses the complete phase
    assert status == 1 and "phase_0000.pairs.jsonl" in line and "line 2" in line, line


@pytest.mark.slow
def test_a_full_disk_names_the_path_and_keeps_what_was_written(tmp_path, cache, capsys, monkeypatch):
    run = tmp_path / "run"
    import bpo_lightning.store as store

    replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith(".pairs.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.os, "replace", full)
    status, line = bpo(capsys, shrunk(run, cache))
    assert status == 1 and "phase_0000.pairs.jsonl" in line and "No space left on device" in line, line
    assert not list((run / "data").glob("*.tmp"))  # no half-written file left behind
    assert len((run / "data" / "phase_0000.samples.jsonl").read_text().splitlines()) == 8  # paid rows are kept


def test_debug_shows_the_traceback(tmp_path, cache, capsys, monkeypatch):
    with pytest.raises(ValueError, match="data.num_phases must be >= 1"):
        main(shrunk(tmp_path / "run", cache) + ["--data.num_phases=0", "--debug"])
    monkeypatch.setenv("BPO_DEBUG", "1")
    with pytest.raises(ValueError, match="data.num_phases must be >= 1"):
        main(shrunk(tmp_path / "run", cache) + ["--data.num_phases=0"])


def test_a_locked_cache_is_waited_for_not_fatal(tmp_path):
    """Documented behaviour rather than an error: another process writing the cache delays this one's writes."""
    from bpo_lightning.cache import AnnotationCache

    path = tmp_path / "cache.sqlite"
    AnnotationCache(path).put("a", ["p"], ["r"], [1.0])
    holder = sqlite3.connect(path)
    holder.execute("BEGIN IMMEDIATE")
    assert AnnotationCache(path, timeout=0.1).get("a", ["p"], ["r"]) == [1.0]
    holder.rollback()


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("--data.sampler.init_args.batch_size=4", "data.sampler.init_args.batch_size: saved 8, now 4"),
        ("--model.reference=initial", "model.reference: saved 'behavior', now 'initial'"),
        ("--model.loss=IPOLoss", "model.loss.class_path: saved 'bpo_lightning.DPOLoss', now 'bpo_lightning.IPOLoss'"),
    ],
    ids=["block size", "reference", "loss"],
)
def test_a_resume_with_another_block_size_reference_or_loss_is_refused(flag, key, tmp_path, cache, capsys):
    """The block size seeds the sampler's blocks (another size draws other samples); the reference and the loss
    decide what the saved pairs train. A second `bpo fit` into the run's folder with one of them changed is refused,
    naming the key, and changes no file."""
    run = tmp_path / "run"
    main(shrunk(run, cache))
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*shrunk(run, cache), flag, "--ckpt_path=last"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "holds a run with other settings" in err and key in err, err  # the differing key listed below the line
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files


def test_a_second_bpo_fit_into_a_folder_being_written_is_refused(tmp_path, cache, capsys):
    """The reproduction: two `bpo fit` into one run folder at once both exited 0, every row of samples.jsonl twice.
    Now the second is refused in one line naming the first's pid (exit 2) and writes nothing; the first finishes
    with every prompt once. A lock file left by a process that died is taken over."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    main(shrunk(tmp_path / "warm", cache))  # the SFT start built once, outside the timing of the race
    args = [*shrunk(run, cache)]
    args[args.index("--data.budget=8")] = "--data.budget=64"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "bpo_lightning", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = run / ".bpo.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and f"pid {first.pid} " in lock.read_text()) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    code, line = bpo(capsys, args)
    assert code == 2 and f"is being written by another bpo fit (pid {first.pid} on" in line, line
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    rows = [json.loads(x) for x in (run / "data" / "phase_0000.samples.jsonl").read_text().splitlines()]
    assert sorted(row["index"] for row in rows) == list(range(64))  # every prompt once
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".bpo.lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")  # its holder is gone
    main(shrunk(stale, cache))
    assert f"pid {os.getpid()} " in (stale / ".bpo.lock").read_text()


def test_an_annotator_function_that_does_not_import_is_one_line(tmp_path, cache, capsys):
    status, line = bpo(
        capsys,
        [
            *shrunk(tmp_path / "run", cache),
            "--data.annotator=RuleAnnotator",
            "--data.annotator.init_args.function=no_such_module:score",
        ],
    )
    assert status == 2 and "annotator.init_args.function" in line and "no_such_module" in line, line


def test_an_annotator_module_only_the_working_directory_holds_is_refused_unrun(tmp_path, cache, capsys, monkeypatch):
    """The reproduction: `python -m bpo_lightning fit` started in a folder holding ``evil.py`` (a downloaded run, a
    cloned repository) imported and ran it for ``function: evil:score``. It is now refused in one line naming the
    key and the file, before any of its code runs."""
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "evil.py").write_text(
        "import pathlib\n\npathlib.Path('ran').write_text('yes')\n\n\ndef score(prompt, response):\n    return 1.0\n"
    )
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path])  # what `python -m` started here puts first
    argv = [*shrunk(tmp_path / "run", cache), "--data.annotator=RuleAnnotator"]
    status, line = bpo(capsys, [*argv, "--data.annotator.init_args.function=evil:score"])
    assert status == 2 and "data.annotator.init_args.function" in line and "working directory" in line, line
    assert str(folder / "evil.py") in line and not (folder / "ran").exists() and "evil" not in sys.modules


def test_annotator_functions_import_from_packages_the_import_path_or_a_named_file(tmp_path, monkeypatch):
    from bpo_lightning.annotation import import_callable
    from bpo_lightning.errors import InputError

    key = "data.annotator.init_args.function"
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "my_rules.py").write_text("def score(prompt, response):\n    return 2.0\n")
    path = list(sys.path)
    monkeypatch.chdir(folder)
    for first in (str(folder), ""):  # `python -m` or `python -c` started in the folder
        monkeypatch.setattr(sys, "path", [first, *path])
        with pytest.raises(InputError, match=rf"{key}: 'my_rules:score' would be imported from the working"):
            import_callable("my_rules:score", key)
    assert import_callable("./my_rules.py:score", key)("p", "r") == 2.0  # named by its file
    assert import_callable(f"{folder / 'my_rules.py'}:score", key)("p", "r") == 2.0
    with pytest.raises(InputError, match=r"names .*missing.py, which is not a file"):
        import_callable("./missing.py:score", key)
    monkeypatch.setattr(sys, "path", [*path, str(folder)])  # asked for on the import path (PYTHONPATH)
    assert import_callable("my_rules:score", key)("p", "r") == 2.0
    monkeypatch.chdir(ROOT)  # the package's own checkout, started with `python -m` there: it is installed too
    monkeypatch.setattr(sys, "path", [str(ROOT), *(p for p in path if p and Path(p).resolve() != ROOT.resolve())])
    assert import_callable("bpo_lightning.tasks.reviews:gold_reward", key) is not None


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path, cache, capsys):
    """A file where the run folder would be (a read-only folder fails the same way, for a user who is not root)."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    status, line = bpo(capsys, shrunk(blocker / "run", cache))
    assert status == 1 and f"cannot write {blocker / 'run'}" in line and "trainer.default_root_dir" in line, line


def test_a_disk_that_fills_during_a_checkpoint_is_one_line(tmp_path, cache, capsys, monkeypatch):
    """torch's zip writer reports a failed write as a RuntimeError raised while it handles the OSError: the line
    names the checkpoint and the disk, no temporary file is left, and the phase's data is kept."""
    import torch

    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and "bpo" in obj):  # only the checkpoint's write fails
            return save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from None

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    status, line = bpo(capsys, shrunk(run, cache))
    assert status == 1 and "checkpoint.dirpath" in line and "No space left on device" in line, line
    assert not list((run / "checkpoints").glob("*.tmp")) and not list((run / "checkpoints").glob("*.ckpt"))
    assert (run / "data" / "phase_0000.pairs.jsonl").exists()  # the phase collected before the checkpoint is kept
