"""stage=pretrain: the compressed student mimics the teacher on packed text; resumable; chained into distill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import GLUE, cli, compose_cfg, crash_at, needs_data, runs

QUICK = ["stage.max_length=16", "stage.batch_size=4", "stage.max_steps=6", "stage.val_every_n_steps=3",
         "stage.max_heldout_sequences=8", "stage.shuffle_buffer=16", "trainer=cpu", "trainer.enable_progress_bar=false"]


def test_pretrain_reduces_heldout_loss_and_feeds_distill(pretrain_inputs, teacher_dir):
    out, dec, files = pretrain_inputs
    r = cli(out, "stage=pretrain", f"teacher.path={teacher_dir}", f"stage.student={dec}", "stage.lr=1e-3",
            "logger=csv", *files, *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(out, "pretrain")
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 6 and m["tokens"] == 6 * 4 * 16 and m["ratio"] > 1
    (csv,) = [p.read_text() for p in (run / "csv").glob("version_*/metrics.csv")]
    header = csv.splitlines()[0].split(",")
    col = header.index("val/loss")
    vals = [float(row.split(",")[col]) for row in csv.splitlines()[1:] if row.split(",")[col]]
    assert len(vals) == 2 and vals[-1] < vals[0]  # validated at steps 3 and 6, and it learned
    import tdlight

    student = tdlight.load_compressed(run / "model")
    from tdlight.model.surgery import get_encoder

    assert get_encoder(student).compression.rank_in == 8
    assert (run / "checkpoints" / "last.ckpt").is_file()


@needs_data
def test_pretrain_on_the_tasks_own_text(pretrain_inputs, teacher_dir, tmp_path):
    """stage.train_files=task reconstructs the teacher on the task's training text: one example a line
    (a pair's two sentences joined), cached by the hash of the text and named in metrics.json."""
    from tdlight.data.glue import task_text

    out, dec, files = pretrain_inputs
    r = cli(tmp_path, "stage=pretrain", "task=rte", f"teacher.path={teacher_dir}", f"stage.student={dec}",
            "logger=none", files[1], "stage.train_files=task", *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "pretrain")
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 6
    text = Path(m["train_files"])
    assert text.parent == tmp_path / "cache" / "calibration" and text.name.startswith("rte-")
    lines = text.read_text().splitlines()
    assert lines == task_text("rte", "train", data_dir=GLUE) and len(lines) == 2490


def test_pretrain_resume_equals_uninterrupted(pretrain_inputs, teacher_dir, tmp_path):
    from tdlight.stages import pretrain

    out, dec, files = pretrain_inputs
    over = ["stage=pretrain", f"teacher.path={teacher_dir}", f"stage.student={dec}", "logger=none",
            "trainer.checkpoint_every_n_steps=1", *files, *QUICK]
    pretrain.run(compose_cfg(tmp_path, *over), tmp_path / "a")

    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.run(compose_cfg(tmp_path, *over), tmp_path / "b", extra_callbacks=[crash_at(4)])
    cfg = compose_cfg(tmp_path, *over)
    cfg.resume = str(tmp_path / "b")
    pretrain.run(cfg, tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


def test_pretrain_bad_input(pretrain_inputs, teacher_dir, tmp_path):
    out, dec, files = pretrain_inputs
    for extra, msg in ((["stage.student=" + str(dec), "stage.max_steps=0"], "stage.max_steps=0; valid: an integer ≥ 1"),
                       # the old name of the step count is refused by a message that names the new one
                       (["stage.student=" + str(dec), "stage.steps=6"], "'stage.steps' was renamed (override "
                                                                        "'stage.steps=6'); valid: stage.max_steps"),
                       (["stage.student=" + str(dec), "stage.train_files=/no/such.txt"], "/no/such.txt"),
                       (["stage.student=" + str(dec), "stage.train_files=task"],
                        "stage.train_files=task reconstructs the teacher on the task's training text: add task="),
                       ([], "needs a student")):
        r = cli(tmp_path, "stage=pretrain", f"teacher.path={teacher_dir}", *files, *QUICK, *extra)
        assert r.returncode == 2, r.stderr[-2000:]
        assert msg in r.stderr


def test_activation_aware_refinement_lowers_layer_output_error(pretrain_inputs, teacher_dir, tmp_path):
    _, _, files = pretrain_inputs
    corpus = files[0].split("=", 1)[1]
    heldout = files[1].split("=", 1)[1]
    args = ["stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12",
            "stage.refine_steps=15", "stage.refine_lr=3e-3", "stage.batch_size=4", "stage.refine_max_length=16",
            f"stage.refine_files={corpus}", f"stage.heldout_files={heldout}", "stage.heldout_batches=2",
            "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none"]
    r = cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "decompose")
    rep = json.loads((run / "metrics.json").read_text())
    f = rep["refine"]
    assert f["steps"] == 15 and f["layer_error_after"] < f["layer_error_before"]
    assert "layer-output error" in r.stdout
    import tdlight
    from tdlight.model.surgery import get_encoder

    assert get_encoder(tdlight.load_compressed(run / "model")).compression.rank_in == 8
    # the refined decomposition is cached under its own key (refinement settings included)
    r = cli(tmp_path, *args)
    assert json.loads((runs(tmp_path, "decompose")[-1] / "metrics.json").read_text())["refine"] == f
    assert "(cached)" in r.stdout
