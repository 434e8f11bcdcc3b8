"""MPNet (sentence-transformers' all-mpnet-base-v2): BERT's layer nesting with ``attention.attn.{q,k,v,o}``
and a relative position bias shared by all layers (``encoder.relative_attention_bias``, not compressed).
Its attention does not go through transformers' AttentionInterface, so distillation matches the log
attention probabilities (:data:`~tdlight.model.families.base.SCORE_SOURCES`)."""

from tdlight.model.families.base import Family

MPNET = Family(
    name="mpnet",
    model_types=("mpnet",),
    linears={"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
             "attn_out": "attention.attn.o", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
    embedding_extras=("encoder.relative_attention_bias",),
    first_token_head="classifier",
    attention="attention.attn",
    scores="probabilities",
    positions_after_padding=True,
)
