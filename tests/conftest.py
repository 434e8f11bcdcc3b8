"""Shared fixtures. Tests never touch the network: everything is offline."""

import os
import tempfile

_wandb = tempfile.mkdtemp(prefix="tdlight-wandb-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_DIR": _wandb,
    "WANDB_CACHE_DIR": _wandb,
    "WANDB_CONFIG_DIR": _wandb,
    "WANDB_DATA_DIR": _wandb,
}.items():
    os.environ[key] = value

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_config(**kw):
    from transformers import BertConfig

    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
    base.update(kw)
    return BertConfig(**base)


@pytest.fixture
def tiny_bert():
    """A tiny random BertModel (eval mode) built in-process from a config."""
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_config()).eval()


@pytest.fixture
def tiny_classifier():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config(num_labels=3)).eval()


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained all-MiniLM-L6-v2 shipped in site-packages (offline)."""
    from tdlight.model.teacher import load_teacher

    model, tokenizer = load_teacher("minilm")
    return model, tokenizer


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny random BertForSequenceClassification + word-level tokenizer saved as an HF directory."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    BertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(path)
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    return path


def crash_at(step: int):
    """A Lightning callback that raises after optimizer step ``step`` (a simulated crash)."""
    import lightning as L

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                raise RuntimeError("simulated crash")

    return Crash()


def write_corpus(folder):
    """A tiny gzipped text corpus of the tiny tokenizer's words (30 documents of 3 paragraphs) and a
    plain held-out file of its first 40 lines: ``(corpus path, held-out path)``."""
    import gzip

    words = [f"w{i}" for i in range(94)]
    g = torch.Generator().manual_seed(0)
    lines = []
    for doc in range(30):
        for par in range(3):
            lines.append(" ".join(words[i] for i in torch.randint(0, 94, (12,), generator=g).tolist()))
        lines.append("")
    corpus = folder / "corpus.txt.gz"
    with gzip.open(corpus, "wt") as f:
        f.write("\n".join(lines) + "\n")
    heldout = folder / "heldout.txt"
    heldout.write_text("\n".join(lines[:40]) + "\n")
    return corpus, heldout


# --- running the tdlight command in tests ------------------------------------------------

SMALL = ["stage.limit_train=48", "stage.limit_eval=32", "stage.batch_size=16", "stage.max_length=32",
         "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def cli(out, *overrides: str):
    """``tdlight paths.output_dir=<out> <overrides>`` as a subprocess (its CompletedProcess)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tdlight.cli", f"paths.output_dir={out}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def runs(out, stage: str) -> list:
    """The run directories of ``stage`` under ``out``, oldest first."""
    d = out / stage
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.exists() else []


def compose_cfg(tmp_path, *overrides: str):
    """The tdlight config as the command would compose it (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    from tdlight.config import ROOT, register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def pretrain_inputs(tmp_path_factory, teacher_dir):
    """A decomposed tiny student and a tiny corpus: ``(output dir, decompose run, corpus overrides)``."""
    out = tmp_path_factory.mktemp("pt")
    corpus, heldout = write_corpus(out)
    r = cli(out, "stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12")
    assert r.returncode == 0, r.stderr[-3000:]
    (dec,) = runs(out, "decompose")
    return out, dec, [f"stage.train_files={corpus}", f"stage.heldout_files={heldout}"]
