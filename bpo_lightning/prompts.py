"""Prompt sources: JSONL / JSON / parquet / CSV files, or anything ``datasets.load_dataset`` reads."""

from __future__ import annotations

import warnings
from pathlib import Path

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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

    def dataset(self):
        from datasets import load_dataset

        builder = _FILE_BUILDERS.get(Path(self.path).suffix.lower())
        if builder is not None:
            if not Path(self.path).exists():
                raise FileNotFoundError(f"prompt file {self.path} does not exist")
            return load_dataset(builder, data_files=self.path, split="train")
        return load_dataset(self.path, self.name, split=self.split)

    def load(self, key: str, require_reference: bool = False) -> list[dict]:
        """Rows ``{"prompt", "reference"}`` (plus ``"messages"`` when the prompt column holds a chat conversation);
        empty prompts are skipped and counted in a warning.

        Args:
            key: the config key of this source, named in errors (e.g. ``data.prompts``).
            require_reference: fail unless every row has a reference answer.
        """
        ds = self.dataset()
        if self.limit is not None:
            ds = ds.select(range(min(self.limit, len(ds))))
        columns = list(ds.column_names)
        if self.prompt_field not in columns:
            raise ValueError(
                f"{key}.init_args.prompt_field: column {self.prompt_field!r} not found in {self.path} "
                f"(columns: {columns})"
            )
        has_reference = self.reference_field is not None and self.reference_field in columns
        if require_reference and not has_reference:
            raise ValueError(
                f"{key}.init_args.reference_field: column {self.reference_field!r} not found in {self.path} "
                f"(columns: {columns}); evaluation needs reference answers"
            )
        rows, empty = [], []
        for i, row in enumerate(ds):
            prompt = row[self.prompt_field]
            messages = prompt if is_chat(prompt) else None
            if messages is None and (not isinstance(prompt, str) or not prompt.strip()):
                empty.append(i)
                continue
            if self.template is not None:
                prompt = self._format(row, i, key)
            elif messages is not None:
                prompt = render_chat(messages)
            reference = row[self.reference_field] if has_reference else None
            if require_reference and not isinstance(reference, str):
                raise ValueError(f"{key}: row {i} of {self.path} has no reference answer ({self.reference_field})")
            rows.append({"prompt": prompt, "reference": reference, **({"messages": messages} if messages else {})})
        if empty:
            warnings.warn(
                f"{key}: skipped {len(empty)} rows of {self.path} with an empty {self.prompt_field!r} "
                f"(first rows: {empty[:5]})",
                stacklevel=2,
            )
        if not rows:
            raise ValueError(f"{key}: {self.path} has no usable prompts")
        return rows

    def _format(self, row: dict, index: int, key: str) -> str:
        try:
            return self.template.format(**row)
        except (KeyError, IndexError) as err:
            raise ValueError(f"{key}.init_args.template: row {index} of {self.path} has no field {err}") from None


class ReviewPrompts(PromptSource):
    """The embedded review task's prompts (docs/task.md).

    Args:
        split: ``prompts`` (the online pool), ``eval`` (held out) or ``sft``.
        limit: read at most this many rows.
    """

    def __init__(self, split: str = "prompts", limit: int | None = None) -> None:
        from bpo_lightning.tasks.reviews import data_path

        super().__init__(str(data_path(split)), limit=limit)
