"""Corpus files: which files a spec names, each checked to hold text, and reading their lines.

A spec is a path, a directory (every ``.txt``/``.txt.gz``/``.tokens``/``.tokens.gz`` file
directly in it, sorted), a glob, or a list of these; the result is a sorted-per-item,
de-duplicated list of files, each checked to exist and to hold at least one non-blank line.
Files are read as UTF-8 text, ``.gz`` decompressed as it streams; unreadable input is a
:class:`~tdlight.errors.DataError` naming the file.
"""

from __future__ import annotations

import glob as globlib
import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tdlight.errors import DataError

CORPUS_SUFFIXES = (".txt", ".txt.gz", ".tokens", ".tokens.gz")

PathSpec = str | os.PathLike | Sequence[str | os.PathLike]


def resolve_corpus_files(spec: PathSpec, *, what: str = "corpus files") -> list[Path]:
    """The files named by ``spec``, in order, each checked to exist and to hold some text.

    ``spec`` is a path, a directory (every ``*.txt``, ``*.txt.gz``, ``*.tokens``,
    ``*.tokens.gz`` file directly in it, sorted by name), a glob pattern (``*``, ``?``,
    ``[``; matches sorted, ``**`` recursive; matched directories are expanded as above), or
    a list/tuple of these. Files named twice are kept once (first position). ``what`` names
    the setting in error messages (e.g. ``"train_files"``).
    """
    if spec is None or isinstance(spec, (str, os.PathLike)):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise DataError(f"{what} is an empty list; valid: a file, a directory, a glob, or a list of them")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)) or str(item).strip() == "":
            raise DataError(f"{what}: {item!r} is not a path; valid: a file, a directory, a glob, or a list of them")
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_corpus_file(p))
            if not found:
                raise DataError(f"{what}: directory {text!r} holds no corpus file; valid: files ending in "
                                f"{', '.join(CORPUS_SUFFIXES)}")
            files += found
        elif path.is_file():
            files.append(path)
        elif globlib.has_magic(text):
            matches = sorted(globlib.glob(text, recursive=True))
            found = []
            for m in map(Path, matches):
                if m.is_dir():
                    found += sorted(p for p in m.iterdir() if _is_corpus_file(p))
                elif m.is_file():
                    found.append(m)
            if not found:
                raise DataError(f"{what}: glob {text!r} matches no corpus file")
            files += found
        else:
            raise DataError(f"{what}: {text!r} does not exist; valid: an existing file, a directory, or a glob")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for p in unique:
        _check_nonempty(p, what)
    return unique


def _is_corpus_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(CORPUS_SUFFIXES)


def _check_nonempty(path: Path, what: str) -> None:
    try:
        for line in raw_lines(path):
            if line.strip():
                return
    except DataError as e:
        raise DataError(f"{what}: {e}") from e
    raise DataError(f"{what}: corpus file {str(path)!r} is empty (no non-blank line); valid: a text file "
                    f"with one paragraph per line")


def open_text(path: str | os.PathLike):
    """A text-mode (UTF-8) handle on ``path``; ``.gz`` files are decompressed as they stream."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def raw_lines(path: Path) -> Iterator[str]:
    """The lines of ``path`` (newline stripped); unreadable input raises DataError naming it."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                yield line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {str(path)!r}, near line {lineno + 1}: not valid UTF-8 text ({e.reason})") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"corpus file {str(path)!r}: not a readable gzip file ({e})") from e
    except OSError as e:
        raise DataError(f"corpus file {str(path)!r}: cannot be read ({e.strerror or e})") from e
