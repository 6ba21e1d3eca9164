"""glibc malloc tuning: applied on glibc, a no-op elsewhere or when the user set glibc's own variables."""

from __future__ import annotations

import ctypes
import sys

import pytest

from nmt import allocator


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="needs glibc")
def test_applied_on_glibc(monkeypatch):
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert allocator.tune_allocator() is True


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_users_own_malloc_variables_win(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert allocator.tune_allocator() is False


def test_no_op_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.tune_allocator() is False
