"""BERT (the embedded MiniLM is one)."""

from tdlight.model.families.base import Family

# BERT's layer layout, which RoBERTa and ELECTRA share
BERT_LINEARS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}

BERT = Family(
    name="bert",
    model_types=("bert",),
    linears=BERT_LINEARS,
    attention="attention.self",
)
