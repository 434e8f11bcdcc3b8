"""The Trainer of every training stage and the callbacks tdlight adds to it: checkpoints to resume
from (with the run's identity and the RNG state), a divergence guard, an epoch timer; and AdamW as
the stages build it."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig

from tdlight.errors import TdlightError
from tdlight.model.surgery import nonfinite_tensors
from tdlight.model.teacher import head_state
from tdlight.stages.loggers import build_loggers

log = logging.getLogger("tdlight")

CHECKPOINTS = "checkpoints"  # inside a run directory
LAST = "last.ckpt"  # what a resume continues from


class ProgressBar(RichProgressBar):
    """Lightning's rich bar with two readings fixed: a run budgeted in optimizer steps
    (``max_epochs=-1``: pretrain, the decomposition's refinement) reads "Steps (budget N)" where
    Lightning writes "Epoch 0/-2", and a metric with no value yet (distill's ``val/score`` during
    its intermediate phase, logged as -inf so that the best checkpoint waits for real scores) is
    left off the bar."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs < 0 and trainer.max_steps > 0:
            return f"Steps (budget {trainer.max_steps})"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer, pl_module) -> dict:
        def shown(v) -> bool:
            try:
                return math.isfinite(float(v))
            except (TypeError, ValueError):
                return True
        return {k: v for k, v in super().get_metrics(trainer, pl_module).items() if shown(v)}


def build_trainer(cfg: DictConfig, run_dir: Path, *, max_epochs: int, monitor: str | None,
                  summary: dict[str, Any], extra_callbacks: list | None = None,
                  patience: int | None = None, loggers: list | None = None) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` with tdlight's checkpointing in ``run_dir/checkpoints``.

    ``last.ckpt`` is written at the end of every epoch (and every
    ``trainer.checkpoint_every_n_steps`` steps when set, and on an exception such as
    Ctrl-C) for resuming; ``best.ckpt`` keeps the best ``monitor`` value (mode max). With
    ``patience``, training stops after that many validations without a better ``monitor`` value
    (Lightning's EarlyStopping; its count is saved in the checkpoints, so a resumed run keeps it).
    The loggers (:func:`build_loggers`, with ``summary``) are attached after the Trainer
    accepted its settings, so a bad setting leaves nothing in ``run_dir``; ``loggers``: the run's own,
    already open (a step that is more than this one fit: decompose's refinement logs into decompose's run).
    """
    t = cfg.trainer
    ckpt_dir = run_dir / CHECKPOINTS
    callbacks: list = [
        # not OnExceptionCheckpoint: its teardown deletes the file it wrote
        LastCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False,
                        every_n_train_steps=t.checkpoint_every_n_steps, save_on_train_epoch_end=True,
                        save_on_exception=True),
        RestoreRng(),
        RunIdentity(run_dir),
        DivergenceGuard(),
    ]
    if monitor:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max",
                                         save_top_k=1, enable_version_counter=False, save_weights_only=True))
        if patience is not None:
            # check_finite off: a stage may log -inf on purpose (distill's phase 1 never competes for best)
            callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience, check_finite=False))
    if t.enable_progress_bar:
        callbacks.append(ProgressBar(leave=True))
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
    trainer.loggers = build_loggers(cfg, run_dir, summary) if loggers is None else loggers
    if trainer.loggers:  # the learning rate of each parameter group, every step (`lr-AdamW/pg1`, ...)
        trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
    return trainer


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, never written between a training batch and the validation that follows it.

    Lightning resumes a checkpoint taken at a validation point as if that validation had run (its epoch
    loop fast-forwards the validation loop's progress): a step or exception checkpoint written after the
    batch, before the validation, would resume with that validation lost — and with it the best.ckpt it
    could have won (a resumed run then kept another epoch than the run without a crash). So a step
    checkpoint due at such a point is written once the validation has run (pretraining's step checkpoints
    all fall on its validation points), and an exception there keeps the checkpoint before it, so a resume
    replays the batch and validates. The epoch-end save (after validation) is Lightning's own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._after_validation = False

    @staticmethod
    def _at_validation_point(trainer) -> bool:
        # the epoch loop's own test (Lightning offers no public one), with the fetcher of the running fit
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        return fetcher is not None and trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._at_validation_point(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
            self._after_validation = True  # (Lightning's own deferral is off under save_on_train_epoch_end)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation and not trainer.sanity_checking and not self._should_skip_saving_checkpoint(trainer):
            self._after_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not (trainer.training and self._at_validation_point(trainer)):
            super().on_exception(trainer, pl_module, exception)


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
                               f"(first non-finite parameter: {next(iter(nonfinite_tensors(pl_module)), 'none')}); "
                               "valid: a smaller learning rate, or gradient clipping (trainer.gradient_clip_val)")
        if self.first:
            ref = max(1.0, statistics.median(self.first))
            if v > self.EXPLODED * ref:
                raise TdlightError(f"training diverged: the loss is {v:.3g} at step {trainer.global_step}, over "
                                   f"{self.EXPLODED:g}× its start ({ref:.3g}); valid: a smaller learning rate")
        if len(self.first) < self.WINDOW:
            self.first.append(v)


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


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, head_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and LayerNorms; the task head
    (:func:`~tdlight.model.teacher.head_state`) at ``head_lr`` when given, in groups of its own (a
    schedule's factor scales every group's rate alike)."""
    head = set(head_state(model)) if head_lr is not None else set()
    # (the body's decay and no-decay groups always exist, empty or not, as before head_lr: a checkpoint's
    # optimizer state written then still resumes; the head's only when it has parameters)
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)
            groups[name in head, decays].append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": weight_decay if d else 0.0,
                               **({"lr": head_lr} if h else {})}
                              for (h, d), ps in groups.items() if ps or not h], lr=lr)
