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
