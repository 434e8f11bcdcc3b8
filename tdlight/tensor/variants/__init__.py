"""The compression variants (DESIGN §1), one small strategy object each, chosen once by name.

A variant is a :class:`~tdlight.tensor.variants.base.Variant`: two facts (``shared_factors``:
one U, V per group or one per block; ``has_bank``: a bank of k cores mixed by P, or one core
per block) that fix the factor shapes, the parameter count, the bank layout and whether
Q, K, V share ``x @ U``; and its own math: the weight fit (:func:`tdlight.tensor.decompose.decompose`),
the output fit and block refit (:mod:`tdlight.tensor.whiten`) and the forward ``x @ W``
(:class:`tdlight.model.linear.FactorizedLinear`). Code asks the object
(``spec.strategy.has_bank``, ``variant_of(name).fit_weights(...)``), never compares names.
The config value and the saved metadata stay the name (``compression.variant=tucker``).

**Adding a variant** is one new file here, ``tdlight/tensor/variants/<name>.py`` with a
``Variant`` subclass (name, numeral, formula, the two facts, ``fit_weights``, ``fit_outputs``,
``refit_blocks``, ``matmul``), plus its line in :data:`VARIANTS` below. Optionally a preset
``conf/compression/<name>.yaml``.
"""

from __future__ import annotations

from tdlight.tensor.variants.base import NO_COMPRESSION, Variant, register, variant_of, with_bank
from tdlight.tensor.variants.lowrank import LowRank
from tdlight.tensor.variants.shared import Shared
from tdlight.tensor.variants.tucker import Tucker

VARIANTS: dict[str, Variant] = register(
    LowRank(),  # II
    Shared(),  # III
    Tucker(),  # IV
)

__all__ = ["NO_COMPRESSION", "VARIANTS", "Variant", "variant_of", "with_bank"]
