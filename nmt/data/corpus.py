"""Reading text corpora: strict UTF-8, one sentence per line, plain or gzip, streamed.

Every problem becomes an NmtError naming the file (and line): invalid UTF-8, NUL bytes, a missing
file, a parallel corpus whose sides differ in length. Windows line endings, a UTF-8 byte-order mark
and a missing final newline are accepted silently.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from nmt.errors import NmtError

BOM = "\ufeff"


def decode_line(raw: bytes, name: str, lineno: int) -> str:
    """One raw line (with its line break) -> text without the line break, or an NmtError."""
    if b"\x00" in raw:
        raise NmtError(f"{name}:{lineno}: contains a NUL byte")
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start: e.start + 1].hex()
        raise NmtError(f"{name}:{lineno}: invalid UTF-8 (byte 0x{bad} at byte offset {e.start})") from None
    if lineno == 1 and text.startswith(BOM):
        text = text[len(BOM):]
    return text


def iter_stream(stream: BinaryIO, name: str) -> Iterator[str]:
    """Lines of an open binary stream (stdin, a file), decoded strictly; `name` is used in errors."""
    for lineno, raw in enumerate(stream, start=1):
        yield decode_line(raw, name, lineno)


def read_stream(stream: BinaryIO, name: str) -> list[str]:
    """All lines of an open binary stream (e.g. `sys.stdin.buffer`)."""
    return list(iter_stream(stream, name))


def _open_binary(path: Path) -> BinaryIO:
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except FileNotFoundError:
        raise NmtError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise NmtError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise NmtError(f"{path}: cannot read ({e.strerror})") from None


@contextmanager
def reading(path: Path) -> Iterator[BinaryIO]:
    """`path` opened for binary reading; read failures (gzip included) become NmtErrors naming it."""
    with _open_binary(path) as f:
        try:
            yield f
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise NmtError(f"{path}: not a valid gzip file ({e})") from None
        except OSError as e:
            raise NmtError(f"{path}: cannot read ({e.strerror or e})") from None


def iter_lines(path: str | Path) -> Iterator[str]:
    """Stream the lines of a text file (`.gz` decompressed), without their line breaks."""
    path = Path(path)
    with reading(path) as f:
        yield from iter_stream(f, str(path))


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file (`.gz` decompressed), without their line breaks."""
    return list(iter_lines(path))


def count_lines(path: str | Path, block_size: int = 1 << 20) -> int:
    """Number of lines (a final line without a newline counts), counted fast on the raw bytes.

    The text itself is not validated here; reading it with `iter_lines` does that.
    """
    count, last = 0, b"\n"
    with reading(Path(path)) as f:
        while block := f.read(block_size):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def find_corpus_file(prefix: str | Path, lang: str) -> Path:
    """`PREFIX.LANG`, else `PREFIX.LANG.gz`; an NmtError naming both when neither exists."""
    plain = Path(f"{prefix}.{lang}")
    packed = Path(f"{prefix}.{lang}.gz")
    for candidate in (plain, packed):
        if candidate.is_file():
            return candidate
    raise NmtError(f"{plain}: file not found (nor {packed})")


def iter_parallel(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """Stream aligned (source, target) lines; an NmtError if the files differ in line count."""
    src_lines, tgt_lines = iter_lines(src_path), iter_lines(tgt_path)
    n = 0
    for src in src_lines:
        tgt = next(tgt_lines, None)
        if tgt is None:
            raise mismatch_error(src_path, n + 1 + sum(1 for _ in src_lines), tgt_path, n)
        n += 1
        yield src, tgt
    rest = sum(1 for _ in tgt_lines)
    if rest:
        raise mismatch_error(src_path, n, tgt_path, n + rest)


def count_parallel(src_path: Path, tgt_path: Path) -> int:
    """Number of sentence pairs (fast raw count); an NmtError if the files differ in line count."""
    n_src, n_tgt = count_lines(src_path), count_lines(tgt_path)
    if n_src != n_tgt:
        raise mismatch_error(src_path, n_src, tgt_path, n_tgt)
    return n_src


def mismatch_error(src_path: Path, n_src: int, tgt_path: Path, n_tgt: int) -> NmtError:
    return NmtError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}: a parallel corpus needs "
                    f"one target line per source line")


def parallel_files(prefix: str | Path, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """The two files of the parallel corpus `prefix` (see `find_corpus_file`)."""
    return find_corpus_file(prefix, src_lang), find_corpus_file(prefix, tgt_lang)


def read_parallel(prefix: str | Path, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Both sides of the parallel corpus `prefix`, equal in length and not empty."""
    src_path, tgt_path = parallel_files(prefix, src_lang, tgt_lang)
    pairs = list(iter_parallel(src_path, tgt_path))
    if not pairs:
        raise NmtError(f"{src_path}: empty file (no sentence pairs)")
    return [s for s, _ in pairs], [t for _, t in pairs]
