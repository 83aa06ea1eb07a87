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
        if isinstance(err, OSError):
            raise disk_error(err, path, key) from err
        raise


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
