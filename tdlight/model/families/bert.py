"""BERT and its layout-alike descendants: RoBERTa, XLM-RoBERTa, CamemBERT (the embedded MiniLM is a BERT)."""

from tdlight.model.families.base import Family

BERT = Family(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    linears={"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
    attention="attention.self",
)
