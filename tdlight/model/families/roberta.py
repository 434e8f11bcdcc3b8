"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's layer layout; positions are numbered after the padding index."""

from tdlight.model.families.base import Family

ROBERTA = Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta", "camembert"),
    linears={"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
    first_token_head="classifier",
    attention="attention.self",
    positions_after_padding=True,
)
