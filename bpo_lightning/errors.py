"""Errors about the user's input or environment, each a sentence that names the config key, file and row.

``bpo`` prints these as one line (``bpo: error: …``) and exits non-zero; ``--debug`` or ``BPO_DEBUG=1`` shows the
traceback instead. Anything else (a bug, a plugin's own exception) keeps its traceback.

- ``InputError`` (a ``ValueError``): a bad setting or input file; nothing was run. Exit status 2.
- ``RunError`` (a ``RuntimeError``): the run stopped for a reason outside the code (a phase without pairs, an
  annotator that failed, a disk that is full, a damaged run folder); what was already produced is on disk. Exit 1.
- ``Stopped`` (a ``RunError``): SIGTERM / SIGINT; exit 143.
"""

from __future__ import annotations

import os


class BPOError(Exception):
    """Base of the errors ``bpo`` reports as one line."""

    exit_code = 1


class InputError(BPOError, ValueError):
    """A bad setting or input file, named in the message."""

    exit_code = 2


class RunError(BPOError, RuntimeError):
    """The run stopped for a reason outside the code; everything produced so far is kept."""


class Stopped(RunError):
    """SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C): the run stopped at a safe point with everything it had
    collected saved. Exit status 143 (128 + SIGTERM), what schedulers read as "terminated", never 0."""

    exit_code = 143


def debug_requested() -> bool:
    return os.environ.get("BPO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def reported(err: BaseException) -> BPOError | None:
    """The ``BPOError`` behind ``err`` (itself, or a cause or context in its chain), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BPOError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def disk_error(err: OSError, path, key: str = "trainer.default_root_dir") -> RunError:
    """An ``OSError`` while writing ``path`` as a ``RunError`` naming the path (disk full, permissions)."""
    reason = err.strerror or type(err).__name__
    return RunError(
        f"{key}: cannot write {path} ({reason}); free space or choose another folder — the files "
        "already written are complete and a resume continues from them"
    )
