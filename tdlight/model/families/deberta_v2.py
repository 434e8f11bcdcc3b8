"""DeBERTa-v2 and -v3: ``attention.self.{query,key,value}_proj`` with disentangled relative attention.

With ``share_att_key`` (v3's default) the relative embeddings go through the same ``query_proj`` /
``key_proj`` as the tokens, so the compressed Q/K serve both; without it the extra ``pos_*_proj``
linears stay dense. The relative embeddings (``encoder.rel_embeddings``) stay dense. The
convolution some v2 checkpoints put after the first layer (``conv_kernel_size > 0``, xlarge/xxlarge)
mixes layer 0's output outside the layer, which the layer-by-layer refit cannot see: refused.
Attention scores for distillation are read as log probabilities (no AttentionInterface)."""

from tdlight.model.families.base import Family


def _refuse(config) -> str | None:
    k = getattr(config, "conv_kernel_size", 0) or 0
    if k > 0:
        return (f"conv_kernel_size={k}: the convolution after the first layer is not supported "
                "(valid: a DeBERTa-v2/v3 config with conv_kernel_size=0, as deberta-v3-base/-small/-xsmall)")
    return None


DEBERTA_V2 = Family(
    name="deberta-v2",
    model_types=("deberta-v2",),
    linears={"query": "attention.self.query_proj", "key": "attention.self.key_proj",
             "value": "attention.self.value_proj", "attn_out": "attention.output.dense",
             "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
    embedding_extras=("encoder.rel_embeddings", "encoder.LayerNorm"),
    first_token_head="pooler",
    attention="attention.self",
    scores="probabilities",
    refuse=_refuse,
)
