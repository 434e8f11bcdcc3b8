"""What a run prints: one short line per event, no config dump unless asked, each warning once,
transformers' load report translated, progress bars that read right (tdlight.console, tdlight.cli)."""

import json
import logging
from types import SimpleNamespace

from tests.conftest import SMALL, cli, runs


def test_a_run_prints_no_config_but_where_it_is_and_each_warning_once(tmp_path, teacher_dir):
    # rank 2 with a bank of 2 slices leaves blocks dead: HOOI's warning, shown as a red panel
    r = cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=2", "compression.bank=2",
            "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "decompose")
    assert f"[tdlight] running decompose in {run}" in r.stdout  # one line, without a timestamp
    assert "compression:\n" not in r.stdout and "rank_in:" not in r.stdout  # no config dump
    console = r.stdout + r.stderr
    assert console.count("came back with relative error") == 1, console  # the panel, not a log line too
    log = (run / "tdlight.log").read_text()
    assert log.count("came back with relative error") == 1 and "[WARNING]" in log  # the file keeps it
    assert "resolved spec {" in log and "resolved spec {" not in r.stdout  # the long form: file only
    assert "rel. error (all blocks)" in r.stdout  # the table

    r = cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12",
            "logger=none", "print_config=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compression:\n" in r.stdout and "rank: 8" in r.stdout


def test_a_fit_that_reaches_its_planned_end_says_nothing_of_it_an_early_stop_says_why(tmp_path, teacher_dir):
    common = [f"teacher.path={teacher_dir}", "stage=finetune", "task=mrpc", "logger=csv", *SMALL]
    r = cli(tmp_path, *common, "stage.epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Trainer.fit` stopped" not in r.stdout + r.stderr  # (Lightning's "max_epochs=1 reached")
    # lr 0: the dev score never improves; patience 1 stops after the second epoch and says so
    r = cli(tmp_path, *common, "stage.epochs=4", "stage.lr=1e-12", "stage.patience=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped early after epoch 2 of 4: val/score had not improved for 1 epoch(s)" in r.stdout + r.stderr, \
        (r.stdout + r.stderr)[-3000:]
    (_, run) = runs(tmp_path, "finetune")
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 2


def test_the_console_filter_keeps_file_only_records_off_the_console():
    from tdlight.console import FILE_ONLY, ConsoleFilter

    make = logging.getLogger("tdlight.test").makeRecord
    plain = make("tdlight.test", logging.WARNING, __file__, 1, "shown", (), None)
    quiet = make("tdlight.test", logging.WARNING, __file__, 1, "file only", (), None, extra=FILE_ONLY)
    assert ConsoleFilter().filter(plain) and not ConsoleFilter().filter(quiet)


def test_a_classifier_load_says_what_is_new_in_one_line_instead_of_the_load_report(minilm, caplog, capfd):
    from tdlight.model.teacher import load_classifier

    with caplog.at_level(logging.INFO, logger="tdlight.model"):
        load_classifier("minilm", 3)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "\x1b[" not in out + err
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tdlight.model"]
    assert line == "minilm: a new task head (3 output(s)) starts at random: classifier.bias, classifier.weight"


def test_a_classifier_load_warns_when_encoder_weights_are_missing(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from tdlight.model.teacher import load_classifier
    from tests.conftest import save_tiny_teacher

    (tmp_path / "v").mkdir()
    path = save_tiny_teacher(tmp_path / "t", tmp_path / "v")
    weights = load_file(path / "model.safetensors")
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="tdlight.model"):
        load_classifier(str(path), 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 weight(s) missing from the checkpoint" in warnings[0]
    assert "encoder.layer.1.output.dense.weight" in warnings[0]


def test_the_progress_bar_reads_steps_for_a_step_budget_and_hides_metrics_without_a_value(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from tdlight.stages.trainer import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=200)
    assert bar._get_train_description(0).startswith("Steps (budget 200)")  # was "Epoch 0/-2"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).startswith("Epoch 1/2")

    def metrics(self, trainer, module):
        return {"val/score": float("-inf"), "train/loss": 0.5, "v_num": "a1"}

    monkeypatch.setattr(RichProgressBar, "get_metrics", metrics)  # what Lightning's bar would show
    assert bar.get_metrics(None, None) == {"train/loss": 0.5, "v_num": "a1"}


def test_wandb_run_names_read_stage_task_and_ratio_and_a_pipeline_syncs_in_one_command(tmp_path):
    from tdlight.stages.loggers import run_name, sync_command
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc")
    assert run_name(cfg, tmp_path / "pipeline-1bdd", {"task": "mrpc", "ratio": 7.06}) == "distill/mrpc/7.1x/pipeline-1bdd"
    cfg = compose_cfg(tmp_path, "stage=finetune", "task=mrpc")
    assert run_name(cfg, tmp_path / "r", {"task": "mrpc", "ratio": 1.0}) == "finetune/mrpc/r"  # a dense model
    cfg = compose_cfg(tmp_path, "stage=pretrain")
    assert run_name(cfg, tmp_path / "r", {"ratio": 48.2}) == "pretrain/48.2x/r"

    steps = [tmp_path / "finetune" / "a", tmp_path / "distill" / "b", tmp_path / "decompose" / "c"]
    for d in steps[:2]:
        (d / "wandb" / f"offline-run-20261205_1-{d.name}").mkdir(parents=True)
    assert sync_command(steps) == (f"wandb sync {steps[0]}/wandb/offline-run-20261205_1-a "
                                   f"{steps[1]}/wandb/offline-run-20261205_1-b")
    assert sync_command(steps[2:]) is None


def test_a_tiny_run_in_a_real_terminal_prints_no_dump_no_report_and_each_line_once(tmp_path, teacher_dir):
    """The console a user sees: the run in a pseudo-terminal (rich's bars and colours on, as in a shell),
    W&B offline on — no config dump, no dependency report or banner, no line printed twice."""
    import os
    import re
    import select
    import subprocess
    import sys

    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    cmd = [sys.executable, "-m", "tdlight.cli", f"paths.output_dir={tmp_path}", "stage=finetune", "task=mrpc",
           f"teacher.path={teacher_dir}", "stage.epochs=1", "logger=wandb",
           *[a for a in SMALL if not a.startswith("trainer.enable_progress_bar")]]
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # (the child closed the terminal)
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    assert p.wait(timeout=60) == 0, out.decode(errors="replace")[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", out.decode(errors="replace")).replace("\r", "\n")
    assert "tdlight finetune: mrpc" in text  # the result table reached the terminal
    for noise in ("rank_in:", "compression:\n", "LOAD REPORT", "GPU available", "Trainer.fit` stopped", "wandb:",
                  "Traceback"):
        assert noise not in text, (noise, text[-3000:])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[tdlight")]
    assert lines and len(lines) == len(set(lines)), lines  # each event once
