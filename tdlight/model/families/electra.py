"""ELECTRA (the discriminator and generator encoders): BERT's layer layout. Its word embeddings may be
narrower than the hidden size (``embedding_size``, projected by ``embeddings_project``): the encoder
is compressed as any other; compressing that narrower table (``embedding_rank``) is refused by
:mod:`tdlight.model.embedding`'s shape check."""

from tdlight.model.families.base import Family
from tdlight.model.families.bert import BERT_LINEARS

ELECTRA = Family(
    name="electra",
    model_types=("electra",),
    linears=BERT_LINEARS,
    embedding_extras=("embeddings_project",),
    first_token_head="classifier",
    attention="attention.self",
)
