"""TinyBERT-style data augmentation by word replacement with embedding neighbours.

For each training example, ``copies`` new versions are made: every whitespace-separated
word that is a single whole-word token of the vocabulary is, with probability ``prob``,
replaced by one of its ``neighbours`` nearest tokens by cosine similarity of the teacher's
input embeddings (whole-word, non-special tokens only); other words stay. TinyBERT also
uses masked-LM predictions, but the embedded MiniLM teacher ships no MLM head, so the
embedding neighbours are what works for every teacher here. Augmented examples carry no
trustworthy gold label: they are for distillation from the teacher's soft targets only.
The result is cached to disk with the tokenized dataset (see ``GlueDataModule``).
"""

from __future__ import annotations

import random

import torch


def neighbour_table(embeddings: torch.Tensor, tokenizer, k: int, chunk: int = 2048) -> dict[int, list[int]]:
    """``{token id: [k nearest whole-word token ids]}`` by cosine similarity of the embedding rows."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    ids = sorted(i for t, i in vocab.items()
                 if i not in special and not t.startswith("##") and not (t.startswith("[") and t.endswith("]"))
                 and i < embeddings.shape[0])
    if len(ids) < 2:
        return {}
    idx = torch.tensor(ids)
    e = torch.nn.functional.normalize(embeddings[idx].float(), dim=-1)
    k = min(k, len(ids) - 1)
    table: dict[int, list[int]] = {}
    for start in range(0, len(ids), chunk):
        sims = e[start:start + chunk] @ e.t()
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0  # not itself
        top = sims.topk(k, dim=-1).indices
        for row, nb in enumerate(top.tolist()):
            table[ids[start + row]] = [ids[j] for j in nb]
    return table


def augment_text(text: str, vocab: dict[str, int], inverse: dict[int, str], table: dict[int, list[int]],
                 prob: float, rng: random.Random, lower: bool) -> str:
    """``text`` with each replaceable word swapped for a neighbour with probability ``prob``."""
    out = []
    for word in text.split(" "):
        tid = vocab.get(word.lower() if lower else word)
        if tid is not None and tid in table and rng.random() < prob:
            out.append(inverse[rng.choice(table[tid])])
        else:
            out.append(word)
    return " ".join(out)


def augment_columns(columns: dict[str, list], text_columns: tuple[str, ...], tokenizer, table: dict[int, list[int]],
                    *, copies: int, prob: float, seed: int) -> dict[str, list]:
    """The original rows followed by ``copies`` augmented versions of each (same label, new ``idx``)."""
    if copies < 0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"augmentation needs copies >= 0 and prob in [0, 1], got copies={copies}, prob={prob}")
    vocab = tokenizer.get_vocab()
    inverse = {i: t for t, i in vocab.items()}
    lower = bool(getattr(tokenizer, "do_lower_case", False) or tokenizer.init_kwargs.get("do_lower_case", False))
    rng = random.Random(seed)
    out = {k: list(v) for k, v in columns.items()}
    n = len(columns["label"])
    for _ in range(copies):
        for i in range(n):
            for c in columns:
                if c in text_columns:
                    out[c].append(augment_text(columns[c][i], vocab, inverse, table, prob, rng, lower))
                elif c == "idx":
                    out[c].append(len(out[c]))
                else:
                    out[c].append(columns[c][i])
    return out
