"""Bad input files and a damaged run folder: each is one line naming the config key, the file and the row or line."""

import errno
import json
import os
import re

import pytest
from conftest import sample_row

from bpo_lightning.errors import InputError, RunError
from bpo_lightning.prompts import PromptSource
from bpo_lightning.store import PhaseStore, atomic_write


def _raises(kind, call, *parts):
    """``call()`` raises ``kind`` with a one-line message holding every one of ``parts``; the message."""
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


def _load(path, key="data.prompts", **kwargs):
    return lambda: PromptSource(str(path), **kwargs).load(key, require_reference=key == "data.eval_prompts")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- prompt files ----------------------------------------------------------------------------------------------------
def test_a_malformed_jsonl_line_is_named(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c", oops}', {"prompt": "d"}])
    message = _raises(InputError, _load(path), f"data.prompts: {path} line 3 is not valid JSON (")
    assert "column 17" in message


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "[1, 2]"])
    _raises(InputError, _load(path), f"data.prompts: {path} line 2 is not a JSON object")


def test_a_json_list_with_a_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "a"},\n {"prompt": "b"},\n {"prompt" "c"}]\n')
    _raises(InputError, _load(path), f"data.prompts: {path} line 3 is not valid JSON")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    first = b'{"prompt": "a"}\n' if suffix == ".jsonl" else b"prompt\na\n"
    second = b'{"prompt": "caf\xe9"}\n' if suffix == ".jsonl" else b"caf\xe9\n"
    path.write_bytes(first + second)
    line = 2 if suffix == ".jsonl" else 3
    _raises(InputError, _load(path), f"data.prompts: {path} line {line} is not UTF-8 text", "byte 0xe9")


def test_a_csv_without_the_prompt_column_lists_its_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,reference\na,b\n")
    _raises(InputError, _load(path), "data.prompts.init_args.prompt_field", str(path), "['question', 'reference']")


def test_a_csv_row_with_too_many_fields_is_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,reference\na,b\nc,d,e\nf,g\n")
    _raises(InputError, _load(path), f"data.prompts: row 1 of {path} (line 3) has 3 fields but the header has 2")


def test_an_empty_csv_cell_is_skipped_and_its_row_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,reference\n,b\nc,d\n")
    with pytest.warns(UserWarning, match=rf"data.prompts: skipped 1 rows of {re.escape(str(path))} .*\[0\]"):
        rows = PromptSource(str(path)).load("data.prompts")
    assert [r["prompt"] for r in rows] == ["c"]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"question": "b"}, "has no 'prompt' (missing or null)"),
        ({"prompt": None}, "has no 'prompt' (missing or null)"),
        ({"prompt": 5}, "has 'prompt' = 5, a number, not text"),
        ({"prompt": {"text": "b"}}, "a JSON object, not text"),
    ],
)
def test_a_jsonl_row_without_a_text_prompt_is_named(tmp_path, row, problem):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", row])  # a blank line: row 1 is on line 3
    _raises(InputError, _load(path), f"data.prompts: row 1 of {path} (line 3) ", problem)


def test_a_prompt_of_mixed_kinds_after_a_blank_line_is_named(tmp_path):
    """pyarrow stops at a column that changes kind; its own message names neither the file nor the line."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "reference": "x"}, "", {"prompt": "b", "reference": 3}])
    _raises(
        InputError,
        _load(path),
        f"data.prompts: row 1 of {path} (line 3) has 'reference' = 3, a number, where line 1 has text",
    )


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("p.jsonl", "", "is empty (no rows)"),
        ("p.jsonl", "\n  \n", "is empty (no rows)"),
        ("p.json", "[]", "is empty"),
        ("p.csv", "prompt,reference\n", "has a header (prompt, reference) but no rows"),
    ],
)
def test_an_empty_prompt_file_is_named(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    _raises(InputError, _load(path, "data.eval_prompts"), f"data.eval_prompts: {path} {problem}")


def test_a_file_of_empty_prompts_has_no_usable_prompts(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": " "}, {"prompt": ""}])
    with pytest.warns(UserWarning, match="skipped 2 rows"):
        _raises(InputError, _load(path), f"data.prompts: {path} has no usable prompts")


def test_a_missing_prompt_file_is_an_input_error_and_a_file_not_found_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    _raises(InputError, _load(path), f"data.prompts: prompt file {path} does not exist")
    _raises(FileNotFoundError, _load(path), str(path))
    _raises(InputError, _load(tmp_path / "folder.jsonl"), "does not exist")
    (tmp_path / "folder.jsonl").mkdir()
    _raises(InputError, _load(tmp_path / "folder.jsonl"), f"{tmp_path / 'folder.jsonl'} is a folder")


def test_a_missing_local_dataset_folder_is_named(tmp_path):
    path = tmp_path / "no" / "such" / "folder"
    _raises(InputError, _load(path, "data.eval_prompts"), f"data.eval_prompts: no file or folder {path}")


def test_eval_prompts_without_a_reference_name_the_row(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "reference": "x"}, {"prompt": "b"}])
    _raises(
        InputError,
        _load(path, "data.eval_prompts"),
        f"data.eval_prompts: row 1 of {path} (line 2) has no "
        "reference answer (its 'reference' is missing, null or empty)",
    )
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,reference\na,x\n"two\nlines",y\nc\n')
    _raises(InputError, _load(csv, "data.eval_prompts"), f"data.eval_prompts: row 2 of {csv} (line 5) has no")


def test_a_good_prompt_file_still_loads(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "reference": "x"}, {"prompt": "b", "reference": "y"}])
    assert [r["prompt"] for r in PromptSource(str(path)).load("data.eval_prompts", require_reference=True)] == [
        "a",
        "b",
    ]


# -- the same rows as JSON lines, CSV and parquet ---------------------------------------------------------------------
FORMATS = ["jsonl", "csv", "parquet"]


def _file(tmp_path, fmt, rows):
    """``rows`` as a ``p.<fmt>`` file (a missing or null value is an empty CSV cell) and the `` (line N)`` naming row
    ``index`` (JSON lines and CSV files only: parquet has no lines)."""
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        _jsonl(path, rows)
    elif fmt == "csv":
        import csv

        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows({k: "" if r.get(k) is None else r[k] for k in columns} for r in rows)
    else:
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(path)
    return path, (lambda index: "" if fmt == "parquet" else f" (line {index + 1 + (fmt == 'csv')})")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("empty", ["", None, "  ", "missing"])
def test_an_empty_reference_is_a_prompt_and_an_error_only_where_one_is_required(tmp_path, fmt, empty):
    second = {"prompt": "b"} if empty == "missing" else {"prompt": "b", "reference": empty}
    path, line = _file(tmp_path, fmt, [{"prompt": "a", "reference": "x"}, second, {"prompt": "c", "reference": "z"}])
    assert PromptSource(str(path)).load("data.prompts") == [
        {"prompt": "a", "reference": "x"},
        {"prompt": "b", "reference": None},
        {"prompt": "c", "reference": "z"},
    ]
    message = _raises(
        InputError,
        _load(path, "data.eval_prompts"),
        f"data.eval_prompts: row 1 of {path}{line(1)} "
        "has no reference answer (its 'reference' is missing, null or empty); evaluation needs one for "
        "every prompt",
    )
    assert message.startswith("data.eval_prompts: row 1 of")


def test_a_csv_whose_first_ten_thousand_references_are_empty_loads(tmp_path):
    """pandas reads a CSV file in chunks of 10,000 rows and guessed an empty column to hold numbers: the first text
    cell after it failed the whole file."""
    path = tmp_path / "p.csv"
    path.write_text("prompt,reference\n" + "".join(f"p{i},\n" for i in range(10_000)) + "last,x\n")
    rows = PromptSource(str(path)).load("data.prompts")
    assert len(rows) == 10_001 and rows[0] == {"prompt": "p0", "reference": None}
    assert rows[-1] == {"prompt": "last", "reference": "x"}
    _raises(
        InputError,
        _load(path, "data.eval_prompts"),
        f"data.eval_prompts: row 0 of {path} (line 2) has no reference answer",
    )


def test_csv_cells_are_text(tmp_path):
    """A CSV file has no numbers: ``42`` is the text "42" (even in a column of numbers), ``NA`` and ``null`` are
    text, not missing values."""
    path = tmp_path / "p.csv"
    path.write_text("prompt,reference\n42,7\nNA,null\n3.50,None\n")
    assert PromptSource(str(path)).load("data.eval_prompts", require_reference=True) == [
        {"prompt": "42", "reference": "7"},
        {"prompt": "NA", "reference": "null"},
        {"prompt": "3.50", "reference": "None"},
    ]
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,prompt\na,b\n")
    _raises(InputError, _load(twice), f"data.prompts: {twice} has the column 'prompt' twice in its header")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize(("value", "kind"), [(42, "a number"), (4.5, "a number"), (True, "a boolean")])
def test_a_prompt_that_is_not_text_is_named_in_json_lines_and_parquet(tmp_path, fmt, value, kind):
    path, line = _file(tmp_path, fmt, [{"prompt": value, "reference": "x"}])
    for key in ("data.prompts", "data.eval_prompts"):
        _raises(
            InputError,
            _load(path, key),
            f"{key}: row 0 of {path}{line(0)} has 'prompt' = {value!r}, {kind}, not text or a list of chat messages",
        )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_reference_that_is_not_text_is_named(tmp_path, fmt):
    path, line = _file(tmp_path, fmt, [{"prompt": "a", "reference": 1}, {"prompt": "b", "reference": 2}])
    for key in ("data.prompts", "data.eval_prompts"):
        _raises(
            InputError, _load(path, key), f"{key}: row 0 of {path}{line(0)} has 'reference' = 1, a number, not text"
        )


def _chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_chat_roles_are_normalised(tmp_path, fmt):
    convo = _chat(("System", "Be brief."), ("Human", "Hi"), ("GPT", "Hello!"), ("user", "Bye?"))
    other = _chat(("USER", "Hi"), ("bot", "Yo"), (" human ", "?"))
    path, _ = _file(tmp_path, fmt, [{"prompt": convo}, {"prompt": other}])
    rows = PromptSource(str(path)).load("data.prompts")
    assert rows[0]["messages"] == _chat(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye?")
    )
    assert rows[0]["prompt"] == "system: Be brief.\nuser: Hi\nassistant: Hello!\nuser: Bye?"
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "user"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize(
    ("convo", "problem"),
    [
        (
            _chat(("user", "Hi"), ("assistant", "Hello!")),
            "is a conversation that already ends with an assistant turn "
            "(2 messages); a chat prompt ends with the turn the policy answers",
        ),
        (_chat(("system", "Be brief.")), "is a conversation without a user turn (roles: system)"),
        (
            _chat(("assistant", "Hello!"), ("system", "Be brief.")),
            "is a conversation without a user turn (roles: assistant, system)",
        ),
        (
            _chat(("user", "Hi"), ("narrator", "Meanwhile")),
            "has a message with the unknown role 'narrator' (message 2 "
            "of its 'prompt'); known roles: user (or human), assistant (or gpt, bot) and system",
        ),
        (_chat(("user", "Hi"), (None, "?")), "has a message without a 'role' (message 2 of its 'prompt')"),
    ],
)
def test_a_chat_prompt_that_is_not_a_prompt_is_named(tmp_path, fmt, convo, problem):
    path, line = _file(tmp_path, fmt, [{"prompt": _chat(("user", "fine"))}, {"prompt": convo}])
    _raises(InputError, _load(path, reference_field=None), f"data.prompts: row 1 of {path}{line(1)} {problem}")


# -- model folders ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny causal LM and its tokenizer saved as a transformers folder."""
    from bpo_lightning.tasks import reviews

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = reviews.build_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4)
    reviews.build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("given", ["./no-such-model", "../no/such-model", "~/no-such-model-folder", "a/b/c"])
def test_a_policy_folder_that_does_not_exist_is_named(given):
    from bpo_lightning.policy import Pretrained

    shown = os.path.expanduser(given)  # a folder in the home directory is named in full
    _raises(InputError, lambda: Pretrained(given), f"model.policy.init_args.name_or_path: no model folder {shown}")


def test_a_policy_folder_given_by_absolute_path_is_named(tmp_path):
    from bpo_lightning.policy import Pretrained

    path = tmp_path / "gone"
    _raises(InputError, lambda: Pretrained(str(path)), f"model.policy.init_args.name_or_path: no model folder {path},")


def test_a_hub_id_missing_from_the_offline_cache_is_named(monkeypatch):
    from huggingface_hub import constants

    from bpo_lightning.policy import Pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _raises(
        InputError,
        lambda: Pretrained("no-such-org/no-such-model"),
        "model.policy.init_args.name_or_path: no model folder no-such-org/no-such-model",
        "not in the local hub cache",
        "HF_HUB_OFFLINE=1",
    )


def test_a_policy_folder_without_config_or_weights_is_named(tmp_path, tiny_model):
    from bpo_lightning.policy import Pretrained

    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(
        InputError,
        lambda: Pretrained(str(empty)),
        f"model.policy.init_args.name_or_path: the model folder {empty} has no config.json",
    )
    (empty / "config.json").write_text((tiny_model / "config.json").read_text())
    _raises(InputError, lambda: Pretrained(str(empty)), f"the model folder {empty} has no weights", "model.safetensors")


def test_a_policy_tokenizer_folder_that_does_not_exist_is_named(tmp_path, tiny_model):
    from bpo_lightning.policy import Pretrained

    path = tmp_path / "tok"
    _raises(
        InputError,
        lambda: Pretrained(str(tiny_model), tokenizer=str(path)),
        f"model.policy.init_args.tokenizer: no tokenizer folder {path}",
    )


def test_an_inline_config_policy_names_a_missing_tokenizer_folder(tmp_path, tiny_model):
    from bpo_lightning.policy import FromConfig

    path = tmp_path / "tok"
    _raises(
        InputError,
        lambda: FromConfig({"model_type": "gpt2"}, tokenizer=str(path)),
        f"model.policy.init_args.tokenizer: no tokenizer folder {path}",
    )
    assert FromConfig({"model_type": "gpt2"}, tokenizer=str(tiny_model)).tokenizer().eos_token_id is not None


def test_an_existing_policy_folder_still_loads(tiny_model):
    from bpo_lightning.policy import Pretrained

    source = Pretrained(str(tiny_model))
    assert source.tokenizer().eos_token_id is not None
    assert source.model().config.model_type == "gpt2"


def test_a_reward_model_folder_that_does_not_exist_is_named(tmp_path, tiny_model):
    from bpo_lightning import RewardModelAnnotator

    path = tmp_path / "rm"
    _raises(
        InputError,
        lambda: RewardModelAnnotator(str(path), device="cpu"),
        f"data.annotator.init_args.name_or_path: no model folder {path}",
    )
    _raises(InputError, lambda: RewardModelAnnotator("./no/such/rm", device="cpu"), "no model folder ./no/such/rm")
    _raises(
        InputError,
        lambda: RewardModelAnnotator(str(tiny_model), tokenizer=str(path), device="cpu"),
        f"data.annotator.init_args.tokenizer: no tokenizer folder {path}",
    )


# -- the run folder --------------------------------------------------------------------------------------------------
def _phase(tmp_path):
    store = PhaseStore(tmp_path / "data", 0)
    store.check({"phase": 0})
    return store


def test_a_damaged_phase_json_is_named(tmp_path):
    store = _phase(tmp_path)
    store.meta_path.write_text('{"provenance": {"phase": 0},\n "complete": tru')
    for call in (lambda: store.check({"phase": 0}), store.complete):
        _raises(
            RunError,
            call,
            f"trainer.default_root_dir: {store.meta_path} line 2 is damaged",
            "delete",
            "phase_0000.*",
            "to collect phase 1 again",
        )


def test_a_damaged_pairs_line_is_named(tmp_path):
    store = _phase(tmp_path)
    store.meta_path.write_text(json.dumps({"provenance": {}, "complete": True, "stats": {"phase": 0}}))
    store.pairs_path.write_text('{"prompt": "p"}\n{"prompt": \x00\x00\n')
    _raises(RunError, store.load_pairs, f"{store.pairs_path} line 1 is damaged")  # a record without its fields
    store.pairs_path.unlink()
    _raises(RunError, store.load_pairs, f"{store.pairs_path} is damaged (missing")


def test_a_damaged_samples_line_is_named_but_a_torn_last_line_is_skipped(tmp_path):
    store = _phase(tmp_path)
    store.append_samples([sample_row(0), sample_row(1)])
    with store.samples_path.open("a") as f:
        f.write('{"index": 2, "respo')  # a job killed mid-append
    with pytest.warns(UserWarning, match=r"phase_0000.samples.jsonl:3: skipping an incomplete line"):
        assert sorted(store.load_samples()) == [0, 1]
    whole = [json.dumps(sample_row(i).to_json()) for i in (0, 2)]
    store.samples_path.write_text(f'{whole[0]}\n{{"ind\n{whole[1]}\n')
    _raises(RunError, store.load_samples, f"trainer.default_root_dir: {store.samples_path} line 2 is damaged")
    store.samples_path.write_text(f'{whole[0]}\n{{"index": 1}}\n{whole[1]}\n')  # a row without its fields
    _raises(RunError, store.load_samples, f"trainer.default_root_dir: {store.samples_path} line 2 is damaged")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_atomic_write_keeps_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "phase_0000.json"
    atomic_write(path, "old")
    monkeypatch.setattr(os, "replace", _no_space)
    _raises(RunError, lambda: atomic_write(path, "new"), f"trainer.default_root_dir: cannot write {path} (No space")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_full_disk_while_appending_samples_is_named(tmp_path, monkeypatch):
    store = _phase(tmp_path)
    store.append_samples([sample_row(0)])
    full = type(store.samples_path)

    def no_space_left(self, mode="r", *args, **kwargs):  # the file opens, its write fails
        handle = open(self, mode, *args, **kwargs)  # noqa: SIM115
        if "a" in mode:
            handle.write = _no_space
        return handle

    monkeypatch.setattr(full, "open", no_space_left)
    _raises(RunError, lambda: store.append_samples([sample_row(1)]), f"cannot write {store.samples_path} (No space")
    monkeypatch.undo()
    assert store.samples_path.read_text() == json.dumps(sample_row(0).to_json()) + "\n"  # the rows before: intact


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_write_refused_when_a_phase_starts_is_named(tmp_path, monkeypatch, code):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    store = PhaseStore(tmp_path / "data", 0)
    _raises(RunError, lambda: store.check({"phase": 0}), f"cannot write {store.meta_path} ({os.strerror(code)})")
    assert list((tmp_path / "data").iterdir()) == []
    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    other = PhaseStore(tmp_path / "other", 0)
    _raises(RunError, lambda: other.check({"phase": 0}), f"cannot write {tmp_path / 'other'} ({os.strerror(code)})")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to any folder")
def test_an_unwritable_run_folder_is_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        store = PhaseStore(folder, 0)
        _raises(RunError, lambda: store.check({"phase": 0}), f"cannot write {store.meta_path} (Permission denied)")
        sub = PhaseStore(folder / "sub", 0)
        _raises(RunError, lambda: sub.check({"phase": 0}), f"cannot write {folder / 'sub'} (Permission denied)")
    finally:
        folder.chmod(0o700)
