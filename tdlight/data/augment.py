"""TinyBERT-style data augmentation by word replacement.

For each training example, ``copies`` new versions are made: every whitespace-separated
word that is a single whole-word token of the vocabulary is, with probability ``prob``,
replaced by one of its candidates; other words (multi-piece words, punctuation-attached
words) stay. Two sources of candidates:

* ``neighbours`` — the ``k`` nearest tokens by cosine similarity of the teacher's input
  embeddings (whole-word, non-special tokens only). Context-free; works for every teacher,
  including the embedded MiniLM, which ships no masked-LM head.
* ``mlm`` — TinyBERT's: the word is masked and a masked language model's top ``k``
  whole-word predictions at that position (the word itself excluded) are the candidates.
  Each chosen word is predicted in the *original* sentence (TinyBERT re-predicts in the
  progressively edited one), so that all masked copies of a dataset run as batches.

Augmented examples carry no trustworthy gold label: they are for distillation from the
teacher's soft targets only. The result is cached to disk with the tokenized dataset (see
``GlueDataModule``).
"""

from __future__ import annotations

import random

import torch


def whole_word_ids(tokenizer, limit: int) -> list[int]:
    """Sorted ids below ``limit`` of the vocabulary's whole-word tokens (no ``##`` pieces, no
    special or ``[unused]`` tokens): what a word may be replaced with."""
    special = set(tokenizer.all_special_ids)
    return sorted(i for t, i in tokenizer.get_vocab().items()
                  if i not in special and not t.startswith("##") and not (t.startswith("[") and t.endswith("]"))
                  and i < limit)


def neighbour_table(embeddings: torch.Tensor, tokenizer, k: int, chunk: int = 2048) -> dict[int, list[int]]:
    """``{token id: [k nearest whole-word token ids]}`` by cosine similarity of the embedding rows."""
    ids = whole_word_ids(tokenizer, embeddings.shape[0])
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


class MaskedLMCandidates:
    """Context-dependent candidates from a masked language model (``*ForMaskedLM``).

    Called with ``[(words, position, token id of the word), ...]``, it masks each word in
    its sentence and returns, per request, the ``k`` most likely whole-word tokens at the
    mask (the word itself excluded), batched ``batch_size`` sentences at a time.
    """

    def __init__(self, model, tokenizer, k: int, *, batch_size: int = 64, max_length: int = 128):
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no mask token")
        self.model, self.tokenizer, self.k = model.eval(), tokenizer, k
        self.batch_size, self.max_length = batch_size, max_length
        vocab_size = model.get_output_embeddings().weight.shape[0]
        self.allowed = torch.zeros(vocab_size, dtype=torch.bool)
        self.allowed[whole_word_ids(tokenizer, vocab_size)] = True

    def replaceable(self, tid: int) -> bool:
        return tid < len(self.allowed) and bool(self.allowed[tid])

    @torch.no_grad()
    def __call__(self, requests: list[tuple[list[str], int, int]]) -> list[list[int]]:
        out: list[list[int]] = []
        k = min(self.k, int(self.allowed.sum()) - 1)  # the word itself is excluded
        if k < 1:
            return [[] for _ in requests]
        device = next(self.model.parameters()).device
        mask = self.tokenizer.mask_token
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            texts = [" ".join(words[:p] + [mask] + words[p + 1:]) for words, p, _ in chunk]
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(device)
            is_mask = enc["input_ids"] == self.tokenizer.mask_token_id
            logits = self.model(**enc).logits  # (B, L, V)
            rows = logits[torch.arange(len(chunk), device=device), is_mask.float().argmax(dim=1)].float().cpu()
            rows[:, ~self.allowed] = float("-inf")
            rows[torch.arange(len(chunk)), torch.tensor([tid for _, _, tid in chunk])] = float("-inf")
            top = rows.topk(k, dim=-1).indices.tolist()
            # a mask cut off by truncation has no prediction: that word stays as it is
            out.extend(t if has else [] for t, has in zip(top, is_mask.any(dim=1).tolist()))
        return out


class NeighbourCandidates:
    """Context-free candidates: a word's entry of a :func:`neighbour_table`."""

    def __init__(self, table: dict[int, list[int]]):
        self.table = table

    def replaceable(self, tid: int) -> bool:
        return tid in self.table

    def __call__(self, requests: list[tuple[list[str], int, int]]) -> list[list[int]]:
        return [self.table[tid] for _, _, tid in requests]


def augment_columns(columns: dict[str, list], text_columns: tuple[str, ...], tokenizer,
                    table: dict[int, list[int]] | None, *, copies: int, prob: float, seed: int,
                    mlm: MaskedLMCandidates | None = None) -> dict[str, list]:
    """The original rows followed by ``copies`` augmented versions of each (same label, new ``idx``).

    Candidates come from the neighbour ``table`` (:func:`neighbour_table`), or from ``mlm``
    when it is given.
    """
    if copies < 0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"augmentation needs copies >= 0 and prob in [0, 1], got copies={copies}, prob={prob}")
    if (table is None) == (mlm is None):
        raise ValueError("augmentation needs exactly one source of candidates: a neighbour table or a masked LM")
    source = mlm if mlm is not None else NeighbourCandidates(table)
    vocab = tokenizer.get_vocab()
    inverse = {i: t for t, i in vocab.items()}
    lower = bool(getattr(tokenizer, "do_lower_case", False) or tokenizer.init_kwargs.get("do_lower_case", False))
    rng = random.Random(seed)
    out = {k: list(v) for k, v in columns.items()}
    n = len(columns["label"])
    # first choose the words to replace, then ask for all their candidates at once (a masked LM
    # runs them as batches), then pick one candidate per word
    pending: list[tuple[list, int, list[str], int, int]] = []  # (column, row, words, position, token id)
    for _ in range(copies):
        for i in range(n):
            for c in columns:
                if c in text_columns:
                    words = columns[c][i].split(" ")
                    for j, w in enumerate(words):
                        tid = vocab.get(w.lower() if lower else w)
                        if tid is not None and source.replaceable(tid) and rng.random() < prob:
                            pending.append((out[c], len(out[c]), words, j, tid))
                    out[c].append(list(words))  # edited below, joined at the end
                elif c == "idx":
                    out[c].append(len(out[c]))
                else:
                    out[c].append(columns[c][i])
    candidates = source([(words, j, tid) for _, _, words, j, tid in pending])
    for (col, row, _, j, _), cands in zip(pending, candidates):
        if cands:
            col[row][j] = inverse[rng.choice(cands)]
    for c in text_columns:
        out[c] = [" ".join(x) if isinstance(x, list) else x for x in out[c]]
    return out
