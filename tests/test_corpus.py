"""Reading corpora: strict UTF-8 with file:line errors, gzip, line endings, parallel checks."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from nmt.data.corpus import (
    count_lines,
    count_parallel,
    find_corpus_file,
    iter_lines,
    read_lines,
    read_parallel,
    read_stream,
)
from nmt.errors import NmtError


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def test_plain_lines_keep_empty_lines_and_inner_spaces(tmp_path):
    path = write(tmp_path / "a.txt", "one  two \n\nthree é\n".encode())
    assert read_lines(path) == ["one  two ", "", "three é"]


def test_windows_line_endings_and_missing_final_newline(tmp_path):
    path = write(tmp_path / "a.txt", b"a b\r\nc\r\nlast")
    assert read_lines(path) == ["a b", "c", "last"]


def test_carriage_return_inside_a_line_and_unicode_separators_do_not_split(tmp_path):
    path = write(tmp_path / "a.txt", "a\rb\nc\u2028d\x85e\n".encode())
    assert read_lines(path) == ["a\rb", "c\u2028d\x85e"]


def test_utf8_byte_order_mark_is_dropped_from_the_first_line_only(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeffhello\n\ufeffkept\n".encode())
    assert read_lines(path) == ["hello", "\ufeffkept"]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.txt", b"fine\nstill fine\nbroken \xff here\n")
    with pytest.raises(NmtError, match=rf"^{path}:3: invalid UTF-8 \(byte 0xff at byte offset 7\)"):
        read_lines(path)


def test_nul_byte_names_file_and_line(tmp_path):
    path = write(tmp_path / "nul.txt", b"a\nb\x00c\n")
    with pytest.raises(NmtError, match=rf"^{path}:2: contains a NUL byte$"):
        read_lines(path)


def test_missing_file(tmp_path):
    with pytest.raises(NmtError, match=rf"^{tmp_path / 'nope.txt'}: file not found$"):
        read_lines(tmp_path / "nope.txt")


def test_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(NmtError, match="is a directory"):
        read_lines(tmp_path)


def test_gzip_is_read_by_suffix(tmp_path):
    path = write(tmp_path / "a.txt.gz", "x y\r\nz é".encode())
    assert read_lines(path) == ["x y", "z é"]
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really compressed


def test_gzip_errors_keep_line_numbers(tmp_path):
    path = write(tmp_path / "a.gz", b"ok\n\xc3\x28\n")
    with pytest.raises(NmtError, match=rf"^{path}:2: invalid UTF-8"):
        read_lines(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "not.gz"
    path.write_bytes(b"plain text pretending\n")
    with pytest.raises(NmtError, match=rf"^{path}: not a valid gzip file"):
        read_lines(path)
    with pytest.raises(NmtError, match="not a valid gzip file"):
        count_lines(path)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(b"line\n" * 5000)[:-30])
    with pytest.raises(NmtError, match=rf"^{path}: not a valid gzip file"):
        read_lines(path)


def test_iter_lines_streams(tmp_path):
    path = write(tmp_path / "a.txt", b"1\n2\n\xff\n")
    lines = iter_lines(path)
    assert next(lines) == "1"  # the bad third line is not read yet
    assert next(lines) == "2"
    with pytest.raises(NmtError, match=":3:"):
        next(lines)


@pytest.mark.parametrize("data, expected", [(b"", 0), (b"a", 1), (b"a\n", 1), (b"a\nb", 2), (b"\n\n", 2),
                                            (b"a\r\nb\r\n", 2)])
@pytest.mark.parametrize("suffix", [".txt", ".gz"])
def test_count_lines_agrees_with_read_lines(tmp_path, data, expected, suffix):
    path = write(tmp_path / f"f{suffix}", data)
    assert count_lines(path) == expected == len(read_lines(path))


def test_count_lines_across_block_boundaries(tmp_path):
    path = write(tmp_path / "f.txt", b"abc\n" * 1000 + b"tail")
    assert count_lines(path, block_size=7) == 1001


def test_read_stream_names_the_stream(tmp_path):
    assert read_stream(io.BytesIO(b"a\r\nb"), "<stdin>") == ["a", "b"]
    with pytest.raises(NmtError, match=r"^<stdin>:2: invalid UTF-8"):
        read_stream(io.BytesIO(b"a\n\xfe\n"), "<stdin>")


def test_find_corpus_file_prefers_plain_then_gz(tmp_path):
    prefix = tmp_path / "train"
    write(tmp_path / "train.de.gz", b"x\n")
    assert find_corpus_file(prefix, "de") == tmp_path / "train.de.gz"
    write(tmp_path / "train.de", b"x\n")
    assert find_corpus_file(prefix, "de") == tmp_path / "train.de"


def test_find_corpus_file_names_both_candidates(tmp_path):
    with pytest.raises(NmtError) as err:
        find_corpus_file(tmp_path / "train", "fr")
    assert f"{tmp_path}/train.fr:" in str(err.value) and f"{tmp_path}/train.fr.gz" in str(err.value)


def test_read_parallel_mixes_plain_and_gzip(tmp_path):
    write(tmp_path / "c.en", b"a\nb\n")
    write(tmp_path / "c.de.gz", b"A\r\nB")
    assert read_parallel(tmp_path / "c", "en", "de") == (["a", "b"], ["A", "B"])


@pytest.mark.parametrize("n_src, n_tgt", [(3, 2), (2, 4)])
def test_read_parallel_line_count_mismatch_names_files_and_counts(tmp_path, n_src, n_tgt):
    src = write(tmp_path / "c.en", b"s\n" * n_src)
    tgt = write(tmp_path / "c.de", b"t\n" * n_tgt)
    message = f"{src} has {n_src} lines but {tgt} has {n_tgt}"
    with pytest.raises(NmtError, match=message):
        read_parallel(tmp_path / "c", "en", "de")
    with pytest.raises(NmtError, match=message):
        count_parallel(src, tgt)


def test_read_parallel_empty_is_an_error(tmp_path):
    write(tmp_path / "c.en", b"")
    write(tmp_path / "c.de", b"")
    with pytest.raises(NmtError, match="empty file"):
        read_parallel(tmp_path / "c", "en", "de")
