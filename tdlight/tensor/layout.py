"""Stacking layouts: which D×D blocks of an encoder go into which tensor.

A BERT layer of hidden size D and FFN width m·D (m = 4 for BERT) has 4 + 2m blocks of
size D×D, all written in the ``y = x @ W`` orientation (the transpose of
``nn.Linear.weight``):

* ``query``, ``key``, ``value``, ``attn_out``: one block each;
* ``ffn_in``: the D×mD input matrix cut into m blocks along its *output* dimension;
* ``ffn_out``: the mD×D output matrix cut into m blocks along its *input* dimension.

A :class:`Layout` chooses the blocks that are compressed (``scope``) and how they are
grouped into stacked tensors that each get their own factor set (``grouping``). Blocks
outside the scope stay dense. Everything here is plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from tdlight.errors import SpecError

ATTENTION_TYPES = ("query", "key", "value", "attn_out")
FFN_TYPES = ("ffn_in", "ffn_out")
BLOCK_TYPES = ATTENTION_TYPES + FFN_TYPES
SCOPES = {"all": BLOCK_TYPES, "attention": ATTENTION_TYPES, "ffn": FFN_TYPES}
GROUPINGS = ("none", "type", "layers")


@dataclass(frozen=True, order=True)
class Block:
    """One D×D block: ``part`` indexes the m pieces of an FFN matrix (0 otherwise)."""

    layer: int
    type: str
    part: int = 0

    @property
    def name(self) -> str:
        suffix = f".{self.part}" if self.type in FFN_TYPES else ""
        return f"layer{self.layer}.{self.type}{suffix}"


@dataclass(frozen=True)
class Layout:
    """Which blocks are stacked, and into which groups.

    ``grouping``: ``none`` (one factor set for the encoder), ``type`` (attention and
    FFN get separate sets), ``layers`` (one set per ``layers_per_group`` consecutive
    layers).
    """

    num_layers: int
    hidden: int
    ffn_blocks: int = 4
    scope: str = "all"
    grouping: str = "none"
    layers_per_group: int | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise SpecError(f"unknown layout scope {self.scope!r}; valid: {sorted(SCOPES)}")
        if self.grouping not in GROUPINGS:
            raise SpecError(f"unknown grouping {self.grouping!r}; valid: {list(GROUPINGS)}")
        if self.num_layers < 1 or self.hidden < 1 or self.ffn_blocks < 1:
            raise SpecError(
                f"layout needs positive sizes, got num_layers={self.num_layers}, "
                f"hidden={self.hidden}, ffn_blocks={self.ffn_blocks}"
            )
        if self.grouping == "layers":
            lpg = self.layers_per_group
            if lpg is None or not (1 <= lpg <= self.num_layers) or self.num_layers % lpg:
                divisors = [i for i in range(1, self.num_layers + 1) if self.num_layers % i == 0]
                raise SpecError(
                    f"layers_per_group={lpg!r} must divide num_layers={self.num_layers}; "
                    f"valid: {divisors}"
                )
        elif self.grouping == "type" and self.scope != "all":
            raise SpecError(
                f"grouping='type' splits attention from FFN and needs scope='all', got scope={self.scope!r}"
            )

    @property
    def types(self) -> tuple[str, ...]:
        return SCOPES[self.scope]

    def blocks_of(self, layer: int, type_: str) -> list[Block]:
        parts = self.ffn_blocks if type_ in FFN_TYPES else 1
        return [Block(layer, type_, p) for p in range(parts)]

    @cached_property
    def groups(self) -> dict[str, tuple[Block, ...]]:
        """Group name -> blocks in stacking order (layer-major, then type, then part)."""
        layers = range(self.num_layers)

        def stack(layer_ids, types) -> tuple[Block, ...]:
            return tuple(b for l in layer_ids for t in types for b in self.blocks_of(l, t))

        if self.grouping == "none":
            return {"encoder": stack(layers, self.types)}
        if self.grouping == "type":
            return {"attention": stack(layers, ATTENTION_TYPES), "ffn": stack(layers, FFN_TYPES)}
        lpg = self.layers_per_group
        return {
            f"layers{s}-{s + lpg - 1}": stack(range(s, s + lpg), self.types)
            for s in range(0, self.num_layers, lpg)
        }

    @cached_property
    def index(self) -> dict[Block, tuple[str, int]]:
        """Block -> (group name, slice index in that group's tensor)."""
        return {b: (g, i) for g, blocks in self.groups.items() for i, b in enumerate(blocks)}

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for b in self.groups.values())


# --- cutting nn.Linear weights into blocks -----------------------------------------


def linear_to_blocks(weight: torch.Tensor, type_: str, hidden: int) -> list[torch.Tensor]:
    """Cut an ``nn.Linear.weight`` (out×in) into D×D blocks in ``x @ W`` orientation."""
    w = weight.t()  # (in, out): y = x @ w
    if type_ == "ffn_in":
        return list(w.split(hidden, dim=1))
    if type_ == "ffn_out":
        return list(w.split(hidden, dim=0))
    return [w]


def stack(layout: Layout, weights: dict[tuple[int, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer linear weights ``{(layer, type): nn.Linear.weight}`` -> ``{group: (n, D, D)}``."""
    cut: dict[Block, torch.Tensor] = {}
    for (layer, type_), weight in weights.items():
        if type_ in layout.types:
            for part, blk in enumerate(linear_to_blocks(weight, type_, layout.hidden)):
                cut[Block(layer, type_, part)] = blk
    out = {}
    for name, blocks in layout.groups.items():
        missing = [b.name for b in blocks if b not in cut]
        if missing:
            raise SpecError(f"weights for blocks {missing[:4]} are missing from the stack input")
        out[name] = torch.stack([cut[b] for b in blocks])
    return out
