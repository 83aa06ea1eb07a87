"""The run directory's record of every phase: nothing sampled or annotated is ever lost.

Per phase ``p`` the directory ``<run_dir>/data`` holds
- ``phase_000p.samples.jsonl``: one line per prompt, appended and flushed as soon as it is annotated (responses,
  token ids, scores, and what happened to the prompt: kept, or dropped and why);
- ``phase_000p.pairs.jsonl``: the phase's preference pairs with behavior/reference log-probs, written atomically
  once the phase is complete;
- ``phase_000p.json``: provenance (phase, behavior version, sampler settings, annotator id, seed) and counts.

A resumed run reuses complete phases as they are and continues a partial phase from its first unannotated prompt.
Data written under a different setup is never overwritten: the run stops and names the difference. A damaged file
(not written by the run: a disk fault or an edit) stops the run with a :class:`~bpo_lightning.errors.RunError` that
names the file and line; a full disk or an unwritable folder stops it with one that names the path.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from bpo_lightning.errors import RunError, disk_error
from bpo_lightning.files import atomic_write
from bpo_lightning.types import PhaseStats, PreferenceRecord, SampleRow

# provenance entries that must match for saved data to be reused (``collection.collect_phase`` records them: the
# sampler's ``settings()``, the annotator's ``identity``, and the module's reference, loss and behavior log-probs)
MUST_MATCH = ("phase", "behavior_version", "sampler", "annotator", "seed", "reference", "loss", "behavior_logps")
# recorded only by later versions: a phase file written before leaves them out, and is compared without them
_LATER = {"loss": None, "sampler": ("batch_size",)}


class PhaseStore:
    def __init__(self, root: str | os.PathLike, phase: int) -> None:
        self.root = Path(root)
        self.phase = phase
        stem = f"phase_{phase:04d}"
        self.samples_path = self.root / f"{stem}.samples.jsonl"
        self.pairs_path = self.root / f"{stem}.pairs.jsonl"
        self.meta_path = self.root / f"{stem}.json"

    def check(self, provenance: dict) -> None:
        """Refuse data that a different setup produced in this run directory."""
        if not self.meta_path.exists():
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise disk_error(err, self.root) from err
            atomic_write(self.meta_path, json.dumps({"provenance": provenance, "complete": False}, indent=1))
            return
        saved = self._meta("provenance")
        diff = [k for k in MUST_MATCH if differs(saved, provenance, k)]
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {provenance.get(k)!r}" for k in diff)
            raise RunError(
                f"{self.root} already holds phase {self.phase + 1} data from a different setup ({detail}). "
                "Resume with the original config, or start a new run with another trainer.default_root_dir."
            )

    def complete(self) -> bool:
        return self.meta_path.exists() and bool(self._meta().get("complete", False))

    def load_samples(self) -> dict[int, SampleRow]:
        """Annotated prompts saved so far, by prompt index. A torn last line (a killed job) is skipped; a damaged
        line before it is an error."""
        rows: dict[int, SampleRow] = {}
        if not self.samples_path.exists():
            return rows
        lines = _read(self.samples_path).splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError as err:
                if number == len(lines):
                    warnings.warn(f"{self.samples_path}:{number}: skipping an incomplete line", stacklevel=2)
                    continue
                raise self._damaged(self.samples_path, number, err) from None
            if not isinstance(row, dict) or not isinstance(row.get("index"), int):
                raise self._damaged(self.samples_path, number, KeyError("no prompt index"))
            try:
                rows[row["index"]] = SampleRow.from_json(row)
            except TypeError as err:  # a field missing
                raise self._damaged(self.samples_path, number, err) from None
        return rows

    def append_samples(self, rows: list[SampleRow]) -> None:
        """Append rows, first cutting a torn last line (a job killed mid-append) so every line stays whole."""
        try:
            if self.samples_path.exists():
                with self.samples_path.open("rb+") as f:
                    _cut_torn_line(f)
            with self.samples_path.open("a") as f:  # flushed, not fsynced: a killed process loses nothing written
                f.write("".join(json.dumps(row.to_json()) + "\n" for row in rows))
        except OSError as err:
            raise disk_error(err, self.samples_path) from err

    def write_pairs(self, records: list[PreferenceRecord], stats: PhaseStats, provenance: dict) -> None:
        atomic_write(self.pairs_path, "".join(json.dumps(r.to_json()) + "\n" for r in records))
        meta = {"provenance": provenance, "complete": True, "stats": asdict(stats)}
        atomic_write(self.meta_path, json.dumps(meta, indent=1))

    def load_pairs(self) -> tuple[list[PreferenceRecord], PhaseStats]:
        if not self.pairs_path.exists():
            raise self._damaged(
                self.pairs_path,
                None,
                FileNotFoundError(f"missing, though {self.meta_path.name} marks the phase complete"),
            )
        records = []
        for number, line in enumerate(_read(self.pairs_path).splitlines(), 1):
            try:
                records.append(PreferenceRecord.from_json(json.loads(line)))
            except (ValueError, TypeError, AttributeError) as err:
                raise self._damaged(self.pairs_path, number, err) from None
        try:
            stats = PhaseStats(**self._meta("stats"))
        except TypeError as err:
            raise self._damaged(self.meta_path, None, err) from None
        return records, stats

    def _meta(self, entry: str | None = None):
        """The phase's ``.json`` file (or one entry of it); a damaged file is a ``RunError``."""
        try:
            meta = json.loads(_read(self.meta_path))
        except ValueError as err:
            raise self._damaged(self.meta_path, getattr(err, "lineno", None), err) from None
        if not isinstance(meta, dict):
            raise self._damaged(self.meta_path, None, TypeError(f"a JSON {type(meta).__name__}, not an object"))
        if entry is None:
            return meta
        if not isinstance(meta.get(entry), dict):
            raise self._damaged(self.meta_path, None, KeyError(f"no {entry!r} entry"))
        return meta[entry]

    def _damaged(self, path: Path, line: int | None, err: Exception) -> RunError:
        where = f"{path} line {line}" if line else str(path)
        if isinstance(err, json.JSONDecodeError):
            reason = f"{err.msg} at column {err.colno}"
        else:
            reason = " ".join(str(err.args[0] if err.args else err).split()) or type(err).__name__
        return RunError(
            f"trainer.default_root_dir: {where} is damaged ({reason}), so a disk fault or an edit changed it: restore "
            f"it from a backup, or delete {self.root}/phase_{self.phase:04d}.* to collect phase {self.phase + 1} "
            "again"
        )


def _read(path: Path) -> str:
    """A run-folder file's text; a file that cannot be read or is not UTF-8 is a ``RunError``."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object.count(b"\n", 0, err.start) + 1
        raise RunError(
            f"trainer.default_root_dir: {path} line {line} is damaged (not UTF-8 text); restore it from a backup, or "
            "delete that phase's files to collect the phase again"
        ) from None
    except OSError as err:
        raise RunError(f"trainer.default_root_dir: cannot read {path} ({err.strerror or err})") from err


def _cut_torn_line(f) -> None:
    """Truncate a binary file open for update after its last newline (reading backwards from the end only)."""
    end = f.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        start = max(0, position - 65536)
        f.seek(start)
        block = f.read(position - start)
        if start + len(block) == end and block.endswith(b"\n"):
            return  # whole lines
        newline = block.rfind(b"\n")
        if newline >= 0:
            f.truncate(start + newline + 1)
            return
        position = start
    f.truncate(0)  # one torn line and nothing else


def differs(saved: dict, current: dict, key: str) -> bool:
    """Whether provenance entry ``key`` differs, leaving out what a phase file written before it was recorded lacks
    (``_LATER``; a rule annotator's code digest, ``@…`` after its identity)."""
    old, new = saved.get(key), current.get(key)
    if key == "annotator" and isinstance(old, str) and isinstance(new, str) and "@" not in old and "@" in new:
        return old != new.rpartition("@")[0]
    later = _LATER.get(key, ())
    if key in _LATER and later is None and key not in saved:
        return False
    old, new = saved.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict) and later:
        new = {k: v for k, v in new.items() if k in old or k not in later}
    return old != new
