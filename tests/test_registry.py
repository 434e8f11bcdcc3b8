"""The stage protocol: a stage is its module (check + run), its schema and one registry record —
proved by adding one from outside the package and running it through the `tdlight` command."""

from __future__ import annotations

import json

from tdlight.stages.registry import STAGES, StageRecord, register
from tests.conftest import tdlight
from tests.toy_stage import ToyStage


def _tdlight(*args: str) -> tuple[int, str, str]:
    """The `tdlight` command in this process (the toy record exists only here): exit code, stdout, stderr."""
    r = tdlight(*args)  # (conftest.tdlight_in_process: puts back the logging Hydra configures for its job)
    return r.returncode, r.stdout, r.stderr


def test_a_stage_from_outside_the_package_is_one_record(tmp_path, monkeypatch):
    monkeypatch.setitem(STAGES, "toy", StageRecord("toy", ToyStage, artifact="metrics.json", resumable=False,
                                                   module="tests.toy_stage"))
    register()  # (the CLI calls it too: `stage=toy` is the record's schema)
    code, out, err = _tdlight(f"paths.output_dir={tmp_path}", "stage=toy", "stage.repeat=3",
                              "seed=7")
    assert code == 0, err[-2000:]
    (run,) = (tmp_path / "toy").iterdir()
    assert json.loads((run / "metrics.json").read_text()) == {"stage": "toy", "echo": [7, 7, 7]}
    # its check runs before work, in a run and in a dry run; its schema types its keys
    for args, message in ((["stage.repeat=0"], "stage.repeat=0; valid: an integer ≥ 1"),
                          (["stage.repeat=0", "dry_run=true"], "stage.repeat=0; valid"),
                          (["stage.repeat=many"], "stage.repeat")):
        code, out, err = _tdlight(f"paths.output_dir={tmp_path / 'bad'}", "stage=toy", *args)
        assert code == 2 and message in err, (args, code, err[-2000:])
    assert not (tmp_path / "bad").exists()
    code, out, err = _tdlight(f"paths.output_dir={tmp_path / 'dry'}", "stage=toy", "dry_run=true")
    assert code == 0 and "dry run: the toy settings above pass every check" in out, err[-2000:]
    assert not (tmp_path / "dry").exists()
