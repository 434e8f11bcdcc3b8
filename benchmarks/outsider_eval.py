"""SST-2 dev accuracy (CoLA: Matthews correlation; MRPC: the mean of F1 and accuracy; RTE: accuracy) of a
model directory or ONNX file, read the way a user outside tdlight reads it, with its balanced accuracy and
top-prediction share; or the STS-B dev score of a bi-encoder directory (task.pair_encoding=bi).

    python benchmarks/outsider_eval.py <model dir> [--task cola|mrpc|rte]    # transformers (trust_remote_code)
    python benchmarks/outsider_eval.py <model.onnx> --tokenizer <model dir>   # ONNX Runtime
    python benchmarks/outsider_eval.py <bi-encoder dir> --task stsb # sentence-transformers and transformers
    python benchmarks/outsider_eval.py <bi-encoder.onnx> --task stsb --tokenizer <its dir>   # ONNX Runtime

Never imports tdlight itself (a directory's modeling file does, as it would for a user). For a
directory it first checks that transformers refuses it without ``trust_remote_code`` (or loads it:
a plain HF directory), then prints the accuracy and the share of the most frequent prediction, and
loads it in sentence-transformers when it has a ``modules.json``. docs/RESULTS.md §10a.
The tokenizer is loaded with ``trust_remote_code=True`` as well, as the README says a user should:
transformers' ``AutoTokenizer`` reads ``config.json`` first, whose ``AutoConfig`` is the modeling
file's, and without the flag stops to ask whether to run it (then falls back to the tokenizer it names).
"""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

import numpy as np
import transformers


def _tsv(data_dir: Path, folder: str) -> list[list[str]]:
    with gzip.open(data_dir / "glue" / folder / "dev.tsv.gz", "rt", encoding="utf-8-sig") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def cola_dev(data_dir: Path) -> list[tuple[tuple[str, ...], int]]:
    """CoLA's dev sentences and labels (no header; source, label, original mark, sentence)."""
    return [((r[3],), int(r[1])) for r in _tsv(data_dir, "CoLA")]


def sst2_dev(data_dir: Path) -> list[tuple[tuple[str, ...], int]]:
    return [((r[0],), int(r[1])) for r in _tsv(data_dir, "SST-2")[1:]]


def mrpc_dev(data_dir: Path) -> list[tuple[tuple[str, ...], int]]:
    """MRPC's dev pairs (header; quality 1 = paraphrase, two ids, the two sentences)."""
    return [((r[3], r[4]), int(r[0])) for r in _tsv(data_dir, "MRPC")[1:]]


def rte_dev(data_dir: Path) -> list[tuple[tuple[str, ...], int]]:
    """RTE's dev pairs (header; index, sentence1, sentence2, label), class 0 = entailment as in GLUE."""
    return [((r[1], r[2]), ["entailment", "not_entailment"].index(r[3])) for r in _tsv(data_dir, "RTE")[1:]]


READERS = {"sst2": sst2_dev, "cola": cola_dev, "mrpc": mrpc_dev, "rte": rte_dev}
MAX_LENGTH = {"sst2": 64, "cola": 64, "mrpc": 128, "rte": 128, "stsb": 64}  # the tasks' conf/task max_length


def stsb_dev(data_dir: Path) -> list[tuple[str, str, float]]:
    with gzip.open(data_dir / "glue" / "STS-B" / "dev.tsv.gz", "rt") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]


def stsb(a) -> None:
    """A bi-encoder on STS-B dev, two ways: sentence-transformers' embeddings (5 × their cosine, as its
    users compare sentences) and transformers' classifier on batches of the first sentences then the second
    ones (the prediction tdlight trained); the GLUE score is the mean of Pearson and Spearman."""
    import torch
    from scipy.stats import pearsonr, spearmanr
    from sentence_transformers import SentenceTransformer

    rows = stsb_dev(Path(a.data_dir))
    gold = [g for _, _, g in rows]
    if a.model.endswith(".onnx"):  # (tdlight export-onnx of a bi-encoder: its encoder's last hidden states)
        import onnxruntime as ort

        session = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer, trust_remote_code=True)

        def embed(texts):
            out = []
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=a.max_length, return_tensors="np")
                h = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
                w = enc["attention_mask"][..., None].astype(h.dtype)
                out.append((h * w).sum(1) / w.sum(1))
            return np.concatenate(out)
        u, v = embed([r[0] for r in rows]), embed([r[1] for r in rows])
        pred = 5 * (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
        p, s = pearsonr(pred, gold)[0], spearmanr(pred, gold)[0]
        print(f"{a.model} (ONNX Runtime, 5 × cosine of mean-pooled states): STS-B dev Pearson {p:.4f}, Spearman "
              f"{s:.4f}, score {(p + s) / 2:.4f} over {len(rows)} pairs")
        return
    st = SentenceTransformer(a.model, trust_remote_code=True, device="cpu")
    st.max_seq_length = a.max_length
    u, v = (st.encode([r[i] for r in rows], convert_to_tensor=True, batch_size=64) for i in (0, 1))
    by_st = (5 * torch.nn.functional.cosine_similarity(u, v)).tolist()
    tok = transformers.AutoTokenizer.from_pretrained(a.model, trust_remote_code=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(a.model, trust_remote_code=True).eval()
    by_hf = []
    for i in range(0, len(rows), 64):
        part = rows[i:i + 64]
        enc = tok([r[0] for r in part] + [r[1] for r in part], padding=True, truncation=True,
                  max_length=a.max_length, return_tensors="pt")
        with torch.no_grad():
            by_hf += model(**enc).logits[:, 0].tolist()
    for kind, pred in (("sentence-transformers, 5 × cosine", by_st), (f"{type(model).__name__}", by_hf)):
        p, s = pearsonr(pred, gold)[0], spearmanr(pred, gold)[0]
        print(f"{a.model} ({kind}): STS-B dev Pearson {p:.4f}, Spearman {s:.4f}, score {(p + s) / 2:.4f} "
              f"over {len(rows)} pairs; prediction spread {np.std(pred) / np.std(gold):.3f}")
    print(f"largest difference between the two: {max(abs(x - y) for x, y in zip(by_st, by_hf)):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokenizer", help="tokenizer directory (an ONNX file has none)")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--max-length", type=int, help="default: the task's own (64; MRPC and RTE: 128)")
    ap.add_argument("--task", choices=(*READERS, "stsb"), default="sst2")
    a = ap.parse_args()
    a.max_length = a.max_length or MAX_LENGTH[a.task]
    if a.task == "stsb":
        return stsb(a)
    rows = READERS[a.task](Path(a.data_dir))
    if a.model.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def logits(enc):
            return session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
        kind, tensors = "ONNX Runtime", "np"
    else:
        import torch

        try:
            transformers.AutoModelForSequenceClassification.from_pretrained(a.model)
            print("loaded without trust_remote_code (a plain HF directory)")
        except ValueError as e:
            print("refused without trust_remote_code:", str(e).splitlines()[0][:120])
        model = transformers.AutoModelForSequenceClassification.from_pretrained(a.model, trust_remote_code=True).eval()

        def logits(enc):
            with torch.no_grad():
                return model(**enc).logits.numpy()
        kind, tensors = type(model).__name__, "pt"
    # after the refusal check above: once a modeling file has run, tdlight is imported and registers its types
    tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer or a.model, trust_remote_code=True)
    preds = []
    for i in range(0, len(rows), 64):
        texts = list(zip(*[t for t, _ in rows[i:i + 64]]))  # one list per column: a pair is two
        enc = tok(*texts, padding=True, truncation=True, max_length=a.max_length, return_tensors=tensors)
        preds += logits(enc).argmax(-1).tolist()
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, matthews_corrcoef

    gold = [g for _, g in rows]
    top = max(preds.count(c) for c in set(preds)) / len(preds)
    accuracy = accuracy_score(gold, preds)
    score = {"cola": f"CoLA dev Matthews correlation {matthews_corrcoef(gold, preds):.4f}",
             "sst2": f"SST-2 dev accuracy {accuracy:.4f}", "rte": f"RTE dev accuracy {accuracy:.4f}",
             "mrpc": f"MRPC dev score {(f1_score(gold, preds) + accuracy) / 2:.4f} (F1 {f1_score(gold, preds):.4f}, "
                     f"accuracy {accuracy:.4f})"}[a.task]
    print(f"{a.model} ({kind}): {score} over {len(rows)}, balanced accuracy "
          f"{balanced_accuracy_score(gold, preds):.4f}, top-prediction share {top:.3f}")
    if not a.model.endswith(".onnx") and (Path(a.model) / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(a.model, trust_remote_code=True, device="cpu")
        print("sentence-transformers embedding shape", tuple(st.encode(["a fine film"]).shape))


if __name__ == "__main__":
    main()
