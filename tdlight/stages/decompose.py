"""``stage=decompose``: decompose the teacher's encoder, save the compressed model, report.

Writes into the run directory: ``model/`` (a compressed model directory, loadable with
``tdlight.load_compressed``) and ``report.json`` (parameters, ratio, errors, time).
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

from tdlight.config import compression_spec
from tdlight.errors import TdlightError
from tdlight.model.io import atomic_directory, atomic_write_text, save_compressed
from tdlight.model.surgery import compress, count_parameters, encoder_shape
from tdlight.model.teacher import load_teacher
from tdlight.stages.common import teacher_source
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.spec import resolve

log = logging.getLogger("tdlight.decompose")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TdlightError(f"device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TdlightError(f"device={name!r} but no CUDA GPU is available; use device=cpu or auto")
    return dev


def cache_key(model: torch.nn.Module, rspec) -> str:
    """Hash of the teacher's weights (every tensor's bytes) and the resolved compression spec."""
    from tdlight.model.io import state_fingerprint

    return state_fingerprint(model.state_dict(), b"tdlight-decompose-v1",
                             json.dumps(rspec.to_dict(), sort_keys=True))[:20]


def _from_cache(entry: Path, run_dir: Path, save_model: bool) -> dict | None:
    if not (entry / "report.json").is_file() or not (entry / "model" / "tdlight.json").is_file():
        return None
    if save_model:
        atomic_directory(run_dir / "model", lambda tmp: shutil.copytree(entry / "model", tmp, dirs_exist_ok=True))
    return json.loads((entry / "report.json").read_text())


def run(cfg: DictConfig, run_dir: Path) -> dict:
    console = Console(stderr=True)
    device = resolve_device(cfg.device)
    spec = compression_spec(cfg.compression)
    source = teacher_source(cfg)
    teacher, tokenizer = load_teacher(source)
    shape = encoder_shape(teacher)
    rspec = resolve(spec, shape)  # bad ranks fail here, before any work
    before = count_parameters(teacher)
    log.info("teacher %s: %s; resolved spec %s", source, shape, rspec.to_dict())
    entry = None
    refine = cfg.stage.get("refine_steps", 0) or 0
    if refine < 0:
        raise TdlightError(f"stage.refine_steps={refine} must be ≥ 0")
    if cfg.stage.get("cache", True):
        key = cache_key(teacher, rspec)
        if refine:  # a refined decomposition also depends on how it was refined
            extra = {k: cfg.stage[k] for k in cfg.stage if str(k).startswith("refine")}
            key = hashlib.sha1((key + json.dumps(OmegaConf.to_container(OmegaConf.create(extra), resolve=True),
                                                 sort_keys=True)).encode()).hexdigest()[:20]
        entry = Path(cfg.paths.cache_dir) / "decompose" / key
        cached = _from_cache(entry, run_dir, cfg.stage.save_model)
        if cached is not None:
            cached.update(cached=str(entry), teacher=source)
            atomic_write_text(run_dir / "report.json", json.dumps(cached, indent=2))
            Console().print(_table(cached))
            log.info("reused the cached decomposition %s (same teacher weights and spec)", entry)
            return cached
    reference = copy.deepcopy(teacher) if refine else None  # compress() works in place
    teacher.to(device)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        tasks = {g: progress.add_task(f"HOOI {g}", total=rspec.max_iter, status="")
                 for g in rspec.layout.groups} if rspec.variant != "lowrank" else {}

        def on_sweep(group: str, sweep: int, err: float) -> None:
            progress.update(tasks[group], completed=sweep, status=f"sweep {sweep}  rel. error {err:.4f}")

        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = compress(teacher, rspec, callback=on_sweep if tasks else None)
        seconds = time.perf_counter() - t0
        for g, task in tasks.items():
            progress.update(task, completed=rspec.max_iter)
    for w in caught:
        console.print(f"[bold red]WARNING[/]: {w.message}")
        log.warning("%s", w.message)

    refined = _refine(cfg, teacher, reference, tokenizer, run_dir, console) if refine else None
    after = count_parameters(teacher)
    formula = param_counts(shape, rspec)
    if after["encoder"] != formula["encoder"]:  # the model and the accounting must agree
        raise AssertionError(f"parameter accounting mismatch: model {after['encoder']} vs formula {formula['encoder']}")
    result = {
        "teacher": source,
        "spec": rspec.to_dict(),
        "parameters_before": before,
        "parameters_after": after,
        "ratio": formula["ratio"],
        "rel_error": report.rel_error,
        "type_errors": report.type_errors,
        "block_errors": report.block_errors,
        "dead_blocks": report.dead_blocks,
        "sweeps": {g: d.iterations for g, d in report.decompositions.items()},
        "seconds": seconds,
        "device": str(device),
    }
    if refined is not None:
        result["refine"] = refined
    if cfg.stage.save_model:
        save_compressed(teacher.cpu(), run_dir / "model", tokenizer, extra={"teacher": source})
        if entry is not None:  # keep a copy for later runs with the same inputs
            atomic_directory(entry / "model", lambda tmp: shutil.copytree(run_dir / "model", tmp, dirs_exist_ok=True))
            atomic_write_text(entry / "report.json", json.dumps(result, indent=2))
    atomic_write_text(run_dir / "report.json", json.dumps(result, indent=2))
    Console().print(_table(result))
    log.info("ratio %.2f, rel. error %.4f, %.1f s; model in %s", result["ratio"], report.rel_error, seconds, run_dir)
    return result


def _refine(cfg: DictConfig, student, teacher, tokenizer, run_dir: Path, console: Console) -> dict:
    """Activation-aware refinement of the factors (see :mod:`tdlight.stages.refine`)."""
    from tdlight.data.corpus import CorpusDataModule
    from tdlight.stages.common import build_trainer
    from tdlight.stages.refine import RefineModule, heldout_error

    st = cfg.stage
    if tokenizer is None:
        raise TdlightError("refinement needs the teacher's tokenizer to read calibration text")
    files = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
             for k, v in (("train", st.refine_files), ("heldout", st.refine_heldout_files))}
    dm = CorpusDataModule(tokenizer, train_files=files["train"], heldout_files=files["heldout"],
                          max_length=st.refine_max_length, batch_size=st.refine_batch_size, seed=cfg.seed,
                          max_heldout_sequences=st.refine_batch_size * st.refine_heldout_batches)
    heldout = list(dm.val_dataloader())
    before = heldout_error(student, teacher, heldout)
    module = RefineModule(student, teacher, lr=st.refine_lr, steps=st.refine_steps)
    cfg_t = OmegaConf.merge(cfg, {"trainer": {"max_steps": st.refine_steps, "max_epochs": -1,
                                              "limit_val_batches": 0, "num_sanity_val_steps": 0}})
    trainer = build_trainer(cfg_t, run_dir, max_epochs=-1, monitor=None, summary={"refine_steps": st.refine_steps})
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    student.requires_grad_(True)
    after = heldout_error(student.cpu(), teacher.cpu(), heldout)
    console.print(f"refinement: layer-output rel. error {before:.4f} -> {after:.4f} "
                  f"({st.refine_steps} steps of {st.refine_batch_size}x{st.refine_max_length} tokens)")
    return {"steps": st.refine_steps, "layer_error_before": before, "layer_error_after": after,
            "tokens": st.refine_steps * st.refine_batch_size * st.refine_max_length}


def _table(r: dict) -> Table:
    s = r["spec"]
    ranks = f"d_in={s['rank_in']} d_out={s['rank_out']}" + (
        f" k={','.join(map(str, s['banks'].values()))}" if s["variant"] == "tucker" else "")
    t = Table(title=f"tdlight decompose: {r['teacher']} — {s['variant']} ({s['scope']}, grouping {s['grouping']}) {ranks}")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    b, a = r["parameters_before"], r["parameters_after"]
    for key in ("encoder_weights", "encoder_biases", "encoder_layernorms", "encoder", "embeddings", "other"):
        t.add_row(key.replace("_", " "), f"{b[key]:,}", f"{a[key]:,}")
    t.add_row("[bold]encoder ratio", "", f"[bold]{r['ratio']:.2f}×")
    t.add_row("rel. error (all blocks)", "", f"{r['rel_error']:.4f}")
    for typ, e in r["type_errors"].items():
        flag = "  [red](dead blocks)" if any(n.split(".")[1] == typ for n in r["dead_blocks"]) else ""
        t.add_row(f"  rel. error {typ}", "", f"{e:.4f}{flag}")
    if r.get("refine"):
        f = r["refine"]
        t.add_row("layer-output error", f"{f['layer_error_before']:.4f}", f"{f['layer_error_after']:.4f} (refined)")
    t.add_row("time", "", f"{r['seconds']:.2f} s on {r['device']}" + (" (cached)" if r.get("cached") else ""))
    return t
