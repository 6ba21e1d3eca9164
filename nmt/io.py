"""Safe file output: complete files appear at once, or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from nmt.errors import NmtError


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory, fsync and rename.

    An interrupted write leaves no partial file under `path` (an existing file stays untouched).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise NmtError(f"{path}: output directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise NmtError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise NmtError(f"{path}: cannot write ({e.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
