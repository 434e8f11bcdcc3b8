"""What the user takes home: files readable as the umask says, directories that load outside tdlight."""

from __future__ import annotations

import os
import stat

import pytest

from tdlight.files import atomic_directory, atomic_write_text


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writers_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    f = atomic_write_text(tmp_path / "a.json", "{}")
    d = atomic_directory(tmp_path / "model", lambda tmp: (tmp / "w.bin").write_bytes(b"x"))
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((d / "w.bin").stat().st_mode) == 0o666 & ~mask
