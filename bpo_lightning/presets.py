"""Prompt sources with the BPO paper's prompt formats, length filters and splits.

Three presets, each a :class:`~bpo_lightning.prompts.PromptSource` usable as ``data.prompts`` / ``data.eval_prompts``:

* :class:`TLDRPrompts`: Reddit TL;DR summarization (``CarperAI/openai_summarize_tldr``).
* :class:`HelpfulnessPrompts`: Anthropic Helpfulness (``HuggingFaceH4/helpful-anthropic-raw``).
* :class:`HarmlessnessPrompts`: Anthropic Harmlessness, ``chosen`` conversations (``HuggingFaceH4/hh-rlhf-h4``).

``split`` selects one of the paper's splits: ``sft`` (supervised fine-tuning of the starting policy), ``sampling``
(the online prompt pool), ``dev`` and ``test``. A paper split is a slice ``[start, stop)`` of the *filtered* rows of
one source split, where the filtered rows are the well-formed rows that pass the length filter, in source order. The
slices are the module constants (``TLDR_SPLITS``, ``HELPFULNESS_SPLITS``, ``HARMLESSNESS_SPLITS``); a source with
fewer rows simply gives a shorter (possibly empty) split, and ``boundaries`` overrides the slices, e.g.
``{"sft": [0, 2], "sampling": [2, null]}`` for a small file. A ``[start, null]`` slice runs to the end.

``path`` defaults to the hub dataset; a local file (``.jsonl``/``.json``/``.parquet``/``.csv``, read as the one split
the chosen paper split comes from) or a folder that ``datasets.load_dataset`` reads (e.g. ``train.jsonl`` and
``test.jsonl``) with the same columns work too. The source split names are arguments, because a folder's split names
follow the ``datasets`` file-name conventions (a ``valid.jsonl`` file becomes the ``validation`` split).

Length filters count tokens of ``tokenizer`` (a name or path for ``AutoTokenizer``) without special tokens. Without a
tokenizer nothing is filtered by length, so the splits then differ from the paper's.

Rows with an empty prompt or reference (missing, null or blank), or a conversation that does not end with an assistant
turn, are skipped; rows over a length limit are filtered out. Neither counts towards the split boundaries, and each
load that drops rows says so in one warning with the counts, e.g. ``data.prompts: 12 of 1,000 rows of ... dropped: 2
with an empty instruction or demonstration (first rows: [3, 17]), 10 instructions longer than 64 tokens`` (a row over
several limits is counted once, under the first). A value that is not text (e.g. a number in a parquet column) is an
:class:`~bpo_lightning.errors.InputError` naming the row, as in :class:`~bpo_lightning.prompts.PromptSource`.

Paper splits that read the same rows share them: with one local file every paper split reads that file (e.g. TL;DR
``sft`` ``[0, 65215)`` and ``dev`` ``[0, 1000)`` are then the same first rows), and ``boundaries`` may overlap. A load
whose rows fall in another paper split's slice of the same file (or source split) warns once, naming the config key
and the splits; the paper's slices of the hub datasets never overlap.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from bpo_lightning.errors import InputError, one_line
from bpo_lightning.prompts import _FILE_BUILDERS, PromptSource, _kind, _line_of, _row_name, _short

PaperSplit = Literal["sft", "sampling", "dev", "test"]
PAPER_SPLITS: tuple[str, ...] = ("sft", "sampling", "dev", "test")

# (source split role, start, stop) of each paper split, over the filtered rows; stop None = to the end.
TLDR_SFT_SIZE = 65_215
TLDR_EVAL_SIZE = 1_000
TLDR_SPLITS: dict[str, tuple[str, int, int | None]] = {
    "sft": ("train", 0, TLDR_SFT_SIZE),
    "sampling": ("train", TLDR_SFT_SIZE, None),
    "dev": ("dev", 0, TLDR_EVAL_SIZE),
    "test": ("test", 0, TLDR_EVAL_SIZE),
}
HELPFULNESS_SPLITS: dict[str, tuple[str, int, int | None]] = {
    "sft": ("train", 0, 10_000),
    "sampling": ("train", 10_000, 20_000),
    "dev": ("train", 20_000, 20_500),
    "test": ("train", 20_500, 21_000),
}
HARMLESSNESS_SPLITS: dict[str, tuple[str, int, int | None]] = {
    "sft": ("train", 0, 10_000),
    "sampling": ("train", 10_000, 20_000),
    "dev": ("test", 0, 500),
    "test": ("test", 500, 1_000),
}

TLDR_MAX_PROMPT_TOKENS = 512
HELPFULNESS_MAX_INSTRUCTION_TOKENS = 64
HELPFULNESS_MAX_DEMONSTRATION_TOKENS = 128
HARMLESSNESS_MAX_PROMPT_TOKENS = 256
HARMLESSNESS_MAX_LABEL_TOKENS = 128

_CHUNK = 1_000  # rows tokenized per call


class _Skip(Exception):
    """A malformed row: skipped and counted in the warning."""


class _NotText(Exception):
    """A value of the wrong kind (a number where text belongs): an ``InputError`` naming the row."""

    def __init__(self, column: str, value, expected: str = "text") -> None:
        super().__init__(column)
        self.column, self.value, self.expected = column, value, expected


def _bounds(split: str, bounds) -> tuple[int, int | None]:
    bounds = list(bounds) if isinstance(bounds, (list, tuple)) else [bounds]
    if len(bounds) != 2 or not isinstance(bounds[0], int) or not isinstance(bounds[1], (int, type(None))):
        raise InputError(f"boundaries[{split!r}] must be [start, stop] (stop may be null), got {bounds}")
    return bounds[0], bounds[1]


class _PaperPreset(PromptSource):
    """Shared loading: parse rows, filter by token length, slice the paper split (see the module docstring)."""

    hub_path: str
    columns: tuple[str, ...]
    splits: Mapping[str, tuple[str, int, int | None]]
    length_fields: tuple[str, ...]  # what each length limit measures, in the warning ("prompt", ...)
    skip_reason: str  # why a row is skipped, in the warning

    def __init__(
        self,
        path: str | None,
        split: str,
        source_splits: Mapping[str, str],
        limit: int | None,
        tokenizer: str | None,
        boundaries: Mapping[str, Sequence[int | None]] | None,
    ) -> None:
        if split not in PAPER_SPLITS:
            raise InputError(f"split must be one of {list(PAPER_SPLITS)}, got {split!r}")
        role, start, stop = self.splits[split]
        if boundaries is not None:
            unknown = sorted(set(boundaries) - set(PAPER_SPLITS))
            if unknown:
                raise InputError(f"boundaries: unknown splits {unknown} (known: {list(PAPER_SPLITS)})")
            given = {name: _bounds(name, bounds) for name, bounds in boundaries.items()}
            if split in given:
                start, stop = given[split]
        if start < 0 or (stop is not None and stop < start):
            raise InputError(f"split {split!r}: invalid slice [{start}, {stop})")
        if limit is not None and limit < 0:
            raise InputError(f"limit must be >= 0, got {limit}")
        super().__init__(path or self.hub_path, split=source_splits[role], prompt_field=self.columns[0], limit=limit)
        self.paper_split, self.start, self.stop = split, start, stop
        self.source_splits = dict(source_splits)
        self.tokenizer = tokenizer
        self.boundaries = None if boundaries is None else {k: list(v) for k, v in boundaries.items()}
        self.counts: dict[str, int] = {}  # of the last load(): rows read, skipped, too_long, filtered, kept

    # -- per preset -------------------------------------------------------------------------------------------------
    def _parse(self, row: dict) -> tuple[str, str, Sequence[tuple[str, int]]]:
        """``(prompt, reference, [(text, max_tokens), ...])`` of a row (one pair per :attr:`length_fields`); raise
        :class:`_Skip` if it is empty or malformed, :class:`_NotText` if a value is of the wrong kind."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------------
    @property
    def _one_file(self) -> bool:
        return Path(self.path).suffix.lower() in _FILE_BUILDERS  # every paper split reads this one file

    def _where(self) -> str:
        if self._one_file:  # a file is one split
            return self.path
        return f"{self.path} (split {self.split!r})"

    def _row(self, index: int) -> str:
        """``row 3 of <file> (line 5)``, or ``row 3 of <dataset> (split 'train')``."""
        line = _line_of(Path(self.path).expanduser(), self._builder, index) if self._builder else None
        return _row_name(index, line, self._where())

    def _slice(self, split: str) -> tuple[int, int | None]:
        """``[start, stop)`` of a paper split over the filtered rows: ``boundaries`` or the paper's slice."""
        if self.boundaries is not None and split in self.boundaries:
            return _bounds(split, self.boundaries[split])
        return self.splits[split][1], self.splits[split][2]

    def _shared(self, kept: int) -> list[tuple[str, int, int]]:
        """``(split, start, stop)``: the filtered rows ``[start, stop)`` of this load that another paper split reads
        too (the same file, or the same source split, and overlapping slices)."""
        mine, shared = self.source_splits[self.splits[self.paper_split][0]], []
        for other in PAPER_SPLITS:
            if other == self.paper_split:
                continue
            if not self._one_file and self.source_splits[self.splits[other][0]] != mine:
                continue
            start, stop = self._slice(other)
            first, last = max(self.start, start), self.start + kept if stop is None else min(self.start + kept, stop)
            if first < last:
                shared.append((other, first, last))
        return shared

    def _check_columns(self, ds, key: str) -> None:
        columns = list(ds.column_names)
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise InputError(
                f"{key}.init_args.path: columns {missing} not found in {self._where()} (columns: {columns}); "
                f"{type(self).__name__} expects the columns {list(self.columns)}"
            )

    def _load_tokenizer(self, key: str):
        if self.tokenizer is None:
            return None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        except (OSError, ValueError) as err:
            raise InputError(
                f"{key}.init_args.tokenizer: cannot load tokenizer {self.tokenizer!r}: {one_line(err)}"
            ) from None
        tokenizer.model_max_length = sys.maxsize  # only counting: no "longer than the maximum length" advice
        return tokenizer

    def load(self, key: str, require_reference: bool = False) -> list[dict]:  # noqa: C901 (one pass, one message per case)
        """Rows ``{"prompt", "reference"}`` of the paper split; every row has a reference.

        Args:
            key: the config key of this source, named in errors (e.g. ``data.prompts``).
            require_reference: accepted for the interface; preset rows always have a reference.
        """
        ds = self.dataset(key)
        self._check_columns(ds, key)
        tokenizer = self._load_tokenizer(key)
        stop = self.stop if self.limit is None else self.start + self.limit
        if self.stop is not None:
            stop = min(stop, self.stop)
        rows: list[dict] = []
        skipped: list[int] = []  # source row indices
        too_long: list[tuple[int, int, int]] = []  # (source row index, length field, its limit)
        position = 0  # index among the filtered rows
        end = 0  # source rows consumed: reading stops at the end of the slice
        done = stop is not None and stop <= self.start
        for offset in range(0, 0 if done else len(ds), _CHUNK):
            chunk = ds.select(range(offset, min(offset + _CHUNK, len(ds))))
            parsed = []
            for j, row in enumerate(chunk):
                try:
                    parsed.append((offset + j, *self._parse(row)))
                except _Skip:
                    skipped.append(offset + j)
                except _NotText as err:
                    raise InputError(
                        f"{key}: {self._row(offset + j)} has {err.column!r} = {_short(err.value)}, "
                        f"{_kind(err.value)}, not {err.expected}"
                    ) from None
            over = self._too_long(tokenizer, parsed) if tokenizer is not None and parsed else [None] * len(parsed)
            end = offset + len(chunk)
            for (index, prompt, reference, lengths), field in zip(parsed, over, strict=True):
                if field is not None:
                    too_long.append((index, field, lengths[field][1]))
                    continue
                if position >= self.start:
                    rows.append({"prompt": prompt, "reference": reference})
                position += 1
                if stop is not None and position >= stop:
                    done, end = True, index + 1
                    break
            if done:
                break
        skipped = [i for i in skipped if i < end]
        too_long = [t for t in too_long if t[0] < end]
        self.counts = {
            "read": end,
            "skipped": len(skipped),
            "too_long": len(too_long),
            "filtered": position,
            "kept": len(rows),
        }
        if skipped or too_long:
            warnings.warn(self._dropped(key, end, skipped, too_long), stacklevel=2)
        shared = self._shared(len(rows))
        if shared:
            warnings.warn(self._overlap(key, len(rows), shared), stacklevel=2)
        if not rows:
            bounds = f"[{self.start}, {'end' if self.stop is None else self.stop})"
            raise InputError(
                f"{key}: {self._where()} has no usable prompts for split {self.paper_split!r} "
                f"(filtered rows {bounds}; {position} filtered rows read)"
            )
        return rows

    def _dropped(self, key: str, read: int, skipped: list[int], too_long: list[tuple[int, int, int]]) -> str:
        """``data.prompts: 12 of 1,000 rows of <file> dropped: 2 with ..., 10 prompts longer than 512 tokens``."""
        parts = [f"{len(skipped):,} {self.skip_reason} (first rows: {skipped[:5]})"] if skipped else []
        for field, name in enumerate(self.length_fields):
            limits = [limit for _, f, limit in too_long if f == field]
            if limits:
                noun = name if len(limits) == 1 else f"{name}s"
                parts.append(f"{len(limits):,} {noun} longer than {limits[0]:,} tokens")
        dropped = len(skipped) + len(too_long)
        return f"{key}: {dropped:,} of {read:,} rows of {self._where()} dropped: {', '.join(parts)}"

    def _overlap(self, key: str, kept: int, shared: list[tuple[str, int, int]]) -> str:
        """``data.prompts: HelpfulnessPrompts split 'dev' shares rows with split 'test' ...``."""
        others = " and ".join(
            f"split {other!r} ({last - first:,} {'row' if last - first == 1 else 'rows'}: filtered rows "
            f"[{first:,}, {last:,}))"
            for other, first, last in shared
        )
        source = f"the one file {self.path}" if self._one_file else self._where()
        return (
            f"{key}: {type(self).__name__} split {self.paper_split!r} (filtered rows [{self.start:,}, "
            f"{self.start + kept:,})) shares rows with {others} of {source}; give each split its own rows with "
            "`boundaries`" + (" or a folder with one file per source split" if self._one_file else "")
        )

    @staticmethod
    def _too_long(tokenizer, parsed: list[tuple[int, str, str, Sequence[tuple[str, int]]]]) -> list[int | None]:
        """Per parsed row, the first length field over its limit; None when the row fits."""
        over: list[int | None] = [None] * len(parsed)
        for field in range(len(parsed[0][3])):
            texts = [p[3][field][0] for p in parsed]
            lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            for i, p in enumerate(parsed):
                if over[i] is None and lengths[i] > p[3][field][1]:
                    over[i] = field
        return over


def _text(row: dict, column: str) -> str:
    """The text of ``row[column]``: :class:`_Skip` when empty (missing, null, blank), :class:`_NotText` when it is not
    text (a number, a list, ...)."""
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Skip
    if not isinstance(value, str):
        raise _NotText(column, value)
    return value


class TLDRPrompts(_PaperPreset):
    """Reddit TL;DR summarization as in the BPO paper: ``CarperAI/openai_summarize_tldr``.

    The prompt is the ``prompt`` column as it is (``"SUBREDDIT: r/... \\nTITLE: ...\\nPOST: ...\\nTL;DR: "``), the
    reference the ``label`` column. Rows are kept when the prompt has at most ``max_prompt_tokens`` tokens; of the
    filtered ``train`` rows the first 65,215 are ``sft`` and the rest ``sampling``; ``dev`` and ``test`` are the first
    1,000 filtered rows of the ``valid`` and ``test`` splits (:data:`TLDR_SPLITS`).

    Args:
        path: hub dataset (default) or a local file/folder with the columns ``prompt`` and ``label``.
        split: the paper split: ``sft``, ``sampling``, ``dev`` or ``test``.
        limit: read at most this many rows of the paper split.
        tokenizer: tokenizer name or path that counts prompt tokens; None skips the length filter (the splits then
            differ from the paper's).
        max_prompt_tokens: longest prompt kept, in tokens.
        boundaries: per paper split ``[start, stop]`` over the filtered rows, replacing :data:`TLDR_SPLITS`.
        train_split: source split of ``sft`` and ``sampling``.
        dev_split: source split of ``dev`` (``validation`` for a local folder with ``valid.jsonl``).
        test_split: source split of ``test``.
    """

    hub_path = "CarperAI/openai_summarize_tldr"
    columns = ("prompt", "label")
    splits = TLDR_SPLITS
    length_fields = ("prompt",)
    skip_reason = "with an empty prompt or label"

    def __init__(
        self,
        path: str | None = None,
        split: PaperSplit = "sampling",
        limit: int | None = None,
        tokenizer: str | None = None,
        max_prompt_tokens: int = TLDR_MAX_PROMPT_TOKENS,
        boundaries: dict[str, list[int | None]] | None = None,
        train_split: str = "train",
        dev_split: str = "valid",
        test_split: str = "test",
    ) -> None:
        self.max_prompt_tokens = max_prompt_tokens
        source_splits = {"train": train_split, "dev": dev_split, "test": test_split}
        super().__init__(path, split, source_splits, limit, tokenizer, boundaries)

    def _parse(self, row: dict) -> tuple[str, str, Sequence[tuple[str, int]]]:
        prompt, reference = _text(row, "prompt"), _text(row, "label")
        return prompt, reference, [(prompt, self.max_prompt_tokens)]


class HelpfulnessPrompts(_PaperPreset):
    """Anthropic Helpfulness as in the BPO paper: ``HuggingFaceH4/helpful-anthropic-raw``.

    The prompt is ``f"{instruction} Assistant: "``, the reference the ``demonstration`` column. Rows are kept when
    the instruction has at most ``max_instruction_tokens`` and the demonstration at most ``max_reference_tokens``
    tokens; the filtered rows 0-10k are ``sft``, 10k-20k ``sampling``, 20k-20.5k ``dev`` and 20.5k-21k ``test``
    (:data:`HELPFULNESS_SPLITS`).

    Args:
        path: hub dataset (default) or a local file/folder with the columns ``instruction`` and ``demonstration``.
        split: the paper split: ``sft``, ``sampling``, ``dev`` or ``test``.
        limit: read at most this many rows of the paper split.
        tokenizer: tokenizer name or path that counts tokens; None skips the length filter (the splits then differ
            from the paper's).
        max_instruction_tokens: longest instruction kept, in tokens.
        max_reference_tokens: longest demonstration kept, in tokens.
        boundaries: per paper split ``[start, stop]`` over the filtered rows, replacing :data:`HELPFULNESS_SPLITS`.
        source_split: the source split all paper splits come from.
    """

    hub_path = "HuggingFaceH4/helpful-anthropic-raw"
    columns = ("instruction", "demonstration")
    splits = HELPFULNESS_SPLITS
    length_fields = ("instruction", "demonstration")
    skip_reason = "with an empty instruction or demonstration"

    def __init__(
        self,
        path: str | None = None,
        split: PaperSplit = "sampling",
        limit: int | None = None,
        tokenizer: str | None = None,
        max_instruction_tokens: int = HELPFULNESS_MAX_INSTRUCTION_TOKENS,
        max_reference_tokens: int = HELPFULNESS_MAX_DEMONSTRATION_TOKENS,
        boundaries: dict[str, list[int | None]] | None = None,
        source_split: str = "train",
    ) -> None:
        self.max_instruction_tokens, self.max_reference_tokens = max_instruction_tokens, max_reference_tokens
        super().__init__(path, split, {"train": source_split}, limit, tokenizer, boundaries)

    def _parse(self, row: dict) -> tuple[str, str, Sequence[tuple[str, int]]]:
        instruction, reference = _text(row, "instruction"), _text(row, "demonstration")
        lengths = [(instruction, self.max_instruction_tokens), (reference, self.max_reference_tokens)]
        return f"{instruction} Assistant: ", reference, lengths


def render_conversation(messages) -> tuple[str, str]:
    """``(prompt, reference)`` of a conversation ``[{"role", "content"}, ...]`` that ends with an assistant turn.

    The prompt renders every turn but the last as ``"{role}: {content}"``, joined by single spaces, followed by
    ``" assistant: "``; the reference is the last turn's content.

    Raises:
        ValueError: If the conversation is not a list of at least two such messages ending with an assistant turn.
    """
    if not isinstance(messages, (list, tuple)) or len(messages) < 2:
        raise ValueError("a conversation needs at least two messages")
    turns = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"not a message: {message!r}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip() or not isinstance(content, str) or not content.strip():
            raise ValueError(f"message without a role or content: {message!r}")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise ValueError(f"the conversation ends with a {turns[-1][0]!r} turn, not an assistant turn")
    prompt = " ".join(f"{role}: {content}" for role, content in turns[:-1]) + " assistant: "
    return prompt, turns[-1][1]


class HarmlessnessPrompts(_PaperPreset):
    """Anthropic Harmlessness as in the BPO paper: the ``chosen`` conversations of ``HuggingFaceH4/hh-rlhf-h4``.

    A ``chosen`` conversation is a list of messages ``{"role": "user" | "assistant", "content": str}``. The prompt
    renders all turns but the last (:func:`render_conversation`), e.g.
    ``"user: Hi assistant: Hello! user: How do I pick a lock? assistant: "``; the reference is the final assistant
    turn. Rows are kept when the prompt has at most ``max_prompt_tokens`` and the reference at most
    ``max_reference_tokens`` tokens; ``sft`` is the first 10k filtered train rows, ``sampling`` the next 10k, ``dev``
    the filtered test rows 0-500 and ``test`` rows 500-1000 (:data:`HARMLESSNESS_SPLITS`).

    Args:
        path: hub dataset (default) or a local file/folder with a ``chosen`` column of message lists.
        split: the paper split: ``sft``, ``sampling``, ``dev`` or ``test``.
        limit: read at most this many rows of the paper split.
        tokenizer: tokenizer name or path that counts tokens; None skips the length filter (the splits then differ
            from the paper's).
        max_prompt_tokens: longest rendered prompt kept, in tokens.
        max_reference_tokens: longest final assistant turn kept, in tokens.
        boundaries: per paper split ``[start, stop]`` over the filtered rows, replacing :data:`HARMLESSNESS_SPLITS`.
        train_split: source split of ``sft`` and ``sampling``.
        test_split: source split of ``dev`` and ``test``.
    """

    hub_path = "HuggingFaceH4/hh-rlhf-h4"
    columns = ("chosen",)
    splits = HARMLESSNESS_SPLITS
    length_fields = ("prompt", "reference")
    skip_reason = "with an empty or malformed conversation (an empty turn, or no final assistant turn)"

    def __init__(
        self,
        path: str | None = None,
        split: PaperSplit = "sampling",
        limit: int | None = None,
        tokenizer: str | None = None,
        max_prompt_tokens: int = HARMLESSNESS_MAX_PROMPT_TOKENS,
        max_reference_tokens: int = HARMLESSNESS_MAX_LABEL_TOKENS,
        boundaries: dict[str, list[int | None]] | None = None,
        train_split: str = "train",
        test_split: str = "test",
    ) -> None:
        self.max_prompt_tokens, self.max_reference_tokens = max_prompt_tokens, max_reference_tokens
        super().__init__(path, split, {"train": train_split, "test": test_split}, limit, tokenizer, boundaries)

    def _parse(self, row: dict) -> tuple[str, str, Sequence[tuple[str, int]]]:
        chosen = row["chosen"]
        if chosen is None:
            raise _Skip
        if not isinstance(chosen, (list, tuple)):  # e.g. Anthropic/hh-rlhf's "\n\nHuman: ..." text
            raise _NotText("chosen", chosen, "a list of chat messages")
        try:
            prompt, reference = render_conversation(chosen)
        except ValueError:
            raise _Skip from None
        return prompt, reference, [(prompt, self.max_prompt_tokens), (reference, self.max_reference_tokens)]
