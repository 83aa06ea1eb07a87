"""The paper presets (bpo_lightning.presets) on tiny local fixtures in the hub datasets' schemas."""

import json
from pathlib import Path

import pytest

from bpo_lightning import presets
from bpo_lightning.presets import HarmlessnessPrompts, HelpfulnessPrompts, TLDRPrompts, render_conversation

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
LONG = "word " * 700  # several hundred tokens under any tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from bpo_lightning.tasks.reviews import build_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return str(path)


def tldr(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit} \nTITLE: {title}\nPOST: {post}\nTL;DR: "


@pytest.fixture
def tldr_dir(tmp_path):
    """A folder like the hub dataset: train/valid/test (``valid.jsonl`` becomes the ``validation`` split)."""
    root = tmp_path / "tldr"
    train = [
        {"prompt": tldr("cooking", "Bread", "My loaf is flat."), "label": " flat bread, help"},
        {"prompt": tldr("travel", "Paris", "café ☕ every day " + LONG), "label": " too long"},
        {"prompt": "", "label": " empty prompt"},
        {"prompt": tldr("japan", "東京", "東京でラーメンを食べた。"), "label": " 美味しい"},
        {"prompt": tldr("pets", "Cat", "It sleeps all day."), "label": ""},
        {"prompt": tldr("books", "Novel", "Finished it at 3am."), "label": " great book"},
    ]
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "valid.jsonl", [{"prompt": tldr("dev", "D", "dev post"), "label": " dev label"}])
    write_jsonl(root / "test.jsonl", [{"prompt": tldr("test", "T", "test post"), "label": " test label"}])
    return str(root)


@pytest.fixture
def helpful_file(tmp_path):
    rows = [
        {"instruction": "How do I bake bread?", "demonstration": "Mix flour, water, salt and yeast."},
        {"instruction": "   ", "demonstration": "blank instruction"},
        {"instruction": "Where can I get café ☕ in Kyoto?", "demonstration": "京都駅の近くにカフェがあります。"},
        {"instruction": "Explain " + LONG, "demonstration": "too long instruction"},
        {"instruction": "Tell me a joke.", "demonstration": "Why? " + LONG},
        {"instruction": "What is 2+2?", "demonstration": None},
        {"instruction": "Name a colour.", "demonstration": "Blue."},
    ]
    return str(write_jsonl(tmp_path / "helpful.jsonl", rows))


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.fixture
def harm_dir(tmp_path):
    """A folder with train/test parquet files in the hub schema (``chosen``/``rejected`` message lists)."""
    from datasets import Dataset

    train = [
        [msg("user", "How do I pick a lock?"), msg("assistant", "I can't help with that.")],
        [
            msg("user", "Hi"),
            msg("assistant", "Hello! ☕"),
            msg("user", "日本語で話せますか？"),
            msg("assistant", "はい。"),
        ],
        [msg("user", "Is this unfinished?"), msg("assistant", "Yes."), msg("user", "Really?")],  # ends with user
        [msg("user", LONG), msg("assistant", "Too long a prompt.")],
        [msg("user", ""), msg("assistant", "An empty turn.")],
        [msg("user", "Say something nice."), msg("assistant", "You are doing great.")],
    ]
    test = [[msg("user", f"test question {i}"), msg("assistant", f"test answer {i}")] for i in range(3)]
    root = tmp_path / "harm"
    root.mkdir()
    for name, chosen in (("train", train), ("test", test)):
        Dataset.from_dict({"chosen": chosen, "rejected": chosen}).to_parquet(root / f"{name}.parquet")
    return str(root)


# ---------------------------------------------------------------------------------------------------------------------
# TL;DR
# ---------------------------------------------------------------------------------------------------------------------


def test_tldr_prompt_is_the_dataset_prompt_and_long_prompts_are_filtered(tldr_dir, tokenizer_dir):
    source = TLDRPrompts(tldr_dir, split="sft", tokenizer=tokenizer_dir, dev_split="validation")
    dropped = (
        r"^data.prompts: 3 of 6 rows of .*tldr \(split 'train'\) dropped: 2 with an empty prompt or label "
        r"\(first rows: \[2, 4\]\), 1 prompt longer than 512 tokens$"
    )
    with pytest.warns(UserWarning, match=dropped):
        rows = source.load("data.prompts")
    assert rows == [
        {
            "prompt": "SUBREDDIT: r/cooking \nTITLE: Bread\nPOST: My loaf is flat.\nTL;DR: ",
            "reference": " flat bread, help",
        },
        {"prompt": tldr("japan", "東京", "東京でラーメンを食べた。"), "reference": " 美味しい"},
        {"prompt": tldr("books", "Novel", "Finished it at 3am."), "reference": " great book"},
    ]
    assert source.counts == {"read": 6, "skipped": 2, "too_long": 1, "filtered": 3, "kept": 3}


def test_tldr_without_tokenizer_keeps_long_prompts(tldr_dir):
    with pytest.warns(UserWarning, match=r"2 of 6 rows .* dropped: 2 with an empty prompt or label \(first .*\]\)$"):
        rows = TLDRPrompts(tldr_dir, split="sft").load("data.prompts")
    assert [r["reference"] for r in rows] == [" flat bread, help", " too long", " 美味しい", " great book"]
    assert rows[1]["prompt"].startswith("SUBREDDIT: r/travel \nTITLE: Paris\nPOST: café ☕ every day word word")


def test_tldr_split_boundaries_slice_the_filtered_rows(tldr_dir, tokenizer_dir):
    bounds = {"sft": [0, 2], "sampling": [2, None]}
    kwargs = dict(tokenizer=tokenizer_dir, boundaries=bounds, dev_split="validation")
    # reading stops after the slice's last row
    with pytest.warns(UserWarning, match=r"2 of 4 rows .* dropped: 1 .*\[2\]\), 1 prompt longer"):
        sft = TLDRPrompts(tldr_dir, split="sft", **kwargs).load("data.prompts")
    with pytest.warns(UserWarning, match=r"3 of 6 rows .* dropped: 2 .*\[2, 4\]\), 1 prompt longer"):
        sampling = TLDRPrompts(tldr_dir, split="sampling", **kwargs).load("data.prompts")
    assert [r["reference"] for r in sft] == [" flat bread, help", " 美味しい"]
    assert [r["reference"] for r in sampling] == [" great book"]
    dev = TLDRPrompts(tldr_dir, split="dev", **kwargs).load("data.eval_prompts", require_reference=True)
    test = TLDRPrompts(tldr_dir, split="test", **kwargs).load("data.eval_prompts", require_reference=True)
    assert dev == [{"prompt": tldr("dev", "D", "dev post"), "reference": " dev label"}]
    assert test == [{"prompt": tldr("test", "T", "test post"), "reference": " test label"}]


def test_tldr_paper_constants_leave_the_sampling_split_of_a_small_source_empty(tldr_dir, tokenizer_dir):
    assert presets.TLDR_SPLITS["sft"] == ("train", 0, 65_215)
    assert presets.TLDR_SPLITS["sampling"] == ("train", 65_215, None)
    assert presets.TLDR_SPLITS["dev"] == ("dev", 0, 1_000)
    source = TLDRPrompts(tldr_dir, split="sampling", tokenizer=tokenizer_dir)
    message = r"data.prompts: .* no usable prompts for split 'sampling' .*\[65215, end\)"
    with pytest.warns(UserWarning, match="3 of 6 rows"), pytest.raises(ValueError, match=message):
        source.load("data.prompts")


def test_tldr_limit_and_default_hub_source(tldr_dir):
    source = TLDRPrompts(tldr_dir, split="sft", limit=2)
    rows = source.load("data.prompts")  # stops reading after 2 rows: the empty third row is never reached (no warning)
    assert [r["reference"] for r in rows] == [" flat bread, help", " too long"]
    assert source.counts["read"] == 2
    hub = TLDRPrompts(split="dev")
    assert (hub.path, hub.split) == ("CarperAI/openai_summarize_tldr", "valid")
    assert HarmlessnessPrompts(split="dev").split == "test"


# ---------------------------------------------------------------------------------------------------------------------
# Helpfulness
# ---------------------------------------------------------------------------------------------------------------------


def test_helpfulness_format_and_filters(helpful_file, tokenizer_dir):
    source = HelpfulnessPrompts(helpful_file, split="sft", tokenizer=tokenizer_dir)
    dropped = (
        r"^data.prompts: 4 of 7 rows of .*helpful.jsonl dropped: 2 with an empty instruction or demonstration "
        r"\(first rows: \[1, 5\]\), 1 instruction longer than 64 tokens, "
        r"1 demonstration longer than 128 tokens$"
    )
    with pytest.warns(UserWarning, match=dropped):
        rows = source.load("data.prompts")
    assert rows == [
        {"prompt": "How do I bake bread? Assistant: ", "reference": "Mix flour, water, salt and yeast."},
        {"prompt": "Where can I get café ☕ in Kyoto? Assistant: ", "reference": "京都駅の近くにカフェがあります。"},
        {"prompt": "Name a colour. Assistant: ", "reference": "Blue."},
    ]
    assert source.counts["too_long"] == 2  # the long instruction and the long demonstration


def test_helpfulness_boundaries_and_limit(helpful_file, tokenizer_dir):
    bounds = {"sft": [0, 1], "sampling": [1, 2], "dev": [2, 3], "test": [3, 4]}

    def source(split):
        return HelpfulnessPrompts(helpful_file, split=split, tokenizer=tokenizer_dir, boundaries=bounds)

    sft = source("sft")
    assert sft.load("data.prompts") == [
        {"prompt": "How do I bake bread? Assistant: ", "reference": "Mix flour, water, salt and yeast."}
    ]
    assert sft.counts == {"read": 1, "skipped": 0, "too_long": 0, "filtered": 1, "kept": 1}
    with pytest.warns(UserWarning, match=r"1 of 3 rows .* dropped: 1 .*\[1\]\)$"):
        assert [r["prompt"] for r in source("sampling").load("data.prompts")] == [
            "Where can I get café ☕ in Kyoto? Assistant: "
        ]
    with pytest.warns(UserWarning, match=r"4 of 7 rows .* dropped: 2 .*\[1, 5\]"):
        assert [r["prompt"] for r in source("dev").load("data.prompts")] == ["Name a colour. Assistant: "]
    # only 3 rows pass the filters: the test slice [3, 4) is empty
    with pytest.warns(UserWarning, match="4 of 7 rows"), pytest.raises(ValueError, match=r"split 'test'"):
        source("test").load("data.eval_prompts")
    assert presets.HELPFULNESS_SPLITS == {
        "sft": ("train", 0, 10_000),
        "sampling": ("train", 10_000, 20_000),
        "dev": ("train", 20_000, 20_500),
        "test": ("train", 20_500, 21_000),
    }
    with pytest.warns(UserWarning, match=r"1 of 3 rows .* dropped: 1 with an empty instruction"):
        limited = HelpfulnessPrompts(helpful_file, split="sft", limit=2).load("data.prompts")
    assert [r["reference"] for r in limited] == [
        "Mix flour, water, salt and yeast.",
        "京都駅の近くにカフェがあります。",
    ]
    assert limited_counts(HelpfulnessPrompts(helpful_file, split="sft", limit=1)) == {
        "read": 1,
        "skipped": 0,
        "too_long": 0,
        "filtered": 1,
        "kept": 1,
    }


def limited_counts(source) -> dict:
    source.load("data.prompts")
    return source.counts


def test_helpfulness_missing_column_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "hi", "reference": "there"}])
    with pytest.raises(ValueError, match=r"data.prompts.init_args.path: columns \['instruction', 'demonstration'\]"):
        HelpfulnessPrompts(str(path), split="sft").load("data.prompts")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        HelpfulnessPrompts(split="train")
    with pytest.raises(ValueError, match="unknown splits"):
        HelpfulnessPrompts(split="sft", boundaries={"validation": [0, 1]})
    with pytest.raises(ValueError, match="invalid slice"):
        TLDRPrompts(split="sft", boundaries={"sft": [5, 2]})


# ---------------------------------------------------------------------------------------------------------------------
# Harmlessness
# ---------------------------------------------------------------------------------------------------------------------


def test_render_conversation():
    convo = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "How are you?"), msg("assistant", "Fine.")]
    assert render_conversation(convo) == ("user: Hi assistant: Hello! user: How are you? assistant: ", "Fine.")
    assert render_conversation(convo[:2]) == ("user: Hi assistant: ", "Hello!")
    with pytest.raises(ValueError, match="not an assistant turn"):
        render_conversation(convo[:3])
    with pytest.raises(ValueError, match="at least two"):
        render_conversation(convo[:1])


def test_harmlessness_renders_chosen_conversations_and_filters(harm_dir, tokenizer_dir):
    source = HarmlessnessPrompts(harm_dir, split="sft", tokenizer=tokenizer_dir)
    dropped = (
        r"^data.prompts: 3 of 6 rows of .* \(split 'train'\) dropped: 2 with an empty or malformed "
        r"conversation .*\(first rows: \[2, 4\]\), 1 prompt longer than 256 tokens$"
    )
    with pytest.warns(UserWarning, match=dropped):
        rows = source.load("data.prompts")
    assert rows == [
        {"prompt": "user: How do I pick a lock? assistant: ", "reference": "I can't help with that."},
        {"prompt": "user: Hi assistant: Hello! ☕ user: 日本語で話せますか？ assistant: ", "reference": "はい。"},
        {"prompt": "user: Say something nice. assistant: ", "reference": "You are doing great."},
    ]
    assert source.counts == {"read": 6, "skipped": 2, "too_long": 1, "filtered": 3, "kept": 3}


def test_harmlessness_splits(harm_dir, tokenizer_dir):
    bounds = {"sft": [0, 2], "sampling": [2, 4], "dev": [0, 1], "test": [1, 3]}
    kwargs = dict(tokenizer=tokenizer_dir, boundaries=bounds)
    with pytest.warns(UserWarning, match="3 of 6 rows"):
        sampling = HarmlessnessPrompts(harm_dir, split="sampling", **kwargs).load("data.prompts")
    assert [r["reference"] for r in sampling] == ["You are doing great."]
    dev = HarmlessnessPrompts(harm_dir, split="dev", **kwargs).load("data.eval_prompts")
    test = HarmlessnessPrompts(harm_dir, split="test", **kwargs).load("data.eval_prompts")
    assert [r["prompt"] for r in dev] == ["user: test question 0 assistant: "]
    assert [r["reference"] for r in test] == ["test answer 1", "test answer 2"]
    assert presets.HARMLESSNESS_SPLITS["dev"] == ("test", 0, 500)
    assert presets.HARMLESSNESS_SPLITS["test"] == ("test", 500, 1_000)
    # the source split names are arguments: a folder whose files are named like the hub's
    renamed = HarmlessnessPrompts(harm_dir, split="dev", test_split="test_prefs")
    assert renamed.split == "test_prefs"


# ---------------------------------------------------------------------------------------------------------------------
# One file in any format: dropped rows, values that are not text, splits that share rows
# ---------------------------------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> str:
    """``rows`` as JSON lines, CSV (a null value is an empty cell) or parquet, by ``path``'s suffix."""
    if path.suffix == ".jsonl":
        return str(write_jsonl(path, rows))
    if path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
        return str(path)
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(path)
    return str(path)


def warned(call) -> tuple[object, list[str]]:
    """``call()``'s result and the messages of the warnings it gave."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


def one_warning(call, match: str):
    """``call()``'s result; it warns exactly once, with a message that matches ``match``."""
    import re

    result, messages = warned(call)
    assert len(messages) == 1 and re.search(match, messages[0]), messages
    return result


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_dropped_rows_are_counted_in_one_warning_in_every_format(helpful_file, tmp_path, tokenizer_dir, suffix):
    rows = [json.loads(line) for line in Path(helpful_file).read_text(encoding="utf-8").splitlines()]
    path = write_rows(tmp_path / f"helpful{suffix}", rows)
    source = HelpfulnessPrompts(path, split="sft", tokenizer=tokenizer_dir)
    loaded = one_warning(
        lambda: source.load("data.prompts"),
        rf"^data.prompts: 4 of 7 rows of {path} dropped: 2 with "
        r"an empty instruction or demonstration \(first rows: \[1, 5\]\), 1 instruction longer than "
        r"64 tokens, 1 demonstration longer than 128 tokens$",
    )
    assert [r["reference"] for r in loaded] == [
        "Mix flour, water, salt and yeast.",
        "京都駅の近くにカフェがあります。",
        "Blue.",
    ]
    assert source.counts == {"read": 7, "skipped": 2, "too_long": 2, "filtered": 3, "kept": 3}


def test_rows_over_the_length_limits_alone_are_counted_with_thousands_separators(tmp_path, tokenizer_dir):
    rows = [{"instruction": f"question {i}?", "demonstration": f"answer {i}."} for i in range(1_200)]
    for i in range(0, 1_200, 100):  # 12 rows over a limit: 10 instructions, 2 demonstrations
        rows[i] = dict(instruction=LONG, demonstration="x") if i < 1_000 else dict(instruction="q", demonstration=LONG)
    path = write_rows(tmp_path / "helpful.parquet", rows)
    source = HelpfulnessPrompts(path, split="sft", tokenizer=tokenizer_dir, boundaries={"sft": [0, None]})
    one_warning(
        lambda: source.load("data.prompts"),
        r"^data.prompts: 12 of 1,200 rows of .* dropped: 10 instructions "
        "longer than 64 tokens, 2 demonstrations longer than 128 tokens$",
    )
    assert source.counts == {"read": 1_200, "skipped": 0, "too_long": 12, "filtered": 1_188, "kept": 1_188}
    both = write_rows(tmp_path / "both.jsonl", [{"instruction": LONG, "demonstration": LONG}, rows[1]])
    one_warning(
        lambda: HelpfulnessPrompts(both, split="sft", tokenizer=tokenizer_dir).load("data.prompts"),
        r"1 of 2 rows .* dropped: 1 instruction longer than 64 tokens$",
    )  # a row is counted once


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_preset_value_that_is_not_text_is_named(tmp_path, suffix):
    rows = [{"instruction": "   ", "demonstration": 3}, {"instruction": "What is 2+2?", "demonstration": 4}]
    path = write_rows(tmp_path / f"helpful{suffix}", rows)  # a column of numbers (one kind per column)
    line = " (line 2)" if suffix == ".jsonl" else ""
    with pytest.raises(ValueError) as info:
        HelpfulnessPrompts(path, split="sft").load("data.prompts")
    assert str(info.value) == f"data.prompts: row 1 of {path}{line} has 'demonstration' = 4, a number, not text"


def test_preset_csv_cells_are_text(tmp_path):
    path = tmp_path / "helpful.csv"
    path.write_text("instruction,demonstration\nWhat is 2+2?,4\nAnd 3+3?,6\n")
    rows = HelpfulnessPrompts(str(path), split="sft").load("data.prompts")
    assert rows == [
        {"prompt": "What is 2+2? Assistant: ", "reference": "4"},
        {"prompt": "And 3+3? Assistant: ", "reference": "6"},
    ]


def test_harmlessness_text_conversations_are_named(tmp_path):
    """Anthropic/hh-rlhf holds each conversation as one text, hh-rlhf-h4 as a list of messages."""
    path = write_rows(tmp_path / "hh.parquet", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello"}])
    with pytest.raises(
        ValueError,
        match=rf"^data.prompts: row 0 of {path} has 'chosen' = '.*', text, not a list of "
        "chat messages$",
    ):
        HarmlessnessPrompts(path, split="sft").load("data.prompts")


def test_splits_that_share_the_rows_of_one_file_are_named(helpful_file, tmp_path):
    bounds = {"sft": [3, None], "dev": [0, 2], "test": [1, 3]}  # dev and test share filtered row 1

    def load(split, key="data.eval_prompts"):
        return HelpfulnessPrompts(helpful_file, split=split, boundaries=bounds).load(key)

    dev, messages = warned(lambda: load("dev"))
    assert messages == [
        f"data.eval_prompts: 1 of 3 rows of {helpful_file} dropped: 1 with an empty instruction or demonstration "
        "(first rows: [1])",
        f"data.eval_prompts: HelpfulnessPrompts split 'dev' (filtered rows [0, 2)) shares rows with split 'test' "
        f"(1 row: filtered rows [1, 2)) of the one file {helpful_file}; give each split its own rows with "
        "`boundaries` or a folder with one file per source split",
    ]
    test, messages = warned(lambda: load("test", "data.test_prompts"))
    assert [m for m in messages if "shares rows" in m] == [
        f"data.test_prompts: HelpfulnessPrompts split 'test' (filtered rows [1, 3)) shares rows with split 'dev' "
        f"(1 row: filtered rows [1, 2)) of the one file {helpful_file}; give each split its own rows with "
        "`boundaries` or a folder with one file per source split",
    ]
    assert dev[1] == test[0]
    _, messages = warned(lambda: load("sft", "data.prompts"))  # [3, end) shares nothing
    assert len(messages) == 1 and "shares rows" not in messages[0]


def test_tldr_from_one_file_shares_its_first_rows_between_splits(tmp_path):
    """One TL;DR file is every source split: sft [0, 65215), dev [0, 1000) and test [0, 1000) are its first rows."""
    rows = [{"prompt": tldr("s", f"t{i}", f"post {i}"), "label": f" {i}"} for i in range(3)]
    path = write_rows(tmp_path / "tldr.csv", rows)
    dev = one_warning(
        lambda: TLDRPrompts(path, split="dev").load("data.eval_prompts"),
        r"^data.eval_prompts: TLDRPrompts split 'dev' \(filtered rows \[0, 3\)\) shares rows with "
        r"split 'sft' \(3 rows: filtered rows \[0, 3\)\) and split 'test' \(3 rows",
    )
    assert len(dev) == 3
    bounds = {"sft": [0, 1], "sampling": [1, 2], "dev": [2, 3], "test": [3, None]}
    dev, messages = warned(lambda: TLDRPrompts(path, split="dev", boundaries=bounds).load("data.eval_prompts"))
    assert len(dev) == 1 and messages == []


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["TLDRPrompts", "HelpfulnessPrompts", "HarmlessnessPrompts"])
def test_presets_are_cli_prompt_sources(preset, helpful_file, monkeypatch, capsys):
    from bpo_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["bpo"])
    args = [
        "fit",
        "--config",
        QUICKSTART,
        f"--data.prompts=bpo_lightning.presets.{preset}",
        f"--data.prompts.path={helpful_file}",
        "--data.prompts.split=dev",
        "--data.prompts.limit=5",
        '--data.prompts.boundaries={"dev": [0, 2], "sampling": [2, null]}',
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"class_path: bpo_lightning.presets.{preset}" in out
    assert f"path: {helpful_file}" in out and "split: dev" in out and "limit: 5" in out
    assert "      dev:\n        - 0\n        - 2\n" in out


def test_cli_rejects_an_unknown_paper_split(helpful_file, monkeypatch, capsys):
    from bpo_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["bpo"])
    args = [
        "fit",
        "--config",
        QUICKSTART,
        "--data.prompts=bpo_lightning.presets.HelpfulnessPrompts",
        f"--data.prompts.path={helpful_file}",
        "--data.prompts.split=train",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    assert "split" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The paper configs on the paper's splits
# ---------------------------------------------------------------------------------------------------------------------

PAPER_TASKS = {  # task: (source rows in the hub schema, paper split sizes sft / sampling pool / dev / test)
    "tldr": (TLDRPrompts, {"sft": 65_215, "prompts": 10_000, "eval_prompts": 1_000, "test_prompts": 1_000}),
    "hh": (HelpfulnessPrompts, {"sft": 10_000, "prompts": 10_000, "eval_prompts": 500, "test_prompts": 500}),
    "harm": (HarmlessnessPrompts, {"sft": 10_000, "prompts": 10_000, "eval_prompts": 500, "test_prompts": 500}),
}


def _hub_copy(task: str, root: Path) -> str:
    """A local folder in the hub dataset's schema with as many rows as the paper's splits use (+ spare rows), every
    prompt distinct: short enough that the length filters keep them all."""
    from datasets import Dataset

    if task == "tldr":
        for name, n in (("train", 76_000), ("valid", 1_100), ("test", 1_100)):
            write_jsonl(
                root / f"{name}.jsonl",
                [{"prompt": tldr("s", f"{name} {i}", f"post {i}"), "label": f" {i}"} for i in range(n)],
            )
    elif task == "hh":
        write_jsonl(
            root / "train.jsonl",
            [{"instruction": f"question {i}?", "demonstration": f"answer {i}."} for i in range(21_500)],
        )
    else:
        root.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", 20_500), ("test", 1_100)):
            chosen = [[msg("user", f"{name} question {i}"), msg("assistant", f"answer {i}")] for i in range(n)]
            Dataset.from_dict({"chosen": chosen, "rejected": chosen}).to_parquet(root / f"{name}.parquet")
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(PAPER_TASKS))
def test_paper_configs_read_the_papers_splits(task, tmp_path, tokenizer_dir):
    """Each of the task's three configs (DPO, IPO, SLiC) reads its pool, dev and test prompts through the task's
    preset; on a local copy in the hub schema the splits have the paper's sizes and share no prompt, and the pool
    shares none with the SFT rows."""
    import yaml

    preset, sizes = PAPER_TASKS[task]
    configs = sorted((ROOT / "configs" / "paper").glob(f"{task}_*.yaml"))
    assert len(configs) == 3
    data = [yaml.safe_load(c.read_text())["data"] for c in configs]
    sources = {k: data[0][k] for k in ("prompts", "eval_prompts", "test_prompts")}
    assert all({k: d[k] for k in sources} == sources for d in data)  # the same data in all three
    path = _hub_copy(task, tmp_path / task)
    rows = {}
    for key, spec in sources.items():
        assert spec["class_path"] == f"bpo_lightning.presets.{preset.__name__}"
        args = {**spec["init_args"], "path": path, "tokenizer": tokenizer_dir}  # local copies of hub inputs
        if task == "tldr" and "dev_split" not in args:
            args["dev_split"] = "validation"  # a local valid.jsonl is the `validation` split
        rows[key] = [r["prompt"] for r in preset(**args).load(f"data.{key}", require_reference=True)]
        if key == "prompts":
            rows["sft"] = [r["prompt"] for r in preset(**{**args, "split": "sft", "limit": None}).load("sft")]
    assert {k: len(v) for k, v in rows.items()} == sizes
    assert all(d["budget"] <= len(rows["prompts"]) for d in data)
    for a in rows:
        for b in rows:
            if a < b:
                assert not set(rows[a]) & set(rows[b]), (a, b)
