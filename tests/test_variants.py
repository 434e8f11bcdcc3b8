"""The variant registry (tdlight.tensor.variants): lookup, the contract every registered variant
keeps, and that a new variant needs nothing but its class and its registry entry.

The contract tests are parametrised over ``VARIANTS``, so a newly registered variant is
checked without touching this file.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from tdlight.errors import SpecError
from tdlight.tensor.decompose import Ranks, decompose
from tdlight.tensor.spec import CompressionSpec, EncoderShape, resolve
from tdlight.tensor.variants import VARIANTS, variant_of
from tdlight.tensor.whiten import decompose_whitened, prepare_gram, refit_blocks, whitened_errors

ALL = sorted(VARIANTS)


def test_registry_holds_the_papers_variants_by_name_and_numeral():
    assert list(VARIANTS) == ["lowrank", "shared", "tucker"]
    for name, numeral in (("lowrank", "II"), ("shared", "III"), ("tucker", "IV")):
        assert variant_of(name) is VARIANTS[name] and variant_of(numeral) is VARIANTS[name]
        assert VARIANTS[name].name == name and VARIANTS[name].numeral == numeral


@pytest.mark.parametrize("bad", ["V", "Tucker", "", "IV+"])
def test_an_unknown_variant_is_refused_naming_it_and_the_valid_ones(bad):
    with pytest.raises(SpecError) as e:
        variant_of(bad)
    assert str(e.value) == (f"unknown variant {bad!r}; valid: ['lowrank', 'shared', 'tucker', 'II', 'III', 'IV'] "
                            "(plus 'dense' for no compression)")
    shape = EncoderShape(num_layers=1, hidden=8, intermediate=32)
    with pytest.raises(SpecError, match=re.escape(f"unknown variant {bad!r}; valid: [") + ".*'tucker'"):
        resolve(CompressionSpec(variant=bad, rank=2), shape)


def test_dense_is_refused_as_no_compression():
    with pytest.raises(SpecError, match="variant 'dense' \\(I\\) means no compression"):
        variant_of("dense")
    with pytest.raises(SpecError, match="variant 'dense' \\(I\\) means no compression"):
        decompose(torch.randn(3, 4, 4), "dense", Ranks(2, 2))


def test_a_bank_is_refused_by_variants_without_one():
    for v in VARIANTS.values():
        if not v.has_bank:
            msg = f"bank=2 only applies to variant 'tucker' \\(IV\\); variant {v.name!r}"
            with pytest.raises(SpecError, match=msg):
                v.check(Ranks(2, 2, 2), (5, 4, 4))
            v.check(Ranks(2, 2, 5), (5, 4, 4))  # k = n is what it has anyway


def _tensor(n=6, A=10, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, A, B, generator=g, dtype=torch.float64)


def _ranks(v, a, b, k):
    return Ranks(a, b, k if v.has_bank else None)


@pytest.mark.parametrize("name", ALL)
def test_full_rank_round_trips_by_weights_and_by_outputs(name):
    v = VARIANTS[name]
    W = _tensor()
    n, A, B = W.shape
    for dec in (decompose(W, name, _ranks(v, A, B, n)),
                decompose_whitened(W, torch.eye(A, dtype=W.dtype).expand(n, A, A), name, _ranks(v, A, B, n))):
        assert dec.factors.variant == name
        assert torch.allclose(dec.factors.reconstruct(), W, atol=1e-9)
        assert dec.rel_error < 1e-9


@pytest.mark.parametrize("name", ALL)
def test_factors_have_the_variants_shapes_and_parameter_count(name):
    v = VARIANTS[name]
    W = _tensor()
    n, A, B = W.shape
    a, b, k = 4, 3, 2
    k_eff = v.bank_size(_ranks(v, a, b, k), n)
    shapes = v.shapes(n, k_eff, A, B, a, b)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 30, A, generator=g, dtype=torch.float64)
    H = torch.stack([prepare_gram(x.t() @ x / 30) for x in X])
    for dec in (decompose(W, name, _ranks(v, a, b, k)), decompose_whitened(W, H, name, _ranks(v, a, b, k), iters=3)):
        f = dec.factors
        got = {"U": tuple(f.U.shape), "V": tuple(f.V.shape), "core": tuple(f.core.shape),
               "P": None if f.P is None else tuple(f.P.shape)}
        assert got == shapes
        assert sum(t.numel() for t in f.parameters().values()) == v.param_count(n, k_eff, A, B, a, b)
        assert f.per_block == (not v.shared_factors)
        assert 0 < dec.rel_error < 1
    assert v.param_count(n, k_eff, A, B, a, b) == sum(math.prod(s) for s in shapes.values() if s)


@pytest.mark.parametrize("name", ALL)
def test_matmul_equals_x_times_the_reconstructed_blocks(name):
    v = VARIANTS[name]
    W = _tensor(A=8, B=8).float()
    n, A, B = W.shape
    f = decompose(W, name, _ranks(v, 3, 5, 4)).factors
    g = torch.Generator().manual_seed(2)
    blocks = torch.tensor([[0, 4, 2], [5, 1, 3]])  # n_in = 2 input chunks, n_out = 3 output chunks
    x = torch.randn(2, 7, 2 * A, generator=g)
    y = v.matmul(x, f, blocks)
    Wh = f.reconstruct(blocks.flatten()).view(2, 3, A, B)
    xs = x.unflatten(-1, (2, A))
    ref = torch.stack([sum(xs[..., j, :] @ Wh[j, m] for j in range(2)) for m in range(3)], dim=-2)
    assert y.shape == (2, 7, 3, B)
    assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_refit_blocks_reproduces_blocks_the_factors_can_represent(name):
    """Refit rows to their own reconstruction: they come back unchanged, and no other row moves."""
    v = VARIANTS[name]
    W = _tensor()
    n, A, B = W.shape
    f = decompose(W, name, _ranks(v, 4, 3, 3)).factors
    rows = torch.tensor([1, 4])
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 30, A, generator=g, dtype=torch.float64)
    H = torch.stack([prepare_gram(x.t() @ x / 30) for x in X])
    new = refit_blocks(f, rows, f.reconstruct(rows), H)
    assert new.variant == name
    assert torch.allclose(new.reconstruct(), f.reconstruct(), atol=1e-8)
    # and a refit to a different target lowers those rows' output error
    target = W[rows]
    before = whitened_errors(target, type(f)(f.variant, *_rows(f, rows)), H)
    after = whitened_errors(target, type(f)(f.variant, *_rows(refit_blocks(f, rows, target, H), rows)), H)
    assert (after <= before + 1e-9).all()


def _rows(f, rows):
    """The factors of just ``rows`` (per-block tensors and P indexed, shared ones kept)."""
    if f.per_block:
        return f.U[rows], f.V[rows], f.core[rows], None
    if f.P is None:
        return f.U, f.V, f.core[rows], None
    return f.U, f.V, f.core, f.P[rows]


def test_a_new_variant_is_one_class_and_one_registry_entry(tiny_bert, token_ids, tmp_path):
    """A variant registered from outside the package goes through compress, the accounting,
    the factorized forward and save/load with nothing else edited."""
    from tdlight.model.io import load_compressed, save_compressed
    from tdlight.model.surgery import compress, count_parameters, encoder_shape
    from tdlight.tensor.accounting import param_counts
    from tdlight.tensor.variants.base import register
    from tdlight.tensor.variants.shared import Shared

    class Toy(Shared):
        name, numeral, formula = "toy", "III-toy", "W_i ≈ U C_i Vᵀ (a copy of III)"

    known = list(VARIANTS.values())
    register(*known, Toy())
    try:
        report = compress(tiny_bert, CompressionSpec(variant="toy", rank=32))  # full rank: exact
        assert report.spec.variant == "toy" and report.rel_error < 1e-5
        counts = param_counts(encoder_shape(tiny_bert), report.spec)
        assert counts["encoder"] == count_parameters(tiny_bert)["encoder"]
        with torch.no_grad():
            y = tiny_bert(**token_ids).last_hidden_state
        loaded = load_compressed(save_compressed(tiny_bert, tmp_path / "m"))
        assert loaded.encoder.factor_banks["encoder"].variant == "toy"
        for name, value in tiny_bert.state_dict().items():  # the weights come back bit for bit
            assert torch.equal(loaded.state_dict()[name], value), name
        with torch.no_grad():  # outputs to float rounding (BLAS may pick another kernel)
            torch.testing.assert_close(loaded(**token_ids).last_hidden_state, y, rtol=1e-6, atol=1e-6)
    finally:
        register(*known)
    assert list(VARIANTS) == ["lowrank", "shared", "tucker"]
    with pytest.raises(SpecError, match="unknown variant 'toy'"):
        variant_of("toy")
