"""What every training stage shares: run directories, loggers, the Trainer, resume.

A run directory (``outputs/<stage>/<run id>/``) holds ``.hydra/`` (the composed config),
``tdlight.log``, ``checkpoints/`` (``last.ckpt`` to resume, ``best.ckpt``), ``csv/version_N/``
(Lightning's CSV logger; one version per start or resume), ``wandb/`` and ``wandb_id`` (so a resume continues the same W&B
run), and the artifact the next stage reads (``model/``) plus ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from tdlight.errors import RunError, TdlightError
from tdlight.files import atomic_write_text

log = logging.getLogger("tdlight")

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"


# --- run directories ----------------------------------------------------------------


def saved_config(run_dir: str | os.PathLike) -> DictConfig:
    """The composed config a run was started with (``.hydra/config.yaml``)."""
    p = Path(run_dir)
    if not p.is_dir():
        raise RunError(f"run directory {str(p)!r} does not exist")
    f = p / ".hydra" / "config.yaml"
    if not f.is_file():
        raise RunError(f"{str(p)!r} is not a tdlight run directory: it has no .hydra/config.yaml")
    return OmegaConf.load(f)


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``checkpoints/last.ckpt`` of a run; an error (never a silent restart) if there is none."""
    ckpt = Path(run_dir) / CHECKPOINTS / LAST
    if not ckpt.is_file():
        raise RunError(
            f"cannot resume {str(run_dir)!r}: it has no checkpoint ({CHECKPOINTS}/{LAST}). A run can be resumed "
            "once it has saved one (at the end of each epoch, or every trainer.checkpoint_every_n_steps); "
            "start a new run instead"
        )
    import zipfile

    try:  # torch checkpoints are zip archives: a truncated or overwritten one fails its CRCs here
        with zipfile.ZipFile(ckpt) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        bad = f"{type(e).__name__}: {e}"
    restart = ("start a new run instead (the same command without resume=; in a pipeline, delete the step's "
               f"{CHECKPOINTS}/ folder and run the pipeline again)")
    if bad is not None:
        raise RunError(f"cannot resume {str(run_dir)!r}: {CHECKPOINTS}/{LAST} is corrupt ({bad}); valid: the checkpoint "
                       f"as the run wrote it — {restart}")
    try:  # memory-mapped: only what is read below leaves the disk
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a zip of something else, or a pickle torch refuses to load
        state, why = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    else:
        why = "it holds no Lightning training state (state_dict, loops, callbacks)"
    if not isinstance(state, dict) or not {"state_dict", "loops", "callbacks"} <= state.keys():
        raise RunError(f"cannot resume {str(run_dir)!r}: {CHECKPOINTS}/{LAST} is not a Lightning checkpoint of a "
                       f"tdlight run ({why}); valid: the checkpoint the run wrote — {restart}")
    owner = (state["callbacks"].get(RunIdentity.__name__) or {}).get("run")
    if owner is not None and owner != Path(run_dir).resolve().name:  # (checkpoints before 2026-12-05 carry none)
        raise RunError(f"cannot resume {str(run_dir)!r}: {CHECKPOINTS}/{LAST} was written by another run ({owner!r}); "
                       f"valid: the run's own checkpoint (a run directory renamed after it started: rename it back "
                       f"to {owner!r}) — or {restart}")
    return ckpt


def stage_artifact(run_dir: str | os.PathLike, stages: tuple[str, ...], what: str = "model") -> Path:
    """``<run_dir>/<what>`` of a finished run of one of ``stages``, checked."""
    cfg = saved_config(run_dir)
    stage = cfg.get("stage", {}).get("name")
    if stage not in stages:
        raise RunError(f"run directory {str(run_dir)!r} is a {stage!r} run; expected one of {list(stages)}")
    art = Path(run_dir) / what
    if not art.exists():
        raise RunError(f"run directory {str(run_dir)!r} has no {what}/: the run did not finish; resume it first")
    return art


def check_positions(model, **lengths: int | None) -> None:
    """Each sequence length (``key=value``, ``key`` the setting as the user writes it) fits the model's
    position table; else one error naming the limit (a longer batch would fail deep in the embeddings)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return
    if "roberta" in str(getattr(config, "model_type", "")):  # positions start after the padding index
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    for key, value in lengths.items():
        if value is not None and value > limit:
            raise TdlightError(f"{key}={value} is longer than the model's position table; valid: at most {limit} "
                               "tokens")


def teacher_source(cfg: DictConfig) -> str:
    """The teacher to load: the fine-tuned model of ``teacher.run_dir`` if set, else ``teacher.path``."""
    if cfg.teacher.get("run_dir"):
        return str(stage_artifact(cfg.teacher.run_dir, ("finetune",)))
    return cfg.teacher.path


def teacher_pooling(cfg: DictConfig) -> str:
    """``teacher.pooling`` as a plain string (``auto``, ``cls`` or ``mean``)."""
    value = cfg.teacher.get("pooling") or "auto"
    return getattr(value, "value", value)


# --- loggers --------------------------------------------------------------------------


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline(lc) -> bool:
    """Whether W&B runs offline for logger config ``lc`` (offline unless credentials or ``mode=online``)."""
    mode = getattr(lc.mode, "value", lc.mode)
    offline = mode == "offline" or (mode == "auto" and not _wandb_configured())
    return offline or os.environ.get("WANDB_MODE") in ("offline", "disabled")


def _wandb_settings():
    """No console output of W&B's own (banner, offline notices, `wandb leet` hint, sync hint):
    :func:`build_loggers` logs the one line a user acts on."""
    import wandb

    return wandb.Settings(silent=True)


def build_loggers(cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> list:
    """CSV logger (unless ``logger=none``) and W&B (``logger=wandb``), both inside ``run_dir``.

    The W&B run id is stored in ``run_dir/wandb_id`` so a resumed run logs into the same
    W&B run. W&B runs offline unless credentials are configured (or ``logger.mode=online``).
    """
    lc = cfg.logger
    loggers: list = []
    if lc.csv:
        from lightning.pytorch.loggers import CSVLogger

        # csv/version_N/metrics.csv: a resumed run starts a new version instead of overwriting
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    if lc.wandb:
        from lightning.pytorch.loggers import WandbLogger

        offline = wandb_offline(lc)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        wb = WandbLogger(
            project=lc.project, entity=lc.entity, group=lc.group, tags=list(lc.tags) or None,
            name=f"{cfg.stage.name}/{run_dir.name}", id=run_id, resume="allow", offline=offline,
            save_dir=str(run_dir), job_type=cfg.stage.name, settings=_wandb_settings(),
        )
        # Lightning always passes `anonymous`, which this wandb ignores with a deprecation warning
        # on every run; WandbLogger has no way to leave it out but its init-kwargs dict
        wb._wandb_init.pop("anonymous", None)
        log.info("W&B run %s (%s) in %s%s", run_id, "offline" if offline else f"project {lc.project}",
                 run_dir / "wandb", f"; upload it with `wandb sync {run_dir / 'wandb'}/offline-run-*-{run_id}`"
                 if offline else "")
        loggers.append(wb)
    for lg in loggers:
        lg.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **summary})
    return loggers


# --- resumable RNG -------------------------------------------------------


def finish_wandb() -> None:
    """End this process's active W&B run, if any. A pipeline runs its steps in one process, and
    Lightning's WandbLogger adopts a run that is still active: without this, every later step
    would log into the first step's W&B run instead of its own (its ``wandb_id``)."""
    import sys

    wandb = sys.modules.get("wandb")  # never import it just to find that nothing runs
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


class RestoreRng(Callback):
    """Saves the torch (and CUDA) RNG state in checkpoints and restores it on resume.

    Lightning restores the model, optimizer, scheduler and loops but not the global RNG
    that dropout draws from; without it a resumed run diverges from an uninterrupted
    one. (The data order is restored by :class:`tdlight.data.sampling.ResumableDataLoader`.)
    """

    def state_dict(self) -> dict[str, Any]:
        state = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])


# --- the Trainer ----------------------------------------------------------------------------


def build_trainer(cfg: DictConfig, run_dir: Path, *, max_epochs: int, monitor: str | None,
                  summary: dict[str, Any], extra_callbacks: list | None = None) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` with tdlight's checkpointing in ``run_dir/checkpoints``.

    ``last.ckpt`` is written at the end of every epoch (and every
    ``trainer.checkpoint_every_n_steps`` steps when set, and on an exception such as
    Ctrl-C) for resuming; ``best.ckpt`` keeps the best ``monitor`` value (mode max).
    The loggers (:func:`build_loggers`, with ``summary``) are attached after the Trainer
    accepted its settings, so a bad setting leaves nothing in ``run_dir``.
    """
    t = cfg.trainer
    ckpt_dir = run_dir / CHECKPOINTS
    callbacks: list = [
        # not OnExceptionCheckpoint: its teardown deletes the file it wrote
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False,
                        every_n_train_steps=t.checkpoint_every_n_steps, save_on_train_epoch_end=True,
                        save_on_exception=True),
        RestoreRng(),
        RunIdentity(run_dir),
        DivergenceGuard(),
    ]
    if monitor:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max",
                                         save_top_k=1, enable_version_counter=False, save_weights_only=True))
    if t.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    callbacks += extra_callbacks or []
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=t.precision, max_epochs=max_epochs,
        max_steps=t.max_steps, gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=t.num_sanity_val_steps, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, default_root_dir=str(run_dir),
        logger=False, callbacks=callbacks, enable_model_summary=False,
    )
    for key in ("val_check_interval", "limit_train_batches", "limit_val_batches"):
        if t.get(key) is not None:
            kwargs[key] = t[key]
    kwargs["check_val_every_n_epoch"] = t.check_val_every_n_epoch
    try:
        trainer = L.Trainer(**kwargs)
    except Exception as e:  # Lightning reports bad accelerator/strategy/precision values as exceptions
        if type(e).__name__ in ("MisconfigurationException", "ValueError", "RuntimeError"):
            raise TdlightError(f"invalid trainer settings: {e}") from e
        raise
    trainer.loggers = build_loggers(cfg, run_dir, summary)
    return trainer


class DivergenceGuard(Callback):
    """Stops training whose loss is not finite or has exploded: more than ``EXPLODED`` times the
    larger of 1 and the median of the first ``WINDOW`` steps' losses. Such a run would otherwise go
    on to a meaningless but finite score (a negative learning rate reached a loss of 6e24 and then
    won its sweep). Raises :class:`TdlightError`: the run ends with one error line, exit 2, and a
    sweep marks the trial failed."""

    WINDOW, EXPLODED = 10, 1e3

    def __init__(self) -> None:
        self.first: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import math
        import statistics

        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        v = float(loss.detach())
        if not math.isfinite(v):
            raise TdlightError(f"training diverged: the loss is {v} at step {trainer.global_step} "
                               f"(first non-finite parameter: {first_nonfinite(pl_module) or 'none'}); "
                               "valid: a smaller learning rate, or gradient clipping (trainer.gradient_clip_val)")
        if self.first:
            ref = max(1.0, statistics.median(self.first))
            if v > self.EXPLODED * ref:
                raise TdlightError(f"training diverged: the loss is {v:.3g} at step {trainer.global_step}, over "
                                   f"{self.EXPLODED:g}× its start ({ref:.3g}); valid: a smaller learning rate")
        if len(self.first) < self.WINDOW:
            self.first.append(v)


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer of ``module`` holding a NaN or an infinity."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=float))


class EpochTimer(Callback):
    """Seconds of training per epoch (``.seconds``, validation excluded) and of validation.

    The clock runs between hooks that every training step passes (batch ends, the epoch's start and
    end, validation's start and end), each interval added to the epoch in progress — not between an
    epoch's start and end hooks, which a resumed run does not pair (Lightning skips
    ``on_train_epoch_start`` when it restarts at an epoch's end). Its state travels in the
    checkpoints, so a resumed run reports every epoch: those before the resume as measured then,
    the interrupted one as its seconds before plus after."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, float] = {}
        self.val_seconds: list[float] = []
        self._tick: float | None = None  # when training time last started counting (None: in validation or idle)
        self._v0 = 0.0

    @property
    def seconds(self) -> list[float]:
        return [self.per_epoch[e] for e in sorted(self.per_epoch)]

    def _count(self, trainer, restart: bool) -> None:
        now = time.perf_counter()
        if self._tick is not None:
            epoch = trainer.current_epoch
            self.per_epoch[epoch] = self.per_epoch.get(epoch, 0.0) + now - self._tick
        self._tick = now if restart else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._tick = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._tick = time.perf_counter()  # (the time between epochs is Lightning's, not the epoch's)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count(trainer, restart=True)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._count(trainer, restart=False)
        self._v0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_seconds.append(time.perf_counter() - self._v0)
        if not trainer.sanity_checking:
            self._tick = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._count(trainer, restart=False)

    def state_dict(self) -> dict[str, Any]:
        return {"per_epoch": dict(self.per_epoch), "val_seconds": list(self.val_seconds)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.per_epoch = {int(k): float(v) for k, v in state_dict.get("per_epoch", {}).items()}
        self.val_seconds = list(state_dict.get("val_seconds", []))


class RunIdentity(Callback):
    """Writes the run directory's name into every checkpoint, so that a resume refuses another run's
    ``last.ckpt`` copied into ``checkpoints/`` (:func:`last_checkpoint`)."""

    def __init__(self, run_dir: Path) -> None:
        self.run = Path(run_dir).resolve().name

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # checked before the Trainer exists


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)
