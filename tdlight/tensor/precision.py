"""Storage precision of a state dict: fp32, fp16, bf16, or int8 weight-only with per-channel scales.

Plain torch: the model layer stores what :func:`encode` returns and loads what :func:`decode`
gives back (always fp32; the arithmetic runs in fp32 whatever the storage). int8 is symmetric
and weight-only: every floating tensor of two or more dimensions (linear and embedding weights,
the shared factors U and V, the core bank, the mixing matrix P) is stored as int8 ``q`` with one
fp32 scale per row of its last dimension (per output channel for an ``nn.Linear`` weight, per token
for an embedding table), ``t ≈ q · scale``, ``scale = max|row| / 127``; vectors (biases,
LayerNorms) stay fp32 — they are a rounding error of the bytes. fp16/bf16 cast every floating tensor.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
SCALE = ":int8_scale"  # suffix of a scale tensor's key (':' never appears in a module path)
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
    return precision


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension: ``(q, scale)`` with ``q`` int8 of ``t``'s shape
    and ``scale`` fp32 of shape ``t.shape[:-1]``; ``q * scale[..., None]`` approximates ``t`` to within
    half a step (``scale / 2``) per entry. An all-zero row gets scale 1 (and zeros)."""
    t = t.detach().float()
    amax = t.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(t / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def encode(state: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """The tensors to store for ``state`` at ``precision`` (contiguous, CPU). Integer tensors (ids,
    index maps) are stored as they are."""
    check_precision(precision)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or precision == "fp32":
            out[name] = t.contiguous()
        elif precision in _CAST:
            out[name] = t.to(_CAST[precision]).contiguous()
        elif t.ndim >= 2:
            out[name], out[name + SCALE] = quantize_int8(t)
        else:
            out[name] = t.float().contiguous()
    return out


def decode(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 state dict of what :func:`encode` stored (integer tensors unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith(SCALE):
            continue
        if name + SCALE in stored:
            out[name] = dequantize_int8(t, stored[name + SCALE])
        elif t.is_floating_point():
            out[name] = t.float()
        else:
            out[name] = t
    return out


def stored_bytes(stored: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what a safetensors file holds, less its small header)."""
    return sum(t.numel() * t.element_size() for t in stored.values())
