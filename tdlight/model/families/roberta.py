"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's layer layout; positions are numbered after the padding index."""

from tdlight.model.families.base import Family
from tdlight.model.families.bert import BERT_LINEARS

ROBERTA = Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta", "camembert"),
    linears=BERT_LINEARS,
    first_token_head="classifier",
    attention="attention.self",
    positions_after_padding=True,
)
