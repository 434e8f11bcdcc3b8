"""``stage=decompose``: decompose the teacher's encoder, save the compressed model, report.

Writes into the run directory: ``model/`` (a compressed model directory, loadable with
``tdlight.load_compressed``) and ``metrics.json`` (parameters, ratio, errors, time).

``stage.fit`` chooses what the factors fit: ``weights`` (HOOI on the weights, the paper)
or ``outputs`` (function-preserving, DESIGN §6: HOOI, then a refit of every block's outputs
on ``stage.calibration_sequences`` sequences of ``stage.calibration_files``; the report's
``fit`` section holds the held-out output errors per layer and of the last hidden state for
the HOOI start and for the fit, and the dead blocks of each). Then ``stage.fit_passes``
passes refit the factors on the compressed model's own inputs (``stage.fit_refit``:
layerwise | global | both; ``stage.fit_bias``: biases in closed form), each kept only if the
held-out last-hidden-state error improves; ``fit.refit`` holds every pass's held-out errors.
The saved model is the last kept pass; the weight errors in the report are those of the
output fit before the refit.

Whole-model compression: ``compression.embedding_rank`` / ``compression.vocab`` compress the
word embeddings too. The text they need is tokenized here (:func:`tdlight.data.vocab.token_stats`):
the ``vocab`` source (a corpus path, or ``task``: the task's training text) gives the kept tokens,
and ``compression.embedding_weighting=frequency`` weights the rows by the counts of that text,
or of ``stage.calibration_files`` (at most :data:`COUNT_CHARS` characters) when the vocabulary is
full. ``metrics.json`` adds the ``embedding`` fit and the whole-model parameters and ratio.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tdlight.config import compression_spec, task_options
from tdlight.data.corpus.datamodule import CorpusDataModule
from tdlight.data.corpus.files import resolve_corpus_files
from tdlight.data.vocab import token_stats
from tdlight.console import FILE_ONLY
from tdlight.errors import TdlightError
from tdlight.files import atomic_directory, atomic_write_text, file_stamp, state_fingerprint
from tdlight.model.calibration import collect_grams, fit_outputs, output_errors, refit_outputs
from tdlight.model.io import save_compressed
from tdlight.model.pooling import pooling_of
from tdlight.model.surgery import compress, count_parameters, encoder_shape, encoder_weights
from tdlight.model.teacher import load_teacher, teacher_shape
from tdlight.stages.loggers import build_loggers, end_loggers, log_metrics
from tdlight.stages.registry import settings
from tdlight.stages.runs import TASK_TEXT, check_positions, check_teacher_weights, task_text_file, teacher_source
from tdlight.stages.schemas import DecomposeStage, Fit
from tdlight.stages.trainer import build_trainer
from tdlight.stages.refine import RefineModule, heldout_error
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.decompose import DEAD_BLOCK_ERROR
from tdlight.tensor.spec import TASK_VOCAB, resolve
from tdlight.tensor.variants import variant_of

log = logging.getLogger("tdlight.decompose")

METRICS = "metrics.json"  # what every stage's finished run reports in
FIT_KEYS = ("fit", "calibration_files", "calibration_sequences", "calibration_max_length", "calibration_damp",
            "fit_iters", "fit_passes", "fit_refit", "fit_bias", "heldout_files", "heldout_batches", "batch_size")
REFINE_KEYS = ("refine_steps", "refine_lr", "refine_max_length", "refine_files", "batch_size", "heldout_files",
               "heldout_batches")
COUNT_CHARS = 10_000_000  # characters of stage.calibration_files read for frequency-weighted embedding rows


def resolve_device(trainer) -> torch.device:
    """Where the decomposition runs, from ``trainer.accelerator`` (auto | cpu | gpu/cuda) and, for a
    GPU, ``trainer.devices`` (a count uses the first; a list ``[N]`` picks GPU N) — the same two
    settings that place the training stages."""
    acc = str(trainer.accelerator)
    if acc == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if acc == "cpu":
        return torch.device("cpu")
    if acc not in ("gpu", "cuda"):
        raise TdlightError(f"trainer.accelerator={acc!r}: the decomposition runs on auto, cpu, gpu or cuda")
    if not torch.cuda.is_available():
        raise TdlightError(f"trainer.accelerator={acc!r} but no CUDA GPU is available; valid: trainer.accelerator=cpu or auto")
    devices = trainer.devices
    index = devices[0] if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else 0
    if not isinstance(index, int) or not 0 <= index < torch.cuda.device_count():
        raise TdlightError(f"trainer.devices={devices!r}: no such GPU; valid: 0..{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def cache_key(model: torch.nn.Module, rspec) -> str:
    """Hash of the teacher's weights (every tensor's bytes) and the resolved compression spec."""
    return state_fingerprint(model.state_dict(), b"tdlight-decompose-v1",
                             json.dumps(rspec.to_dict(), sort_keys=True))[:20]


def _file_stamps(st: DecomposeStage, names) -> dict:
    """Path, size and SHA-256 of every file the settings ``stage.<name>`` read (directories and globs
    expanded), for the cache key: a file edited in place, or a directory that gained one, is new input."""
    out = {}
    for name in names:
        value = getattr(st, name)
        if value is None:
            continue
        out[name] = [file_stamp(f) for f in resolve_corpus_files(value, what=f"stage.{name}")]
    return out


def _from_cache(entry: Path, run_dir: Path, save_model: bool) -> dict | None:
    report = entry / METRICS
    if not report.is_file():
        report = entry / "report.json"  # the name before 2026-12 (a cache entry is never rewritten)
    if not report.is_file() or not (entry / "model" / "tdlight.json").is_file():
        return None
    if save_model:
        atomic_directory(run_dir / "model", lambda tmp: shutil.copytree(entry / "model", tmp, dirs_exist_ok=True))
    return json.loads(report.read_text())


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    """Every check of a decomposition's settings that loads no model (the stage protocol of
    :mod:`tdlight.stages.registry`): the device, the compression spec, the refinement, the teacher
    weights, the output fit and the files it reads, and the teacher given — unless ``wired`` (a
    pipeline fills ``teacher.run_dir`` from a step that has not run yet). Errors name the keys as
    ``where`` (``stage``, or ``stage.decompose`` in a pipeline) spells them."""
    resolve_device(cfg.trainer)
    spec = compression_spec(cfg.compression)
    st = settings(cfg)
    check_teacher_weights(cfg, st.teacher_weights, where)
    _check_fit(cfg, st, where)
    # the ranks against the teacher's sizes, read from its config.json (a fine-tuned teacher a pipeline
    # has not made yet has the sizes of the one it starts from)
    resolve(spec, teacher_shape(cfg.teacher.path if "teacher.run_dir" in wired else teacher_source(cfg)))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    check(cfg)
    st = settings(cfg)
    console = Console(stderr=True)
    device = resolve_device(cfg.trainer)
    spec = compression_spec(cfg.compression)
    source = teacher_source(cfg)
    # the student records the pooling its classifier will read (the teacher's: mean for the embedded
    # MiniLM, whose pooling is its sentence-transformers config's until a fine-tune saves it), so a
    # stand-alone evaluation of the decomposition reads what distillation will; part of the cache key
    teacher, tokenizer = load_teacher(source, pooling=cfg.teacher.pooling.value)
    shape = encoder_shape(teacher)
    rspec = resolve(spec, shape)  # bad ranks fail here, before any work
    before = count_parameters(teacher)
    log.info("teacher %s: %d layers, hidden %d, FFN %d; ranks d_in=%d d_out=%d, banks %s", source, shape.num_layers,
             shape.hidden, shape.intermediate, rspec.rank_in, rspec.rank_out, rspec.banks)
    log.info("teacher %s: %s; resolved spec %s", source, shape, rspec.to_dict(), extra=FILE_ONLY)
    refine = st.refine_steps
    outputs = st.fit is Fit.outputs
    if outputs and tokenizer is None:
        raise TdlightError("stage.fit=outputs needs the teacher's tokenizer to read calibration text")
    check_positions(teacher, **{"stage.calibration_max_length": st.calibration_max_length if outputs else None,
                                "stage.refine_max_length": st.refine_max_length if refine else None})
    if outputs and st.calibration_files == TASK_TEXT:
        # the file's name holds a hash of its text: the decomposition cache key follows the task and its data
        st.calibration_files = str(task_text_file(cfg))
    tokens = _embedding_tokens(cfg, st, spec, tokenizer, shape.vocab_size, console)
    if tokens is not None and spec.vocab is not None:  # the kept vocabulary's size, now that its text is read
        rspec = resolve(spec, shape, vocab_size=int(tokens.kept_ids().numel()))
    # decompose trains nothing, but is a W&B run (and a CSV log) like the other steps: each HOOI and
    # output-fit sweep's error, then the result (ratio, errors, dead blocks) as the run's summary
    loggers = build_loggers(cfg, run_dir, {"ratio": param_counts(shape, rspec)["ratio"]})
    try:
        result = _decompose(cfg, st, run_dir, console, device, source, teacher, tokenizer, shape, rspec, tokens,
                            outputs, refine, before, loggers)
    except BaseException:
        for lg in loggers:
            lg.finalize("failed")
        raise
    end_loggers(loggers, _summary(result), model_dir=run_dir / "model")
    return result


def _summary(r: dict) -> dict:
    """The scalars of a decomposition's result a run summary shows (W&B), its fit's beside HOOI's."""
    out = {k: r[k] for k in ("ratio", "model_ratio", "rel_error", "seconds") if isinstance(r.get(k), (int, float))}
    out["dead_blocks"] = len(r.get("dead_blocks") or [])
    out.update({f"type_error/{k}": v for k, v in (r.get("type_errors") or {}).items()})
    fit = r.get("fit") or {}
    for when in ("hooi", "outputs"):
        if isinstance((fit.get(when) or {}).get("last_hidden"), (int, float)):
            out[f"fit/{when}/last_hidden"] = fit[when]["last_hidden"]
            out[f"fit/{when}/dead_blocks"] = len(fit[when].get("dead_blocks") or [])
    if r.get("cached"):
        out["cached"] = 1
    return out


def _decompose(cfg, st, run_dir, console, device, source, teacher, tokenizer, shape, rspec, tokens, outputs, refine,
               before, loggers) -> dict:
    entry = None
    steps = iter(range(1 << 30))  # one step per logged sweep (HOOI, then the output fit)
    if st.cache:
        key = cache_key(teacher, rspec)
        # the pooling the student records: a hook or a config entry leaves the weights as they are
        extra = {"pooling": pooling_of(teacher)} if pooling_of(teacher) != "cls" else {}
        if refine:  # a refined decomposition also depends on how it was refined
            extra.update({k: getattr(st, k) for k in REFINE_KEYS})
            extra["refine_file_stamps"] = _file_stamps(st, ("refine_files", "heldout_files"))
        if outputs:  # ... and an output fit on its calibration (and held-out) text
            extra.update({k: getattr(st, k) for k in FIT_KEYS})
            extra["fit_file_stamps"] = _file_stamps(st, ("calibration_files", "heldout_files"))
        if tokens is not None:  # ... and compressed embeddings on the token counts of their text
            extra["embedding_tokens"] = state_fingerprint(
                {"counts": tokens.counts}, extra=json.dumps([tokens.special_ids, tokens.unk_id]))[:20]
        if extra:
            key = hashlib.sha1((key + json.dumps(extra, sort_keys=True)).encode()).hexdigest()[:20]
        entry = Path(cfg.paths.cache_dir) / "decompose" / key
        cached = _from_cache(entry, run_dir, st.save_model)
        if cached is not None:
            cached.update(cached=str(entry), teacher=source)
            atomic_write_text(run_dir / METRICS, json.dumps(cached, indent=2))
            Console().print(_table(cached))
            log.info("reused the cached decomposition %s (same teacher weights and spec)", entry)
            return cached
    reference = copy.deepcopy(teacher) if refine or outputs else None  # compress() works in place
    teacher.to(device)
    calibration = _calibration(st, cfg.seed, teacher, tokenizer, console) if outputs else None

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        tasks = {g: progress.add_task(f"HOOI {g}", total=rspec.max_iter, status="")
                 for g in rspec.layout.groups} if rspec.strategy.iterative else {}

        def on_sweep(group: str, sweep: int, err: float) -> None:
            progress.update(tasks[group], completed=sweep, status=f"sweep {sweep}  rel. error {err:.4f}")
            log_metrics(loggers, {f"hooi/{group}/rel_error": err, "hooi/sweep": sweep}, next(steps))

        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = compress(teacher, rspec, callback=on_sweep if tasks else None, tokens=tokens)
        seconds = time.perf_counter() - t0
        for g, task in tasks.items():
            progress.update(task, completed=rspec.max_iter)
    for w in caught:
        if outputs:  # HOOI is only the start of the output fit
            console.print(f"[yellow]note (HOOI start, before the output fit)[/]: {w.message}")
            log.info("HOOI start: %s", w.message, extra=FILE_ONLY)  # (on the console above)
        else:
            console.print(f"[bold red]WARNING[/]: {w.message}")
            log.warning("%s", w.message, extra=FILE_ONLY)
    fitted = None
    if outputs:
        t1 = time.perf_counter()
        fitted = _fit_outputs(st, teacher, reference, report, calibration, device, console,
                              record=lambda m: log_metrics(loggers, m, next(steps)))
        seconds += time.perf_counter() - t1

    refined = _refine(cfg, st, teacher, reference, tokenizer, run_dir, console, loggers) if refine else None
    after = count_parameters(teacher)
    rspec = report.spec  # (with the kept vocabulary's size)
    formula = param_counts(shape, rspec)
    for part in ("encoder", "embeddings"):  # the model and the accounting must agree
        if after[part] != formula[part]:
            raise AssertionError(f"parameter accounting mismatch ({part}): model {after[part]} vs formula {formula[part]}")
    result = {
        "teacher": source,
        "spec": rspec.to_dict(),
        "parameters_before": before,
        "parameters_after": after,
        "ratio": formula["ratio"],
        # the whole model (embeddings + encoder; pooler and heads aside), the user's file beside the paper's ratio
        "model_parameters_before": formula["dense_model"],
        "model_parameters_after": formula["model"],
        "model_ratio": formula["model_ratio"],
        "embedding": report.embedding,
        "rel_error": report.rel_error,
        "type_errors": report.type_errors,
        "block_errors": report.block_errors,
        "dead_blocks": report.dead_blocks,
        "sweeps": {g: d.iterations for g, d in report.decompositions.items()},
        "seconds": seconds,
        "device": str(device),
        "pooling": pooling_of(teacher),  # what the student's classifier reads (recorded in its config.json)
    }
    if fitted is not None:
        result.update(fitted.pop("weight_errors"))
        result["fit"] = fitted
    if refined is not None:
        result["refine"] = refined
    if st.save_model:
        save_compressed(teacher.cpu(), run_dir / "model", tokenizer, extra={"teacher": source})
        if entry is not None:  # keep a copy for later runs with the same inputs
            atomic_directory(entry / "model", lambda tmp: shutil.copytree(run_dir / "model", tmp, dirs_exist_ok=True))
            atomic_write_text(entry / METRICS, json.dumps(result, indent=2))
    atomic_write_text(run_dir / METRICS, json.dumps(result, indent=2))
    Console().print(_table(result))
    # (the table above says it on the console; its rel. error is the saved model's, the fit's when there is one)
    log.info("ratio %.2f, rel. error %.4f, %.1f s; model in %s", result["ratio"], result["rel_error"], seconds, run_dir,
             extra=FILE_ONLY)
    return result


def _embedding_tokens(cfg: DictConfig, st: DecomposeStage, spec, tokenizer, vocab_size: int, console: Console):
    """The token statistics compressed embeddings need (:func:`tdlight.data.vocab.token_stats`), or None:
    the ``compression.vocab`` text (all of it), else for ``frequency`` weighting the calibration text."""
    if spec.vocab is None and spec.embedding_weighting != "frequency":
        return None
    if spec.vocab is not None:
        source, what, limit = spec.vocab, "compression.vocab", None
    else:
        source, limit = st.calibration_files, COUNT_CHARS
        what = "stage.calibration_files (the token counts of compression.embedding_weighting=frequency)"
    if source == TASK_VOCAB:  # the same word as stage.calibration_files=task
        if cfg.get("task") is None:
            raise TdlightError(f"{what}={TASK_VOCAB} reads the task's training text: add task=<name>; "
                               f"valid: {task_options()}")
        source = str(task_text_file(cfg))
    t0 = time.perf_counter()
    stats = token_stats(tokenizer, source, vocab_size, what=what, max_chars=limit)
    seen = int((stats.counts > 0).sum())
    console.print(f"embeddings: {int(stats.counts.sum()):,} tokens of {stats.source} ({seen:,} distinct of "
                  f"{vocab_size:,}) in {time.perf_counter() - t0:.1f} s")
    return stats


def _refine(cfg: DictConfig, st: DecomposeStage, student, teacher, tokenizer, run_dir: Path, console: Console,
            loggers: list) -> dict:
    """Activation-aware refinement of the factors (see :mod:`tdlight.stages.refine`)."""
    if tokenizer is None:
        raise TdlightError("refinement needs the teacher's tokenizer to read calibration text")
    dm = CorpusDataModule(tokenizer, train_files=st.refine_files, heldout_files=st.heldout_files,
                          max_length=st.refine_max_length, batch_size=st.batch_size, seed=cfg.seed,
                          max_heldout_sequences=st.batch_size * st.heldout_batches)
    heldout = list(dm.val_dataloader())
    before = heldout_error(student, teacher, heldout)
    module = RefineModule(student, teacher, lr=st.refine_lr, steps=st.refine_steps)
    cfg_t = OmegaConf.merge(cfg, {"trainer": {"max_steps": st.refine_steps,
                                              "limit_val_batches": 0, "num_sanity_val_steps": 0}})
    trainer = build_trainer(cfg_t, run_dir, max_epochs=-1, monitor=None, summary={"refine_steps": st.refine_steps},
                            loggers=loggers)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    student.requires_grad_(True)
    after = heldout_error(student.cpu(), teacher.cpu(), heldout)
    console.print(f"refinement: layer-output rel. error {before:.4f} -> {after:.4f} "
                  f"({st.refine_steps} steps of {st.batch_size}x{st.refine_max_length} tokens)")
    return {"steps": st.refine_steps, "layer_error_before": before, "layer_error_after": after,
            "tokens": st.refine_steps * st.batch_size * st.refine_max_length}


def _check_fit(cfg: DictConfig, st: DecomposeStage, where: str = "stage") -> None:
    """An output fit's text, checked before any work: the task for ``calibration_files=task``, and the
    calibration and held-out files (each setting's range is its schema field's)."""
    if st.fit is not Fit.outputs:
        return
    if st.calibration_files == TASK_TEXT and cfg.get("task") is None:
        raise TdlightError(f"{where}.calibration_files={TASK_TEXT} calibrates on the task's training text: add "
                           f"task=<name>; valid: {task_options()}")
    for name in ("calibration_files", "heldout_files"):
        v = getattr(st, name)
        if name == "calibration_files" and v == TASK_TEXT:
            continue
        resolve_corpus_files(v, what=f"{where}.{name}")


def _calibration(st: DecomposeStage, seed: int, teacher, tokenizer, console: Console) -> dict:
    """Calibration batches -> the teacher's input Grams; plus the held-out batches."""
    files = {"train": st.calibration_files, "heldout": st.heldout_files}
    want = st.calibration_sequences
    heldout_n = st.batch_size * st.heldout_batches
    dm = CorpusDataModule(tokenizer, train_files=files["train"], heldout_files=files["heldout"],
                          max_length=st.calibration_max_length, batch_size=min(16, want), shuffle_buffer=0,
                          eval_batch_size=st.batch_size, max_train_sequences=want,
                          max_heldout_sequences=heldout_n, seed=seed)
    batches = list(dm.train_dataloader())
    got = sum(len(b["input_ids"]) for b in batches)
    if got < want:
        raise TdlightError(f"stage.calibration_files={files['train']!r} hold only {got} sequences of "
                           f"{st.calibration_max_length} tokens; stage.calibration_sequences={want} needs more text "
                           f"(valid: more or longer files, or stage.calibration_sequences ≤ {got})")
    heldout = list(dm.val_dataloader())
    if not heldout:
        raise TdlightError(f"stage.heldout_files={files['heldout']!r} hold no sequence of "
                           f"{st.calibration_max_length} tokens; valid: a held-out file with more text")
    t0 = time.perf_counter()
    with console.status(f"calibration: the input Grams of every encoder linear on {got} sequences …"):
        grams, tokens = collect_grams(teacher, batches)
    console.print(f"calibration: input Grams of every encoder linear from {got} sequences ({tokens:,} tokens) "
                  f"in {time.perf_counter() - t0:.1f} s")
    return {"grams": grams, "tokens": tokens, "sequences": got, "heldout": heldout, "batches": batches,
            "heldout_sequences": sum(len(b["input_ids"]) for b in heldout)}


def _fit_outputs(st: DecomposeStage, student, teacher, report, calibration: dict, device, console: Console,
                 record=lambda metrics: None) -> dict:
    """Refit the HOOI start to the teacher's block outputs; held-out errors of both (see module doc);
    ``record`` gets each sweep's error (the run's loggers)."""
    teacher.to(device)
    heldout = calibration["heldout"]
    before = output_errors(student, teacher, heldout)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        tasks = {g: progress.add_task(f"output fit {g}", total=max(1, st.fit_iters), status="")
                 for g in report.spec.layout.groups}

        def on_sweep(group: str, sweep: int, err: float) -> None:
            progress.update(tasks[group], completed=sweep, status=f"sweep {sweep}  rel. output error {err:.4f}")
            record({f"fit/{group}/rel_output_error": err, "fit/sweep": sweep})

        fitted = fit_outputs(student, encoder_weights(teacher), calibration["grams"], damp=st.calibration_damp,
                             iters=st.fit_iters, callback=on_sweep)
        for task in tasks.values():
            progress.update(task, completed=max(1, st.fit_iters))
    after = output_errors(student, teacher, heldout)
    refit = None
    passes = st.fit_passes
    if passes:

        mode, bias = st.fit_refit.value, st.fit_bias
        t0 = time.perf_counter()
        with console.status(f"refit: {passes} pass(es) ({mode}) on the compressed model's own inputs …"):
            records = refit_outputs(student, teacher, calibration["batches"], heldout, passes=passes,
                                    damp=st.calibration_damp, iters=st.fit_iters, bias=bias, mode=mode)
        kept = [r for r in records if r["kept"]]
        for r in records[1:]:
            console.print(f"refit pass {r['pass']} ({mode}{', biases' if bias else ''}) on the compressed model's own "
                          f"inputs: held-out last-hidden-state rel. error {r['last_hidden']:.4f}"
                          + ("" if r["kept"] else " (no better: not kept)"))
        refit = {"passes": passes, "mode": mode, "bias": bias, "seconds": time.perf_counter() - t0,
                 "records": records, "last_hidden": kept[-1]["last_hidden"], "kept_passes": len(kept) - 1}
    dead_start = [b for b, e in fitted.start_output_errors.items() if e >= DEAD_BLOCK_ERROR]
    dead = [b for b, e in fitted.output_errors.items() if e >= DEAD_BLOCK_ERROR]
    if dead:
        console.print(f"[bold red]WARNING[/]: {len(dead)} block(s) keep a relative output error ≥ "
                      f"{DEAD_BLOCK_ERROR} after the output fit: {', '.join(dead[:8])}")
    console.print(f"output fit: held-out last-hidden-state rel. error {before['last_hidden']:.4f} (HOOI) -> "
                  f"{after['last_hidden']:.4f}; dead blocks {len(dead_start)} -> {len(dead)}")

    def rms(errs: dict) -> float:
        return (sum(e * e for e in errs.values()) / max(1, len(errs))) ** 0.5

    return {
        "method": "outputs",
        "calibration_files": st.calibration_files,  # (for calibration_files=task: the task's text file it read)
        "calibration_sequences": calibration["sequences"],
        "calibration_tokens": calibration["tokens"],
        "heldout_sequences": calibration["heldout_sequences"],
        "iters": st.fit_iters,
        "sweeps": {g: d.iterations for g, d in fitted.decompositions.items()},
        "hooi": {**before, "calibration_output_error": rms(fitted.start_output_errors), "dead_blocks": dead_start},
        "outputs": {**after, "calibration_output_error": rms(fitted.output_errors), "dead_blocks": dead},
        "refit": refit,
        "block_output_errors": fitted.output_errors,
        "weight_errors": {"rel_error": fitted.rel_error, "type_errors": fitted.type_errors,
                          "block_errors": fitted.block_errors, "dead_blocks": dead},
    }


def _table(r: dict) -> Table:
    s = r["spec"]
    ranks = f"d_in={s['rank_in']} d_out={s['rank_out']}" + (
        f" k={','.join(map(str, s['banks'].values()))}" if variant_of(s["variant"]).has_bank else "")
    t = Table(title=f"tdlight decompose: {r['teacher']} — {s['variant']} ({s['scope']}, grouping {s['grouping']}) {ranks}")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    b, a = r["parameters_before"], r["parameters_after"]
    for key in ("encoder_weights", "encoder_biases", "encoder_layernorms", "encoder", "embeddings", "other"):
        t.add_row(key.replace("_", " "), f"{b[key]:,}", f"{a[key]:,}")
    t.add_row("[bold]encoder ratio", "", f"[bold]{r['ratio']:.2f}×")
    if r.get("model_ratio") is not None:
        t.add_row("whole model (embeddings + encoder)", f"{r['model_parameters_before']:,}",
                  f"{r['model_parameters_after']:,}")
        t.add_row("[bold]whole-model ratio", "", f"[bold]{r['model_ratio']:.2f}×")
    e = r.get("embedding") or {}
    if e:
        rows = f"{e['rows']:,} of {e['ids']:,} rows" + (f", rank {e['rank']}" if e.get("rank") else "")
        t.add_row(f"word embeddings ({rows}, {e['weighting']})", "", f"rel. error {e['rel_error']:.4f}")
        if e.get("token_rel_error") is not None:
            t.add_row("  rel. error per token of the text", "", f"{e['token_rel_error']:.4f}")
    t.add_row("rel. error (all blocks)", "", f"{r['rel_error']:.4f}")
    for typ, e in r["type_errors"].items():
        flag = "  [red](dead blocks)" if any(n.split(".")[1] == typ for n in r["dead_blocks"]) else ""
        t.add_row(f"  rel. error {typ}", "", f"{e:.4f}{flag}")
    if r.get("fit"):
        f = r["fit"]
        h, o = f["hooi"], f["outputs"]
        t.add_row("[bold]fit=outputs", "[bold]HOOI", "[bold]output fit")
        t.add_row("calibration output error", f"{h['calibration_output_error']:.4f}",
                  f"{o['calibration_output_error']:.4f}")
        for l, (eh, eo) in enumerate(zip(h["layer_errors"], o["layer_errors"])):
            t.add_row(f"  held-out layer {l + 1} output error", f"{eh:.4f}", f"{eo:.4f}")
        t.add_row("held-out last hidden state error", f"{h['last_hidden']:.4f}", f"{o['last_hidden']:.4f}")
        t.add_row("dead blocks", f"{len(h['dead_blocks'])}", f"{len(o['dead_blocks'])}")
        for rec in (f.get("refit") or {}).get("records", [])[1:]:
            t.add_row(f"held-out last hidden state error, refit pass {rec['pass']}", "",
                      f"{rec['last_hidden']:.4f}" + ("" if rec["kept"] else " (not kept)"))
    if r.get("refine"):
        f = r["refine"]
        t.add_row("layer-output error", f"{f['layer_error_before']:.4f}", f"{f['layer_error_after']:.4f} (refined)")
    t.add_row("time", "", f"{r['seconds']:.2f} s on {r['device']}" + (" (cached)" if r.get("cached") else ""))
    return t
