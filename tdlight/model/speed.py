"""Paired latency measurement of two models on the same inputs.

The machine's speed drifts, so the two models (or any two callables) are timed back to back in each repetition
(alternating which goes first) and the speed-up is the median of the per-pair ratios.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn


def random_inputs(batch: int, length: int, vocab: int, *, seed: int = 0,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A fixed (seeded) batch of ``batch`` × ``length`` token ids without padding, for timing."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (batch, length), generator=g).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def paired_times(baseline: Callable[[], object], candidate: Callable[[], object], *, device: torch.device | str = "cpu",
                 reps: int = 20, warmup: int = 3) -> dict[str, float]:
    """``{"baseline_ms", "candidate_ms", "speedup"}`` of two callables: medians over ``reps`` pairs."""
    device = torch.device(device)
    for _ in range(warmup):
        _timed(baseline, device)
        _timed(candidate, device)
    a, b, ratios = [], [], []
    for r in range(reps):
        if r % 2 == 0:
            ta, tb = _timed(baseline, device), _timed(candidate, device)
        else:
            tb, ta = _timed(candidate, device), _timed(baseline, device)
        a.append(ta)
        b.append(tb)
        ratios.append(ta / tb)
    return {"baseline_ms": 1e3 * statistics.median(a), "candidate_ms": 1e3 * statistics.median(b),
            "speedup": statistics.median(ratios)}


def paired_speedup(baseline: nn.Module, candidate: nn.Module, inputs: dict[str, torch.Tensor], *,
                   reps: int = 20, warmup: int = 3) -> dict[str, float]:
    """``{"baseline_ms", "candidate_ms", "speedup"}``: medians over ``reps`` paired runs (eval mode)."""
    modes = (baseline.training, candidate.training)
    baseline.eval()
    candidate.eval()
    try:
        return paired_times(lambda: baseline(**inputs), lambda: candidate(**inputs),
                            device=next(baseline.parameters()).device, reps=reps, warmup=warmup)
    finally:
        baseline.train(modes[0])
        candidate.train(modes[1])
