"""A linear layer whose weight is a product of factors from a shared bank.

``FactorizedLinear`` is a drop-in for the ``nn.Linear`` it replaces: same input and
output features, same bias, ``y = x W + b``. Its weight is a grid of n_in × n_out D×D
blocks, block (j, m) being ``U C′_jm Vᵀ`` with C′ the block's mixed core. The forward
never builds W; it is the variant's :meth:`~tdlight.tensor.variants.Variant.matmul`, for
variants that share U and V:

    xu = x_j @ U                    for every input chunk j      (…, n_in, a)
    z_m = Σ_j xu_j @ C′_jm          one matmul with the cores laid out (n_in·a)×(n_out·b)
    y_m = z_m @ Vᵀ                  for every output chunk m     (…, n_out, D)

Q, K and V read the same input, so when their variant shares U they share one ``x @ U``
(and one core matmul and one ``@ Vᵀ`` for the three) through a :class:`SharedInput`; the
FFN-input matrix is one module with n_out = m blocks, so its m blocks share ``x @ U`` by
construction.

``mode`` picks how a module computes, without changing what (all agree to float precision):

* ``"factorized"`` — the three products above (the default).
* ``"folded"`` — the mixed cores multiplied into Vᵀ (or U) once and cached
  (:meth:`~tdlight.tensor.variants.Variant.fold`): two GEMMs per forward instead of three, no
  core product per token, the bias fused into the second; Q, K and V share one ``x @ U`` and
  one GEMM. Costs an (n_out·D) × a matrix per module in memory (factors shared across layers
  become per-layer products): the inference mode between the two others.
* ``"dense"`` — the reconstructed dense weight, built once and cached, then one
  ``F.linear`` (``addmm``, bias fused); Q, K and V sharing an input run as one GEMM against
  their concatenated weights. Where d is close to D the factorized products cost more than
  the dense one (``tdlight.model.execution`` chooses per module).

A cached weight (folded or dense) is rebuilt when a factor or the bias changes; with
gradients on, differentiably on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tdlight.model.bank import FactorBank

MODES = ("factorized", "folded", "dense")


def _stamp(tensors) -> tuple:
    """Identity and version of each tensor: a product cached from them is valid while this is unchanged."""
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors if t is not None)


class _WeightCache:
    """The weights derived from the factors for each mode that needs them (dense, folded), each
    rebuilt by its ``build`` only when its sources change; never cached while training. One entry
    per mode, so that timing two modes against each other (``tdlight.model.execution``) does not
    rebuild on every call; :func:`~tdlight.model.execution.apply` clears what the plan does not use."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple, object]] = {}  # mode -> (stamp of the sources, value)

    def get(self, mode: str, sources, build):
        if torch.compiler.is_compiling():  # Dynamo cannot follow the stamp: the weight built before compiling
            entry = self.entries.get(mode)  # (execution.compile_for_inference)
            return entry[1] if entry is not None else build()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
            self.entries.pop(mode, None)  # differentiable: rebuilt on every call
            return build()
        stamp = _stamp(sources)
        entry = self.entries.get(mode)
        if entry is None or entry[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                entry = self.entries[mode] = (stamp, build())
        return entry[1]

    def clear(self) -> None:
        self.entries.clear()

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held (for memory accounting; a fold's U or V is the parameter itself)."""
        def walk(v):
            return [v] if isinstance(v, torch.Tensor) else [t for x in v for t in walk(x)] if isinstance(v, tuple) else []
        return [t for _, value in self.entries.values() for t in walk(value)]


class SharedInput:
    """Q, K and V read the same ``x``: the first of them computes all three outputs.

    ``x @ U`` once, the three mixed cores side by side as one a × 3b matrix, one
    ``@ Vᵀ`` for the three: three matmuls instead of seven, and larger ones, which is
    what makes the factorized attention input fast at small batch. The members take
    their slice (bias added by each). A hit needs the very same tensor object,
    unmodified (same ``_version``), and the memo is dropped once every member has read
    it, so no activation outlives a layer.
    """

    def __init__(self) -> None:
        self.members: list[FactorizedLinear] = []
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._left = 0
        self._cache = _WeightCache()

    def register(self, linear: FactorizedLinear) -> int:
        self.members.append(linear)
        return len(self.members) - 1

    @staticmethod
    def _version_of(x: torch.Tensor) -> int:
        # inference tensors (torch.inference_mode, Lightning's predict/test loops) have no
        # version counter; within one layer nothing writes to the attention input anyway
        return -2 if x.is_inference() else x._version

    def hit(self, x: torch.Tensor) -> bool:
        return self._x is x and self._version == self._version_of(x) and self._left > 0

    def output(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Member ``slot``'s ``x @ W + b``, computing every member's on a miss."""
        if torch.compiler.is_compiling():
            # No memo under torch.compile: Dynamo cannot follow tensor identity and version counters
            # (a graph break per call). Each member's call computes the shared product again in the
            # traced graph, where the compiler's common-subexpression elimination merges the copies.
            return self._compute(x)[..., slot, :]
        if self.hit(x):
            y = self._y
            self._left -= 1
        else:
            y = self._compute(x)  # (…, members, D)
            self._x, self._version, self._y, self._left = x, self._version_of(x), y, len(self.members) - 1
        if self._left == 0:
            self._x = self._y = None
        return y[..., slot, :]

    def _bias(self) -> torch.Tensor | None:
        bs = [m.bias for m in self.members]
        return None if any(b is None for b in bs) else torch.cat(bs)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        modes = {m.mode for m in self.members}
        if len(modes) > 1:
            raise ValueError(f"Q, K and V share one input and must run in one mode; got {sorted(modes)}")
        bank, mode = self.members[0].bank, modes.pop()
        n, D = len(self.members), self.members[0].out_features
        if mode == "factorized":  # the members as one 1 × members grid of blocks: one x @ U, one core matmul, one @ Vᵀ
            y = bank.strategy.matmul(x, bank.factors(), self._grid())  # (…, members, D)
            b = self._bias()
            return y if b is None else y + b.view(n, D)
        if mode == "folded":  # one x @ U, one GEMM with the members' C′Vᵀ side by side, biases fused
            fold, b = self.cached("folded")
            return bank.strategy.folded_matmul(x, fold, b).unflatten(-1, (n, D))
        W, b = self.cached("dense")
        return F.linear(x, W, b).unflatten(-1, (n, D))

    def _grid(self) -> torch.Tensor:
        """The members as one 1 × members grid of blocks."""
        return torch.cat([m.blocks.flatten() for m in self.members]).view(1, -1)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' weights stacked (members·D × D) and their biases: one GEMM, bias fused."""
        return torch.cat([m.weight for m in self.members]), self._bias()

    def _folded(self):
        """The members' fold (one ``x @ U``, their C′Vᵀ side by side) and their biases."""
        bank = self.members[0].bank
        return bank.strategy.fold(bank.factors(), self._grid()), self._bias()

    def cached(self, mode: str):
        """The weights ``mode`` (dense or folded) runs on, cached while the factors and biases are unchanged."""
        sources = [*self.members[0].bank.parameters(), *[m.bias for m in self.members]]
        return self._cache.get(mode, sources, self._stacked if mode == "dense" else self._folded)


class FactorizedLinear(nn.Module):
    """``nn.Linear(n_in·D, n_out·D)`` with weight blocks taken from a :class:`FactorBank`.

    ``blocks``: (n_in, n_out) integer tensor, the bank slice of each weight block.
    The bank is *not* registered as a submodule here (it is shared by many linears and
    registered once, on the encoder), so ``state_dict`` holds it exactly once.
    """

    def __init__(self, bank: FactorBank, blocks: torch.Tensor, bias: torch.Tensor | None,
                 shared_input: SharedInput | None = None, kind: str = ""):
        super().__init__()
        object.__setattr__(self, "bank", bank)
        # the grid is structure, not a weight: not saved (persistent=False), kept as Python values too so
        # that a loader which builds modules on the meta device (HF from_pretrained) can restore it
        self.block_grid = blocks.long().tolist()
        self.register_buffer("blocks", blocks.clone().long().to(bank.U.device), persistent=False)
        D = bank.U.shape[-2]
        self.n_in, self.n_out = blocks.shape
        self.in_features, self.out_features = self.n_in * D, self.n_out * D
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        object.__setattr__(self, "shared_input", shared_input)
        self.slot = shared_input.register(self) if shared_input is not None else None
        if shared_input is not None and (self.n_in, self.n_out) != (1, 1):
            raise ValueError("a shared input serves single-block linears (Q, K, V) only")
        self.mode = "factorized"
        self.kind = kind  # the block type it replaces: query, key, value, attn_out, ffn_in or ffn_out
        object.__setattr__(self, "_cache", _WeightCache())  # not a module: no state, not saved

    @torch.no_grad()
    def reset_blocks(self) -> None:
        """Write :attr:`block_grid` into the ``blocks`` buffer (after a loader left it uninitialised)."""
        self.blocks.copy_(torch.tensor(self.block_grid, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The output's leading sizes are read from x (a view, free in eager): in an ONNX trace, shape
        # inference does not see through the factorized product (einsum, the shared input's slice) and
        # would give the output the traced sample's sizes, freezing every consumer that reads them
        # (DeBERTa's ``view(x.size()[:-1] + …)``) to that batch and length.
        return self._forward(x).view(x.shape[:-1] + (self.out_features,))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input is not None:
            return self.shared_input.output(x, self.slot)
        bank = self.bank
        if self.mode == "dense":
            return F.linear(x, self.cached("dense"), self.bias)
        if self.mode == "folded":
            return bank.strategy.folded_matmul(x, self.cached("folded"), self.bias)
        y = bank.strategy.matmul(x, bank.factors(), self.blocks).flatten(-2)  # (…, n_out·D)
        return y + self.bias if self.bias is not None else y

    def cached(self, mode: str):
        """The weight ``mode`` (dense or folded) runs on: :attr:`weight`, or the variant's
        :meth:`~tdlight.tensor.variants.Variant.fold`, cached while the factors and the bias are
        unchanged (see ``_WeightCache``)."""
        bank = self.bank
        build = (lambda: self.weight) if mode == "dense" else (lambda: bank.strategy.fold(bank.factors(), self.blocks))
        return self._cache.get(mode, [*bank.parameters(), self.bias], build)

    @torch.no_grad()
    def build_cache(self) -> None:
        """Build the weight the current mode runs on now (this module's or its shared input's),
        e.g. before compiling; nothing for the other modes."""
        if self.mode in ("dense", "folded"):
            (self.shared_input or self).cached(self.mode)

    def drop_cache(self) -> None:
        """Free the cached weight (this module's and its shared input's)."""
        self._cache.clear()
        if self.shared_input is not None:
            self.shared_input._cache.clear()

    def cache_tensors(self) -> list[torch.Tensor]:
        """The cached weights this module holds (its own and its shared input's)."""
        return self._cache.tensors() + (self.shared_input._cache.tensors() if self.shared_input is not None else [])

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``nn.Linear.weight`` (out × in) this module represents (rebuilt)."""
        W = self.bank.reconstruct(self.blocks.flatten())  # (n_in·n_out, D, D), x @ W orientation
        D = W.shape[-1]
        W = W.view(self.n_in, self.n_out, D, D).permute(0, 2, 1, 3).reshape(self.in_features, self.out_features)
        return W.t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.n_in}x{self.n_out}, bias={self.bias is not None}, mode={self.mode}")
