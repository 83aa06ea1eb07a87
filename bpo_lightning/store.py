"""The run directory's record of every phase: nothing sampled or annotated is ever lost.

Per phase ``p`` the directory ``<run_dir>/data`` holds
- ``phase_000p.samples.jsonl``: one line per prompt, appended and flushed as soon as it is annotated (responses,
  token ids, scores, and what happened to the prompt: kept, or dropped and why);
- ``phase_000p.pairs.jsonl``: the phase's preference pairs with behavior/reference log-probs, written atomically
  once the phase is complete;
- ``phase_000p.json``: provenance (phase, behavior version, sampler settings, annotator id, seed) and counts.

A resumed run reuses complete phases as they are and continues a partial phase from its first unannotated prompt.
Data written under a different setup is never overwritten: the run stops and names the difference.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

from bpo_lightning.types import PhaseStats, PreferenceRecord

# provenance entries that must match for saved data to be reused
_MUST_MATCH = ("phase", "behavior_version", "sampler", "annotator", "seed")


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
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(self.meta_path, json.dumps({"provenance": provenance, "complete": False}, indent=1))
            return
        saved = json.loads(self.meta_path.read_text())["provenance"]
        diff = [k for k in _MUST_MATCH if saved.get(k) != provenance.get(k)]
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {provenance.get(k)!r}" for k in diff)
            raise RuntimeError(
                f"{self.root} already holds phase {self.phase} data from a different setup ({detail}). "
                "Resume with the original config, or start a new run with another trainer.default_root_dir."
            )

    def complete(self) -> bool:
        return self.meta_path.exists() and json.loads(self.meta_path.read_text()).get("complete", False)

    def load_samples(self) -> dict[int, dict]:
        """Annotated prompts saved so far, by prompt index. A torn last line (a killed job) is skipped."""
        rows: dict[int, dict] = {}
        if not self.samples_path.exists():
            return rows
        for number, line in enumerate(self.samples_path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{self.samples_path}:{number}: skipping an incomplete line", stacklevel=2)
                continue
            rows[row["index"]] = row
        return rows

    def append_samples(self, rows: list[dict]) -> None:
        """Append rows, first cutting a torn last line (a job killed mid-append) so every line stays whole."""
        if self.samples_path.exists():
            with self.samples_path.open("rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_pairs(self, records: list[PreferenceRecord], stats: PhaseStats, provenance: dict) -> None:
        atomic_write(self.pairs_path, "".join(json.dumps(r.to_json()) + "\n" for r in records))
        meta = {"provenance": provenance, "complete": True, "stats": _stats_json(stats)}
        atomic_write(self.meta_path, json.dumps(meta, indent=1))

    def load_pairs(self) -> tuple[list[PreferenceRecord], PhaseStats]:
        records = [PreferenceRecord.from_json(json.loads(line)) for line in self.pairs_path.read_text().splitlines()]
        saved = json.loads(self.meta_path.read_text())["stats"]
        return records, PhaseStats(**saved)


def _stats_json(stats: PhaseStats) -> dict:
    return {"phase": stats.phase, "prompts": stats.prompts, "kept": stats.kept, "dropped": stats.dropped,
            "annotated": stats.annotated, "cached": stats.cached}  # fmt: skip


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a complete file or the old one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # unique per writer
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # the mode a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
