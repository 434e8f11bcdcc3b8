"""benchmarks/pooled_spread.py's linear probe: what a linear head can read from a model's pooled states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import GLUE, needs_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pooled_spread.py"


def _module():
    """The script as a module, loaded from its path (benchmarks/ is not a package; not put on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pooled_spread", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_probe_reads_a_separable_signal_and_not_noise():
    linear_probe = _module().linear_probe

    g = torch.Generator().manual_seed(0)
    y_train, y_dev = torch.randint(0, 2, (400,), generator=g), torch.randint(0, 2, (300,), generator=g)

    def feats(y):  # class information in one of 16 directions, noise in all of them
        x = torch.randn(len(y), 16, generator=g)
        x[:, 3] += 4.0 * (2 * y.float() - 1)
        return x

    good = linear_probe("cola", feats(y_train), y_train.tolist(), feats(y_dev), y_dev.tolist())
    assert good["matthews_correlation"] > 0.95 and good["balanced_accuracy"] > 0.97
    noise = linear_probe("cola", torch.randn(400, 16, generator=g), y_train.tolist(),
                         torch.randn(300, 16, generator=g), y_dev.tolist())
    assert abs(noise["matthews_correlation"]) < 0.2 and set(noise) >= {"score", "top_share", "balanced_accuracy"}


@needs_data
def test_probe_column_on_real_cola_and_a_clear_refusal(tmp_path):
    """The packaged MiniLM on CoLA (100 dev sentences, a probe on 300 training sentences); a regression task
    or a negative count is refused naming the value."""
    run = [sys.executable, str(SCRIPT), "--data-dir", str(GLUE)]
    out = subprocess.run(run + ["--task", "cola", "--n", "100", "--probe", "300", "minilm=minilm"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| minilm |")]
    assert len(rows) == 1 and "linear probe (300 train)" in out.stdout
    score, balanced, top = (float(v) for v in rows[0].split("|")[-2].split("/"))
    assert -1 <= score <= 1 and 0 <= balanced <= 1 and 0.5 <= top <= 1
    bad = subprocess.run(run + ["--task", "stsb", "--probe", "10", "m=minilm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "regression" in bad.stderr and "stsb" in bad.stderr
    bad = subprocess.run(run + ["--task", "cola", "--n", "-1", "m=minilm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--n=-1" in bad.stderr


def test_teacher_readout_finds_a_linear_teacher_and_nothing_in_noise():
    """The ridge readout: logits that are a linear function of the features (plus a little noise) are read
    back (held-out R² near 1, the fitted head agrees with the labels they encode); features unrelated to the
    logits give R² near or below 0. A regression task reads its score the same way."""
    teacher_readout = _module().teacher_readout

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 2, generator=g)
    x, dev_x = torch.randn(500, 16, generator=g), torch.randn(200, 16, generator=g)
    logits = x @ w + 0.05 * torch.randn(500, 2, generator=g)
    dev_y = (dev_x @ w).argmax(1).tolist()
    good = teacher_readout("cola", x, logits, dev_x, dev_y)
    assert good["r2"] > 0.95 and good["balanced_accuracy"] > 0.95 and good["alpha"] > 0
    noise = teacher_readout("cola", torch.randn(500, 16, generator=g), logits, dev_x, dev_y)
    assert noise["r2"] < 0.1 and abs(noise["matthews_correlation"]) < 0.3
    score = x @ w[:, :1]
    reg = teacher_readout("stsb", x, score, dev_x, (dev_x @ w[:, :1]).squeeze(1).tolist())
    assert reg["r2"] > 0.99 and reg["pearson"] > 0.99


@needs_data
def test_readout_column_reads_a_models_own_head_back_and_refuses_a_tiny_count():
    """--readout with the packaged MiniLM as its own 'teacher': its logits are its head's linear function of the
    very pooled states read, so R² is ~1, whatever head it was given; a count too small to hold out is refused."""
    run = [sys.executable, str(SCRIPT), "--data-dir", str(GLUE), "--task", "sst2", "--n", "64"]
    out = subprocess.run(run + ["--readout", "minilm", "--readout-n", "1000", "self=minilm"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "teacher readout (1000 train): held-out R²" in out.stdout
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| self |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) > 0.95, row
    score, balanced, top = (float(v) for v in cells[4].split("/"))
    assert 0 <= score <= 1 and 0 <= balanced <= 1 and 0.5 <= top <= 1
    bad = subprocess.run(run + ["--readout", "minilm", "--readout-n", "5", "m=minilm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--readout-n=5" in bad.stderr
