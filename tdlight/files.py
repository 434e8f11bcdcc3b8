"""Files and hashes: atomic writes and the identities that cache keys are made of.

The bottom of the package beside :mod:`tdlight.errors`: plain Python and torch, no
transformers, no Lightning, nothing else of tdlight. Model saving (:mod:`tdlight.model.io`),
the CLI, the stages, the sweeps and the data caches all write and fingerprint through it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def state_fingerprint(state: dict[str, torch.Tensor], salt: bytes = b"", extra: str = "") -> str:
    """SHA-1 (hex) of ``salt``, every tensor of ``state`` (name, dtype, raw bytes; by name) and
    ``extra``: the identity of a set of weights for caches keyed by them."""
    h = hashlib.sha1(salt)
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(extra.encode())
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> dict:
    """The identity of a file for cache keys: its resolved path, size and SHA-256 — not its modification
    time, so the same bytes written anew (a data folder restored, or copied without keeping times)
    keep every cached step and tokenization, and an edit that keeps the time is still seen. The hash
    is read once per version of a file in a process (42 MB of GLUE and corpus: well under a second)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"file": str(p), "size": st.st_size,
            "sha256": _sha256_of(str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)}


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    # the stat numbers only key this memo; ctime moves on every write (and cannot be set back), so a file
    # rewritten during the process, its mtime restored or not, is hashed again
    return file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB chunks (about 1 s per GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: POSIX offers no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have: ``mode`` less the umask.
    mkstemp/mkdtemp make their files 0600 and directories 0700 whatever the umask, so a model
    written through them could not be read by another user or a serving process."""
    os.chmod(path, mode & ~_umask())


def temporary_directory(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` (for a write that is renamed into place),
    with the permissions of a plain ``mkdir`` under the process's umask."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _honour_umask(tmp, 0o777)
    return tmp


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (a model directory: what a user ships and downloads)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmpdir)`` then move the result to ``path`` (replacing it only on success).
    The directory gets the permissions of a plain ``mkdir`` under the process's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_directory(path.parent, f".{path.name}.tmp-")
    try:
        write(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Make the file ``path`` with ``write(tmp)`` (a temporary sibling), then rename it into place:
    an existing file is replaced only by a complete new one. The file gets the permissions of a
    plain ``open`` under the process's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _honour_umask(Path(tmp), 0o666)  # after write: a writer that replaced the file made it anew
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary sibling and a rename."""
    return atomic_file(path, lambda tmp: tmp.write_text(text))


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def write_obstacle(target: str | os.PathLike) -> str | None:
    """Why the atomic writers (:mod:`tdlight.files`) could not make the file ``target``, or None.
    Tried, not inferred from permission bits (root ignores them; a read-only file system does not):
    the temporary sibling they would create is created and removed, or, where ``target``'s folder
    does not exist yet, a temporary folder in its nearest existing ancestor (which they would
    create it in)."""
    target = Path(target)
    parent = target.parent
    ancestor = nearest_existing(parent)
    if not ancestor.is_dir():
        return f"{str(ancestor)!r} is a file, not a directory"
    try:
        if ancestor == parent:
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".tdlight-probe-", dir=ancestor))
    except OSError as e:
        return f"{e.strerror or e} in {str(ancestor)!r}"
    return None
