"""tdlight.tensor: layouts, decompositions, accounting (plain torch, no transformers)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tdlight.errors import SpecError
from tdlight.tensor.decompose import Ranks, decompose, warn_dead_blocks
from tdlight.tensor.hooi import hooi
from tdlight.tensor.layout import BLOCK_TYPES, Block, Layout, linear_to_blocks, stack
from tdlight.tensor.variants import variant_of


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_layer_weights(L: int, D: int, m: int = 4, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    """nn.Linear-shaped (out × in) weights of an L-layer encoder."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"query": (D, D), "key": (D, D), "value": (D, D), "attn_out": (D, D),
              "ffn_in": (m * D, D), "ffn_out": (D, m * D)}
    return {(l, t): torch.randn(*s, generator=g) for l in range(L) for t, s in shapes.items()}


# --- layouts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(scope="attention"), dict(scope="ffn"), dict(grouping="type"),
     dict(grouping="layers", layers_per_group=2), dict(scope="ffn", grouping="layers", layers_per_group=1)],
)
def test_stack_puts_every_block_where_the_layout_says(kw):
    L, D = 4, 8
    weights = random_layer_weights(L, D)
    layout = Layout(num_layers=L, hidden=D, **kw)
    tensors = stack(layout, weights)
    assert set(tensors) == set(layout.groups)
    assert sum(t.shape[0] for t in tensors.values()) == layout.num_blocks
    assert {(b.layer, b.type) for b in layout.index} == {(l, t) for l in range(L) for t in layout.types}
    for b, (g, i) in layout.index.items():
        assert torch.equal(tensors[g][i], linear_to_blocks(weights[(b.layer, b.type)], b.type, D)[b.part]), b


def test_block_counts_and_orientation():
    L, D = 2, 8
    weights = random_layer_weights(L, D)
    layout = Layout(num_layers=L, hidden=D)
    assert layout.num_blocks == L * 12
    assert Layout(num_layers=L, hidden=D, scope="attention").num_blocks == L * 4
    assert Layout(num_layers=L, hidden=D, scope="ffn").num_blocks == L * 8
    groups = Layout(num_layers=L, hidden=D, grouping="type").groups
    assert [len(v) for v in groups.values()] == [L * 4, L * 8]
    # y = x @ W orientation: each FFN-in block gives D consecutive outputs of the linear
    x = torch.randn(3, D)
    w_in = weights[(0, "ffn_in")]
    y = x @ w_in.t()
    for p, blk in enumerate(linear_to_blocks(w_in, "ffn_in", D)):
        assert torch.allclose(x @ blk, y[:, p * D:(p + 1) * D], atol=1e-6)
    # FFN-out blocks take D consecutive inputs each, and their products sum to the output
    w_out = weights[(0, "ffn_out")]
    h = torch.randn(3, 4 * D)
    parts = linear_to_blocks(w_out, "ffn_out", D)
    assert torch.allclose(sum(h[:, p * D:(p + 1) * D] @ b for p, b in enumerate(parts)), h @ w_out.t(), atol=1e-5)
    t = stack(layout, weights)["encoder"]
    idx = layout.index[Block(1, "value")][1]
    assert torch.equal(t[idx], weights[(1, "value")].t())
    assert [b.type for b in layout.groups["encoder"][:12]] == [
        "query", "key", "value", "attn_out"] + ["ffn_in"] * 4 + ["ffn_out"] * 4
    assert set(BLOCK_TYPES) == {b.type for b in layout.groups["encoder"]}


@pytest.mark.parametrize(
    "kw, match",
    [(dict(scope="heads"), "unknown layout scope 'heads'"),
     (dict(grouping="blocks"), "unknown grouping 'blocks'"),
     (dict(grouping="layers", layers_per_group=3), r"layers_per_group=3 must divide num_layers=4; valid: \[1, 2, 4\]"),
     (dict(grouping="type", scope="ffn"), "needs scope='all'")],
)
def test_bad_layouts(kw, match):
    with pytest.raises(SpecError, match=match):
        Layout(num_layers=4, hidden=8, **kw)


# --- decompositions --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensor():
    g = torch.Generator().manual_seed(1)
    # some shared structure plus noise, so that the solvers have something to find
    U, V = torch.randn(24, 6, generator=g), torch.randn(20, 5, generator=g)
    C = torch.randn(10, 6, 5, generator=g)
    return U @ C @ V.t() + 0.3 * torch.randn(10, 24, 20, generator=g)


@pytest.mark.parametrize("variant", ["lowrank", "shared", "tucker", "II", "III", "IV"])
def test_full_rank_reproduces_tensor(tensor, variant):
    n, A, B = tensor.shape
    d = decompose(tensor, variant, Ranks(A, B, n if variant_of(variant).has_bank else None))
    assert d.rel_error < 1e-5
    assert rel(d.factors.reconstruct(), tensor) < 1e-5
    assert d.slice_errors.max() < 1e-5


def test_full_mode_needs_no_factor(tensor):
    # a mode whose rank equals its size is the identity: only the other modes are solved
    n, A, B = tensor.shape
    P, U, V, core, *_ = hooi(tensor, (n, 6, B))
    assert P is None and V is None and U.shape == (A, 6) and core.shape == (n, 6, B)
    d = decompose(tensor, "tucker", Ranks(6, B, n))
    assert torch.equal(d.factors.V, torch.eye(B)) and torch.equal(d.factors.P, torch.eye(n))


@pytest.mark.parametrize("ranks", [(10, 12, 12), (4, 6, 5), (6, 8, 3), (3, 20, 2)])
def test_tucker_within_one_percent_of_tensorly(tensor, ranks):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tucker

    tl.set_backend("pytorch")
    try:
        core, factors = tucker(tensor, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-8)
        ref = rel(tl.tucker_to_tensor((core, factors)), tensor)
    finally:
        tl.set_backend("numpy")
    k, a, b = ranks
    d = decompose(tensor, "tucker", Ranks(a, b, k), tol=1e-8)
    assert d.rel_error <= ref * 1.01
    assert abs(rel(d.factors.reconstruct(), tensor) - d.rel_error) < 1e-4


def test_low_rank_variants_order_and_shapes(tensor):
    n, A, B = tensor.shape
    ii = decompose(tensor, "lowrank", Ranks(5, 5))
    iii = decompose(tensor, "shared", Ranks(5, 5))
    iv = decompose(tensor, "tucker", Ranks(5, 5, 4))
    assert ii.factors.U.shape == (n, A, 5) and ii.factors.core.shape == (n, 5, 5)
    assert iii.factors.U.shape == (A, 5) and iii.factors.P is None
    assert iv.factors.P.shape == (n, 4) and iv.factors.core.shape == (4, 5, 5)
    # per-matrix SVD is optimal per slice; sharing U, V, then the bank only add error
    assert ii.rel_error <= iii.rel_error + 1e-6 <= iv.rel_error + 2e-6
    # truncated SVD error equals the tail of the singular values
    s = torch.linalg.svdvals(tensor)
    assert ii.rel_error == pytest.approx((s[:, 5:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)
    # d_in != d_out
    d = decompose(tensor, "tucker", Ranks(7, 3, 4))
    assert d.factors.core.shape == (4, 7, 3) and d.factors.U.shape == (A, 7) and d.factors.V.shape == (B, 3)
    assert rel(d.factors.reconstruct(), tensor) == pytest.approx(d.rel_error, abs=1e-5)


def test_seeded_initialisation_is_reproducible(tensor):
    a = decompose(tensor, "tucker", Ranks(5, 4, 3), init="random", seed=7, max_iter=3, tol=0)
    b = decompose(tensor, "tucker", Ranks(5, 4, 3), init="random", seed=7, max_iter=3, tol=0)
    c = decompose(tensor, "tucker", Ranks(5, 4, 3), init="random", seed=8, max_iter=3, tol=0)
    for name, t in a.factors.parameters().items():
        assert torch.equal(t, b.factors.parameters()[name]), name
    assert not torch.equal(a.factors.U, c.factors.U)
    assert a.iterations == 3 and not a.converged


def test_hooi_tolerance_and_monotone_error(tensor):
    seen = []
    d = decompose(tensor, "tucker", Ranks(5, 4, 3), init="random", seed=0, tol=1e-6,
                  callback=lambda it, err: seen.append((it, err)))
    assert d.converged and d.iterations == len(d.history) == len(seen)
    errs = [e for _, e in seen]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:]))  # HOOI never increases the error
    assert abs(errs[-1] - errs[-2]) < 1e-6
    loose = decompose(tensor, "tucker", Ranks(5, 4, 3), init="random", seed=0, tol=1e-1)
    assert loose.iterations < d.iterations


def test_bad_ranks(tensor):
    n, A, B = tensor.shape
    cases = [
        (Ranks(0, 4), "shared", r"rank_in=0 is impossible: it must be an integer in \[1, 24\]"),
        (Ranks(4, -2), "shared", r"rank_out=-2 is impossible: it must be an integer in \[1, 20\]"),
        (Ranks(25, 4), "tucker", r"rank_in=25 is impossible"),
        (Ranks(4, 4, 11), "tucker", r"bank=11 is impossible: the bank size k must be an integer in \[1, 10\]"),
        (Ranks(4, 4, 0), "tucker", r"bank=0 is impossible"),
        (Ranks(4, 4, 3), "shared", "only applies to variant 'tucker'"),
    ]
    for ranks, variant, match in cases:
        with pytest.raises(SpecError, match=match):
            decompose(tensor, variant, ranks)
    with pytest.raises(SpecError, match=r"unknown variant 'V'; valid: \['lowrank', 'shared', 'tucker', 'II'"):
        decompose(tensor, "V", Ranks(4, 4))
    with pytest.raises(SpecError, match="unknown balance 'equal'"):
        decompose(tensor, "tucker", Ranks(4, 4, 3), balance="equal")
    with pytest.raises(SpecError, match="unknown init 'zeros'"):
        decompose(tensor, "tucker", Ranks(4, 4, 3), init="zeros")
    with pytest.raises(SpecError, match=r"expected a stacked tensor of shape \(n, A, B\)"):
        decompose(tensor[0], "tucker", Ranks(4, 4, 3))


# --- balancing and dead blocks --------------------------------------------------------


@pytest.fixture(scope="module")
def unbalanced():
    """Two block types with orthogonal structure; 'small' has 1/20 the norm of 'big'."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    big = Q[:, :4] @ torch.randn(6, 4, 4, generator=g) @ Q[:, :4].t()
    small = Q[:, 4:8] @ torch.randn(6, 4, 4, generator=g) @ Q[:, 4:8].t() / 20
    return torch.cat([big, small]), ["big"] * 6 + ["small"] * 6


def test_plain_hooi_drops_low_norm_type_and_balancing_keeps_it(unbalanced):
    X, labels = unbalanced
    plain = decompose(X, "tucker", Ranks(4, 4, 6))
    assert plain.slice_errors[6:].min() > 0.99  # the small type became zero
    assert plain.slice_errors[:6].max() < 1e-4
    for balance in ("type", "slice"):
        bal = decompose(X, "tucker", Ranks(4, 4, 6), balance=balance, labels=labels)
        assert bal.slice_errors.max() < 0.99, balance
        assert bal.slice_errors[6:].mean() < 0.9
        # scaled back: the factors reconstruct the original, not the balanced tensor
        errs = (bal.factors.reconstruct() - X).flatten(1).norm(dim=1) / X.flatten(1).norm(dim=1)
        assert torch.allclose(errs, bal.slice_errors.to(errs.dtype), atol=1e-5)
    # at full rank balancing is still exact
    full = decompose(X, "tucker", Ranks(16, 16, 12), balance="type", labels=labels)
    assert full.rel_error < 1e-5


def test_balance_type_needs_labels(unbalanced):
    X, labels = unbalanced
    with pytest.raises(SpecError, match="one block-type label per stacked slice"):
        decompose(X, "tucker", Ranks(4, 4, 6), balance="type")
    with pytest.raises(SpecError, match="one block-type label per stacked slice"):
        decompose(X, "tucker", Ranks(4, 4, 6), balance="type", labels=labels[:3])


def test_warn_dead_blocks():
    with pytest.warns(RuntimeWarning, match=r"2 block\(s\) came back with relative error ≥ 0.99: a, c"):
        dead = warn_dead_blocks({"a": 0.995, "b": 0.5, "c": 1.0})
    assert dead == ["a", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_dead_blocks({"a": 0.98}) == []
