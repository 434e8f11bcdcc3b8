"""A stage that lives outside the package: its schema, its settings check and its run — all a new
stage needs besides one registry record (tests/test_registry.py adds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tdlight.errors import TdlightError
from tdlight.stages.runs import write_json


@dataclass
class ToyStage:
    name: str = "toy"
    repeat: int = 2  # how many times the seed is echoed


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    if cfg.stage.repeat < 1:
        raise TdlightError(f"{where}.repeat={cfg.stage.repeat}; valid: an integer ≥ 1")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    check(cfg)
    out = {"stage": "toy", "echo": [cfg.seed] * cfg.stage.repeat}
    write_json(run_dir / "metrics.json", out)
    return out
