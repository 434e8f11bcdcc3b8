"""Word-embedding compression of the real MiniLM: low-rank fit error, uniform vs frequency-weighted
rows, and the whole-model parameters it buys.

    .venv/bin/python benchmarks/embedding_fit.py [--ranks 64,128,192] [--count-chars 10000000]

Token counts (the frequency weights) come from the first ``--count-chars`` characters of the
Wikipedia extract (the decompose stage's default calibration text). Errors are relative,
‖E − AB‖ / ‖E‖ over rows: every row alike ("table"), and weighted by how often each row is read
in a text: the counting text itself, WikiText-103 valid (held out) and SST-2 dev (another
domain). "last hidden" is the relative error of MiniLM's last hidden state with only its word
embeddings compressed, on held-out WikiText sequences (the encoder stays dense).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from tdlight.data.glue import task_text
from tdlight.data.vocab import count_tokens, token_stats
from tdlight.model.embedding import compress_embeddings
from tdlight.model.surgery import encoder_shape
from tdlight.model.teacher import load_teacher
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.embedding import TokenStats, embedding_error, fit_embedding, row_weights
from tdlight.tensor.spec import CompressionSpec, resolve

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "pretrain_corpus" / "enwiki_2015_wikiextractor_AA.txt.gz"
HELDOUT = DATA / "pretrain_corpus" / "wikitext103_heldout" / "wiki.valid.tokens.gz"


def heldout_batch(tokenizer, n: int = 32, length: int = 128) -> dict:
    from tdlight.data.corpus.files import raw_lines

    lines = [ln for ln in raw_lines(HELDOUT) if len(ln.split()) > 60 and not ln.strip().startswith("=")][:n]
    return tokenizer(lines, truncation=True, max_length=length, padding=True, return_tensors="pt")


@torch.no_grad()
def last_hidden_error(teacher, student, batch) -> float:
    a = teacher(**batch).last_hidden_state
    b = student(**batch).last_hidden_state
    m = batch["attention_mask"].bool()
    return float((a - b)[m].norm() / a[m].norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="64,128,192")
    ap.add_argument("--count-chars", type=int, default=10_000_000)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_teacher("minilm")
    model.eval()
    E = model.get_input_embeddings().weight.detach()
    V, D = E.shape
    t0 = time.perf_counter()
    stats = token_stats(tok, WIKI, V, what="calibration", max_chars=args.count_chars)
    print(f"counts: {int(stats.counts.sum()):,} tokens, {int((stats.counts > 0).sum()):,} distinct of {V:,} "
          f"({time.perf_counter() - t0:.0f} s)")
    from tdlight.data.corpus.files import raw_lines

    held = count_tokens(tok, raw_lines(HELDOUT), V)
    sst = count_tokens(tok, task_text("sst2", "validation", data_dir=DATA / "glue", source="local"), V)
    batch = heldout_batch(tok)
    w = row_weights(stats.counts)
    print("\n| r | weighting | table | calibration text | WikiText valid | SST-2 dev | last hidden (WikiText) |")
    print("|---|---|---|---|---|---|---|")
    for r in map(int, args.ranks.split(",")):
        for name, weights in (("uniform", None), ("frequency", w)):
            fit = fit_embedding(E, r, weights)
            approx = fit.A @ fit.B
            errs = [embedding_error(E, approx), embedding_error(E, approx, stats.counts),
                    embedding_error(E, approx, held), embedding_error(E, approx, sst)]
            student = copy.deepcopy(model)
            spec = resolve(CompressionSpec(rank=8, embedding_rank=r,
                                           embedding_weighting=None if name == "uniform" else "frequency"),
                           encoder_shape(model))
            compress_embeddings(student, spec, stats if name == "frequency" else None)
            lh = last_hidden_error(model, student, batch)
            print(f"| {r} | {name} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {lh:.4f} |")

    # a vocabulary restricted to SST-2's training text
    train = task_text("sst2", "train", data_dir=DATA / "glue", source="local")
    kept = TokenStats(count_tokens(tok, train, V), tuple(tok.all_special_ids), tok.unk_token_id).kept_ids()
    mask = torch.zeros(V, dtype=torch.bool)
    mask[kept] = True
    print(f"\nvocab=task (SST-2 train): {kept.numel():,} of {V:,} rows kept; SST-2 dev token occurrences "
          f"covered {float(sst[mask].sum() / sst.sum()):.4f}; WikiText valid {float(held[mask].sum() / held.sum()):.4f}")

    shape = encoder_shape(model)
    print("\n| spec | encoder ratio | whole-model parameters | whole-model ratio |")
    print("|---|---|---|---|")
    for label, extra, vs in (("paper_1_7", {}, None), ("paper_1_7, embedding_rank=128", {"embedding_rank": 128}, None),
                             ("paper_1_7, embedding_rank=64", {"embedding_rank": 64}, None),
                             ("paper_1_7, embedding_rank=64, vocab=task (SST-2)", {"embedding_rank": 64, "vocab": "task"},
                              int(kept.numel())),
                             ("paper_1_48, embedding_rank=64", {"embedding_rank": 64}, None)):
        base = ({"rank_ratio": 0.5, "bank_ratio": 0.5} if label.startswith("paper_1_7")
                else {"bank_ratio": 0.25, "target_ratio": 48})
        c = param_counts(shape, resolve(CompressionSpec(**base, **extra), shape, vocab_size=vs))
        print(f"| {label} | {c['ratio']:.2f} | {c['model']:,} of {c['dense_model']:,} | {c['model_ratio']:.2f} |")


if __name__ == "__main__":
    main()
