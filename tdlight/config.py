"""Structured config schema, registered in Hydra's ConfigStore.

``conf/config.yaml`` puts ``tdlight_schema`` first in its defaults list, so every group
file and every command-line override is validated against these dataclasses: a
misspelled key or a wrong type is rejected before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from tdlight.tensor.spec import CompressionSpec

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TeacherConfig:
    name: str = "minilm"
    path: str = "minilm"  # an embedded name, an HF model directory, or a hub name


@dataclass
class CompressionConfig:
    name: str = "tucker"
    variant: str = "tucker"
    scope: str = "all"
    grouping: str = "none"
    layers_per_group: Optional[int] = None
    rank: Optional[int] = None
    rank_in: Optional[int] = None
    rank_out: Optional[int] = None
    bank: Optional[int] = None
    rank_ratio: Optional[float] = None
    bank_ratio: Optional[float] = None
    target_ratio: Optional[float] = None
    balance: str = "none"
    init: str = "svd"
    max_iter: int = 100
    tol: float = 1e-4
    seed: int = 0


@dataclass
class StageConfig:
    name: str = "decompose"
    save_model: bool = True


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    data_dir: str = "../shared/data"


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: Optional[Any] = None
    seed: int = 0
    device: str = "auto"


def compression_spec(cfg) -> CompressionSpec:
    """The tensor-level spec from the ``compression`` config node (``name`` dropped)."""
    d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    keys = {f.name for f in fields(CompressionSpec)}
    return CompressionSpec(**{k: v for k, v in d.items() if k in keys})


def register() -> None:
    if not OmegaConf.has_resolver("tdlight_root"):
        OmegaConf.register_new_resolver("tdlight_root", lambda: str(ROOT))
    ConfigStore.instance().store(name="tdlight_schema", node=Config)
