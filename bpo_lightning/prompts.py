"""Prompt sources: JSONL / JSON / parquet / CSV files, or anything ``datasets.load_dataset`` reads.

A bad prompt file is an :class:`~bpo_lightning.errors.InputError` naming the config key, the file and the row (and, for
JSON lines and CSV files, the line): invalid JSON, text that is not UTF-8, a CSV row with too many fields, a prompt
that is missing (JSON) or not text (e.g. a number), a reference that is not text, a chat prompt with an unknown role,
without a user turn or that already ends with an assistant turn, an empty file, a file that does not exist.

Every cell of a CSV file is read as text: ``42`` is the prompt ``"42"``, ``NA`` is ``"NA"``, and an empty cell is
empty text. An empty reference (missing, null, or blank text) is ``None`` in every format: such a row is still a
prompt, and an error only where a reference is required (held-out prompts).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import warnings
from pathlib import Path

from bpo_lightning.errors import InputError, one_line

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# role names of chat messages (lower case) -> the role the chat template gets
CHAT_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "system": "system",
}
_KNOWN_ROLES = "user (or human), assistant (or gpt, bot) and system"


class MissingPromptFile(InputError, FileNotFoundError):
    """A prompt file that does not exist."""


def is_chat(prompt) -> bool:
    """A non-empty list of ``{"role", "content"}`` messages."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "content" in m for m in prompt)


def render_chat(messages: list[dict]) -> str:
    """Plain-text view of a conversation (``role: content`` lines) for annotators, logs and saved records."""
    return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages)


def model_input(row: dict) -> str | list[dict]:
    """What the policy is prompted with: the chat messages when the row has them (the tokenizer's chat template
    renders them), else the prompt text."""
    return row.get("messages") or row["prompt"]


class PromptSource:
    """Prompts, and optionally reference answers, from a file or a ``datasets`` source.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, or a ``datasets`` name or directory.
        split: split to read (``datasets`` sources only; a file is one split).
        name: ``datasets`` configuration name.
        prompt_field: column holding the prompt text.
        reference_field: column holding the reference answer (used for evaluation), if any.
        limit: read at most this many rows.
        template: format string over the row's columns that builds the prompt, e.g. ``"{instruction} Assistant: "``;
            default: the ``prompt_field`` column as it is.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        name: str | None = None,
        prompt_field: str = "prompt",
        reference_field: str | None = "reference",
        limit: int | None = None,
        template: str | None = None,
    ) -> None:
        self.path, self.split, self.name = str(path), split, name
        self.prompt_field, self.reference_field, self.limit = prompt_field, reference_field, limit
        self.template = template

    @property
    def _builder(self) -> str | None:
        return _FILE_BUILDERS.get(Path(self.path).suffix.lower())

    def dataset(self, key: str = "data.prompts"):
        """The rows as a ``datasets.Dataset``; ``key`` (the config key of this source) is named in errors."""
        from datasets import load_dataset

        builder = self._builder
        if builder is None:
            try:
                return load_dataset(self.path, self.name, split=self.split)
            except Exception as err:
                raise InputError(_dataset_problem(self.path, self.name, self.split, key, err)) from err
        path = Path(self.path).expanduser()
        if path.is_dir():
            raise InputError(f"{key}: {self.path} is a folder, not a prompt file")
        if not path.is_file():
            raise MissingPromptFile(f"{key}: prompt file {self.path} does not exist")
        options = {}
        if builder in ("json", "csv"):  # pyarrow reads bytes that are not UTF-8 into strings that fail later
            problem = _utf8_problem(path, self.path)
            if problem is None and builder == "json":  # name the line before pyarrow logs its own traceback
                problem = _file_problem(path, self.path, builder, self.prompt_field)
            if problem is None and builder == "csv":
                try:
                    options = _csv_options(path)
                except _Problem as err:
                    problem = err.sentence(self.path)
            if problem is not None:
                raise InputError(f"{key}: {problem}")
        try:
            return load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as err:
            problem = _file_problem(path, self.path, builder, self.prompt_field)
            raise InputError(f"{key}: {problem or f'{self.path} cannot be read ({_root_cause(err)})'}") from err

    def load(self, key: str, require_reference: bool = False) -> list[dict]:  # noqa: C901 (one pass, one message per case)
        """Rows ``{"prompt", "reference"}`` (plus ``"messages"`` when the prompt column holds a chat conversation);
        empty prompts (an empty text, an empty CSV cell) are skipped and counted in a warning; a prompt that is not
        text (e.g. a number), or a JSON row without one, is an ``InputError`` naming the row.

        An empty reference (missing, null or blank) is ``None``; a reference that is not text is an ``InputError``.
        A chat prompt's roles are normalised (``human``/``user`` -> ``user``, ``gpt``/``assistant``/``bot`` ->
        ``assistant``, ``system``; any case); an unknown role, a conversation without a user turn and one that
        already ends with an assistant turn are an ``InputError`` naming the row.

        Args:
            key: the config key of this source, named in errors (e.g. ``data.prompts``).
            require_reference: fail unless every row has a reference answer (an ``InputError`` naming the first row
                without one).
        """
        ds = self.dataset(key)
        if self.limit is not None:
            ds = ds.select(range(min(self.limit, len(ds))))
        columns = list(ds.column_names)
        if self.prompt_field not in columns:
            raise InputError(
                f"{key}.init_args.prompt_field: column {self.prompt_field!r} not found in {self.path} "
                f"(columns: {columns})"
            )
        has_reference = self.reference_field is not None and self.reference_field in columns
        if require_reference and not has_reference:
            raise InputError(
                f"{key}.init_args.reference_field: column {self.reference_field!r} not found in {self.path} "
                f"(columns: {columns}); evaluation needs reference answers"
            )
        rows, empty = [], []
        for i, row in enumerate(ds):
            prompt = row[self.prompt_field]
            messages = self._conversation(prompt, i, key) if is_chat(prompt) else None
            if messages is None:
                if self._empty(prompt, i, key):
                    empty.append(i)
                    continue
            if self.template is not None:
                prompt = self._format(row, i, key)
            elif messages is not None:
                prompt = render_chat(messages)
            reference = self._reference(row[self.reference_field], i, key) if has_reference else None
            if require_reference and reference is None:
                raise InputError(
                    f"{key}: {self._row(i)} has no reference answer (its {self.reference_field!r} is missing, null "
                    "or empty); evaluation needs one for every prompt"
                )
            rows.append({"prompt": prompt, "reference": reference, **({"messages": messages} if messages else {})})
        if empty:
            warnings.warn(
                f"{key}: skipped {len(empty)} rows of {self.path} with an empty {self.prompt_field!r} "
                f"(first rows: {empty[:5]})",
                stacklevel=2,
            )
        if not rows:
            if len(ds) == 0:
                raise InputError(f"{key}: {self.path} has no rows")
            raise InputError(f"{key}: {self.path} has no usable prompts (every prompt of its {len(ds)} rows is empty)")
        return rows

    def _empty(self, prompt, index: int, key: str) -> bool:
        """Whether a prompt that is not a conversation is empty (skipped); an error if it is not text."""
        if isinstance(prompt, str):
            return not prompt.strip()
        if prompt is None and self._builder != "json":  # an empty CSV cell or a null value of a dataset
            return True
        if isinstance(prompt, list) and not prompt:
            return True
        if prompt is None:
            raise InputError(f"{key}: {self._row(index)} has no {self.prompt_field!r} (missing or null)")
        raise InputError(
            f"{key}: {self._row(index)} has {self.prompt_field!r} = {_short(prompt)}, {_kind(prompt)}, "
            "not text or a list of chat messages"
        )

    def _reference(self, value, index: int, key: str) -> str | None:
        """The reference answer of a row: None when missing, null or blank; an error if it is not text."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise InputError(
                f"{key}: {self._row(index)} has {self.reference_field!r} = {_short(value)}, {_kind(value)}, not text"
            )
        return value

    def _conversation(self, messages: list[dict], index: int, key: str) -> list[dict]:
        """The chat prompt ``messages`` as ``[{"role", "content"}]`` with normalised roles (:data:`CHAT_ROLES`);
        an error naming the row for an unknown role, content that is not text, no user turn, or a conversation that
        already ends with an assistant turn (a prompt ends with the turn the policy answers)."""
        turns = []
        for number, message in enumerate(messages, 1):
            role, content = message.get("role"), message.get("content")
            where = f"message {number} of its {self.prompt_field!r}"
            if role is None:
                raise InputError(f"{key}: {self._row(index)} has a message without a 'role' ({where})")
            normal = CHAT_ROLES.get(role.strip().lower()) if isinstance(role, str) else None
            if normal is None:
                raise InputError(
                    f"{key}: {self._row(index)} has a message with the unknown role {_short(role)} ({where}); "
                    f"known roles: {_KNOWN_ROLES}"
                )
            if not isinstance(content, str):
                raise InputError(
                    f"{key}: {self._row(index)} has a message whose 'content' is {_short(content)}, {_kind(content)}, "
                    f"not text ({where})"
                )
            turns.append({"role": normal, "content": content})
        roles = [t["role"] for t in turns]
        if "user" not in roles:
            raise InputError(
                f"{key}: {self._row(index)} is a conversation without a user turn (roles: {', '.join(roles)}); "
                "a chat prompt needs a user turn for the policy to answer"
            )
        if roles[-1] == "assistant":
            column = self.reference_field or "reference"
            raise InputError(
                f"{key}: {self._row(index)} is a conversation that already ends with an assistant turn "
                f"({len(turns)} messages); a chat prompt ends with the turn the policy answers: drop the last turn "
                f"(or put it in the {column!r} column)"
            )
        return turns

    def _format(self, row: dict, index: int, key: str) -> str:
        try:
            return self.template.format(**row)
        except (KeyError, IndexError) as err:
            raise InputError(f"{key}.init_args.template: {self._row(index)} has no field {err}") from None

    def _row(self, index: int) -> str:
        """``row 3 of <file> (line 5)``: the row's index and, for JSON lines and CSV files, its line."""
        line = _line_of(Path(self.path).expanduser(), self._builder, index) if self._builder else None
        return _row_name(index, line, self.path)


# -- what is wrong with a file that ``datasets`` could not read ------------------------------------------------------
def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    """``a number``, ``text``, ``a list``, …: what a JSON value is, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    kinds = {str: "text", list: "a list", dict: "a JSON object", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _root_cause(err: BaseException) -> str:
    """The innermost exception behind ``err`` as one line (``datasets`` wraps the parser's error)."""
    seen = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return one_line(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def _dataset_problem(path: str, name: str | None, split: str, key: str, err: Exception) -> str:
    from datasets import config

    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", "./", "../", "~")) or path.count("/") > 1):
        return f"{key}: no file or folder {path} (a prompt file needs a .jsonl, .json, .parquet or .csv name)"
    configuration = f" (configuration {name!r})" if name else ""
    offline = "; HF_DATASETS_OFFLINE=1 reads only datasets in the local cache" if config.HF_HUB_OFFLINE else ""
    return f"{key}: cannot load the dataset {path}{configuration}, split {split!r} ({_root_cause(err)}){offline}"


def _text(path: Path) -> str:
    """The file's text; an error naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _Problem(
            f"line {line} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None


def _utf8_problem(path: Path, name: str) -> str | None:
    """Where the file ``name`` stops being UTF-8 text, read in chunks; None when it is UTF-8 throughout."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        try:
            _text(path)  # the whole file, for the line and offset of the first bad byte
        except _Problem as problem:
            return problem.sentence(name)
        return f"{name} is not UTF-8 text; save it as UTF-8"
    except OSError as err:
        return f"{name} cannot be read ({err.strerror or err})"
    return None


class _Problem(Exception):
    """What is wrong with a file: the end of a sentence that starts with its name, or with ``row`` of it."""

    def __init__(self, text: str, row: tuple[int, int | None] | None = None) -> None:
        super().__init__(text)
        self.text, self.row = text, row  # row: (index, line or None)

    def sentence(self, name: str) -> str:
        return f"{name if self.row is None else _row_name(*self.row, name)} {self.text}"


def _row_name(index: int, line: int | None, name: str) -> str:
    """``row 3 of <file> (line 5)``."""
    return f"row {index} of {name}" + ("" if line is None else f" (line {line})")


def _file_problem(path: Path, name: str, builder: str, prompt_field: str) -> str | None:
    """What is wrong with the JSON or CSV file ``name``, e.g. ``<name> line 3 is not valid JSON (…)``; None when
    nothing is found."""
    try:
        if builder == "json":
            _check_json(_text(path), prompt_field)
        elif builder == "csv":
            _check_csv(_text(path))
    except _Problem as problem:
        return problem.sentence(name)
    except OSError as err:
        return f"{name} cannot be read ({err.strerror or err})"
    return None


def _json_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines (only ``\\n`` ends a line, as in JSON lines)."""
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _check_json(text: str, prompt_field: str) -> None:  # noqa: C901 (one message per kind of bad line)
    if not text.strip():
        raise _Problem("is empty (no rows)")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # one JSON document: a list of rows
            raise _Problem(f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})") from None
        document = None
    if isinstance(document, list):
        rows = [(i, None, value) for i, value in enumerate(document)]
        if not rows:
            raise _Problem("is empty (an empty list, no rows)")
    elif isinstance(document, dict) and len(_json_lines(text)) > 1:
        raise _Problem("is one JSON object over several lines; write one object per line (JSON lines) or a list")
    else:
        rows = []
        for number, line in _json_lines(text):
            try:
                rows.append((len(rows), number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise _Problem(f"line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
    kinds: dict[str, tuple[str, str]] = {}  # field -> (kind, the row it was first seen in)
    for index, line, value in rows:
        if not isinstance(value, dict):
            if line is not None:
                raise _Problem(f"line {line} is not a JSON object (it is {_kind(value)})")
            raise _Problem(f"is not a JSON object (it is {_kind(value)})", (index, line))
        prompt = value.get(prompt_field)
        if prompt_field in value and not (isinstance(prompt, str) or is_chat(prompt) or prompt in (None, [])):
            raise _Problem(
                f"has {prompt_field!r} = {_short(prompt)}, {_kind(prompt)}, not text or a list of chat messages",
                (index, line),
            )
        for field, item in value.items():
            if item is None:
                continue
            first = kinds.setdefault(field, (_kind(item), f"row {index}" if line is None else f"line {line}"))
            if first[0] != _kind(item):
                raise _Problem(
                    f"has {field!r} = {_short(item)}, {_kind(item)}, where {first[1]} has {first[0]}; "
                    "every row needs the same kind of value",
                    (index, line),
                )


def _csv_records(text: str):
    """``(first line, fields)`` of the non-blank records after the header, and the header."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header, records, previous = None, [], 0
    for fields in reader:
        start, previous = previous + 1, reader.line_num
        if not fields:
            continue
        if header is None:
            header = fields
        else:
            records.append((start, fields))
    return header, records


def _csv_options(path: Path) -> dict:
    """``load_dataset`` options that read every column of the CSV file ``path`` as text: without them pandas guesses
    a kind per column and per chunk of 10,000 rows (a column of numbers becomes numbers; an empty column, e.g. of
    references, becomes numbers and then fails on the first text cell; ``NA`` and ``null`` become missing)."""
    from datasets import Features, Value

    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # pandas drops a byte order mark too
            header = next((fields for fields in csv.reader(f) if fields), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # the reader's own error says more
    if header is None:
        return {}
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]  # pandas' names for empty header cells
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise _Problem(f"has the column {twice[0]!r} twice in its header; every column needs its own name")
    return {"features": Features({name: Value("string") for name in names}), "keep_default_na": False}


def _check_csv(text: str) -> None:
    try:
        header, records = _csv_records(text)
    except csv.Error as err:
        raise _Problem(f"is not a readable CSV file ({err})") from None
    if header is None:
        raise _Problem("is empty (no header and no rows)")
    if not records:
        raise _Problem(f"has a header ({', '.join(header)}) but no rows")
    for row, (line, fields) in enumerate(records):
        if len(fields) > len(header):
            raise _Problem(
                f"has {len(fields)} fields but the header has {len(header)} ({', '.join(header)}); quote a field "
                "that holds a comma",
                (row, line),
            )


def _line_of(path: Path, builder: str, index: int) -> int | None:
    """The line where row ``index`` of a JSON lines or CSV file starts; None when not known."""
    try:
        text = path.read_text(encoding="utf-8")
        if builder == "json":
            if text.lstrip().startswith("["):
                return None
            lines = _json_lines(text)
            return lines[index][0] if index < len(lines) else None
        if builder == "csv":
            records = _csv_records(text)[1]
            return records[index][0] if index < len(records) else None
    except (OSError, ValueError, csv.Error):
        return None
    return None


def __getattr__(name: str):
    """``ReviewPrompts`` lives with its task (``bpo_lightning.tasks.reviews``); configs and run folders written
    before name it here."""
    if name == "ReviewPrompts":
        from bpo_lightning.tasks.reviews import ReviewPrompts

        return ReviewPrompts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
