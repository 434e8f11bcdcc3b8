"""DistilBERT: the layers live in ``transformer.layer``, the linears are ``q_lin``/``k_lin``/``v_lin``/
``out_lin`` and ``ffn.lin1``/``lin2``; its config says ``hidden_dim`` for the FFN width and
``dropout``/``attention_dropout``. No token types, no [CLS] pooler (its classifier reads token 0
through ``pre_classifier``)."""

from tdlight.model.families.base import Family

DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    encoder="transformer",
    linears={"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
             "attn_out": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
    attention="attention",
    intermediate_key="hidden_dim",
    dropout_keys=("dropout", "attention_dropout"),
)
