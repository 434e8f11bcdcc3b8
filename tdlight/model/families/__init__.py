"""The encoder families tdlight compresses, one declaration each (:class:`~tdlight.model.families.base.Family`).

**Adding a family** is one new file here, ``tdlight/model/families/<name>.py`` declaring a
``Family`` (its model types, the path of each of the six linears inside a layer, the attention
module and how its scores are read, the config keys that differ), plus its line in
:data:`FAMILIES` below. Then a tiny random config of it must decompose exactly at full rank and
round-trip through save/load and ONNX (``tests/test_families.py`` lists the families it builds).

Not a family: ModernBERT. Its attention is one fused ``Wqkv`` (3D × D) and its FFN a gated
``Wi`` (2I × D) whose two halves multiply, so neither its Q/K/V nor its FFN input is a separate
linear that a block of the D × D grid can replace; it needs its own block grid (a fused Q/K/V
split into three blocks, a gate half and an up half per FFN input block) in the tensor layer,
not only a declaration here.
"""

from tdlight.model.families.base import (BLOCK_TYPES, REGISTRY, SCORE_SOURCES, Family, family_of, max_tokens, register,
                                        resolve, supported)
from tdlight.model.families.bert import BERT
from tdlight.model.families.deberta_v2 import DEBERTA_V2
from tdlight.model.families.distilbert import DISTILBERT
from tdlight.model.families.electra import ELECTRA
from tdlight.model.families.mpnet import MPNET
from tdlight.model.families.roberta import ROBERTA

FAMILIES: dict[str, Family] = register((
    BERT,
    ROBERTA,
    ELECTRA,
    DISTILBERT,
    MPNET,
    DEBERTA_V2,
))

__all__ = ["BLOCK_TYPES", "FAMILIES", "REGISTRY", "SCORE_SOURCES", "Family", "family_of", "max_tokens", "register",
           "resolve", "supported"]
