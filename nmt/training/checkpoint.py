"""Checkpoints: plain tensors and primitive types, written atomically, read without executing code."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from nmt import __version__
from nmt.errors import NmtError

FORMAT = "nmt-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (+ format markers) to `path` atomically: temp file, fsync, rename."""
    path = Path(path)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "nmt_version": __version__, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints with `weights_only=True`; anything else is an NmtError."""
    path = Path(path)
    if not path.is_file():
        raise NmtError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns (multi-line) about foreign pickle protocols
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, TypeError, ImportError, IndexError, KeyError, OSError) as e:
        raise NmtError(_load_failure(path, e)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NmtError(f"{path}: not an nmt checkpoint (no '{FORMAT}' marker)")
    if data.get("format_version") != FORMAT_VERSION:
        raise NmtError(
            f"{path}: checkpoint format version {data.get('format_version')!r} is not supported "
            f"(this nmt reads version {FORMAT_VERSION})"
        )
    return data


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load_failure(path: Path, error: BaseException) -> str:
    """One line saying why `path` could not be read; a file that needs code to unpickle is refused as such."""
    text = _ANSI.sub("", str(error))
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            detail = f"it refers to the Python object {found.group(1)}"
        else:
            found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
            detail = found.group(1).strip().rstrip(".") if found else "unsupported pickle content"
        return (f"{path}: refusing to load: the file holds Python objects other than tensors and plain data "
                f"({detail[:120]}), which could run code when loaded; only nmt checkpoints are accepted")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = re.split(r"(?<=\w)\. ", lines[0])[0] if lines else type(error).__name__  # its first sentence
    return f"{path}: not a readable nmt checkpoint ({reason[:200]})"
