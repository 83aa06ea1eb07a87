"""Files that are complete or absent: every file a run writes whole goes through ``atomic_file``.

A temporary file beside the target (never in ``$TMPDIR``: a killed job leaves no large file elsewhere, and the rename
stays on one filesystem), written, optionally synced, given the mode a plain ``open`` gives, and renamed over the
target in one step. A kill leaves the old file or the new one, never half of either; an ``OSError`` (a full disk, a
folder without write permission) is a ``RunError`` naming the path and the config key, and no temporary file stays.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from bpo_lightning.errors import disk_error

UMASK = os.umask(0)  # read once: a plain open() gives files 0o666 & ~UMASK
os.umask(UMASK)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, key: str = "trainer.default_root_dir"
) -> Iterator[IO]:
    """A file to write ``path``'s new contents into; it replaces ``path`` when the block ends without error."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # unique per writer
        with os.fdopen(fd, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # the mode a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None:  # torch's zip writer turns a failed write into a RuntimeError on the way out
            raise disk_error(cause, path, key) from err
        raise


def _os_error(err: BaseException | None) -> OSError | None:
    """The ``OSError`` that ``err`` is or that led to it (its cause or context chain), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: str | os.PathLike, text: str, key: str = "trainer.default_root_dir") -> None:
    """Write ``text`` to ``path`` through ``atomic_file``."""
    with atomic_file(path, key=key) as f:
        f.write(text)


def shareable(folder: str | os.PathLike) -> None:
    """Give the files of a saved model folder the mode a plain ``open`` gives (``safetensors`` writes 0600)."""
    for path in Path(folder).iterdir():
        if path.is_file():
            path.chmod(0o666 & ~UMASK)


def strict_json(value):
    """NaN and ±inf as ``null``: report files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


LOCK = ".bpo.lock"
_held: dict[str, IO] = {}  # run folders this process holds, by resolved path


def lock_run_dir(run_dir: str | os.PathLike, key: str = "trainer.default_root_dir") -> None:
    """Make this process the one writer of ``run_dir`` until it exits: an exclusive ``flock`` on
    ``<run_dir>/.bpo.lock``, which records the holder's pid and host. The operating system releases it when the
    process ends in any way (a crash or a kill included), so a lock file left behind is taken over. Another holder is
    an ``InputError`` naming it. Taking a folder this process holds already does nothing."""
    import fcntl
    import socket
    import time

    path = Path(run_dir)
    name = str(path.resolve())
    if name in _held:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+")  # noqa: SIM115 (held open for the life of the process)
    except OSError as err:
        raise disk_error(err, path / LOCK, key) from err
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = " ".join(handle.read().split()) or "another process"
        handle.close()
        from bpo_lightning.errors import InputError

        raise InputError(
            f"{key}: {path} is being written by another bpo fit ({holder}); wait for it to end, or "
            "choose another folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    if not _held:
        import atexit

        atexit.register(_release)
    _held[name] = handle


def _release() -> None:
    for handle in _held.values():
        handle.close()  # the lock goes with it
    _held.clear()
