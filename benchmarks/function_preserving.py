"""Plain HOOI vs the function-preserving output fit (stage.fit=outputs) on a real teacher.

    OMP_NUM_THREADS=1 python benchmarks/function_preserving.py            # MiniLM, ratios ~2, ~7, ~48
    python benchmarks/function_preserving.py --sequences 128 --iters 5 --ratios paper_1_7 --passes 1

For every compression (variant IV, one group): HOOI on the weights (the paper's start,
balance none), then the output fit of :func:`tdlight.model.calibration.fit_outputs` started
from it, with the teacher's input Grams from ``--sequences`` calibration sequences of the
Wikipedia extract, then ``--passes`` passes of the refit on the compressed model's own
inputs (:func:`tdlight.model.calibration.refit_outputs`, biases refit unless ``--no-bias``;
a pass is kept only if the held-out last-hidden-state error improves; rows ``refit N``). Prints, on held-out WikiText-103 (valid) sequences, the relative output
error of each layer given the teacher's input (L1..), of the last hidden state (the
student's own forward, errors compounding), and the dead blocks (relative output error
≥ 0.99 on the calibration inputs; in brackets: relative weight error ≥ 0.99).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tdlight.data.corpus.datamodule import CorpusDataModule  # noqa: E402
from tdlight.model.calibration import collect_grams, fit_outputs, output_errors, refit_outputs  # noqa: E402
from tdlight.model.surgery import compress, encoder_shape, encoder_weights  # noqa: E402
from tdlight.model.teacher import load_teacher  # noqa: E402
from tdlight.tensor.accounting import param_counts  # noqa: E402
from tdlight.tensor.decompose import DEAD_BLOCK_ERROR  # noqa: E402
from tdlight.tensor.spec import CompressionSpec  # noqa: E402

PRESETS = {
    "r256_k72": {"variant": "tucker", "rank": 256, "bank": 72},  # ratio ~2
    "paper_1_7": "paper_1_7",
    "paper_1_48": "paper_1_48",
}


def spec_of(name: str) -> CompressionSpec:
    p = PRESETS[name]
    if isinstance(p, str):
        d = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "compression" / f"{p}.yaml"))
        d.pop("name", None)
        return CompressionSpec.from_dict(d)
    return CompressionSpec.from_dict(p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ROOT.parent / "shared" / "data" / "pretrain_corpus"
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--ratios", default=",".join(PRESETS), help=f"comma list of {list(PRESETS)}")
    p.add_argument("--calibration", default=str(data / "enwiki_2015_wikiextractor_AA.txt.gz"))
    p.add_argument("--heldout", default=str(data / "wikitext103_heldout" / "wiki.valid.tokens.gz"))
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--heldout-sequences", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--damp", type=float, default=1e-2)
    p.add_argument("--passes", type=int, default=1, help="refit passes on the student's own inputs (0 = off)")
    p.add_argument("--refit", default="layerwise", help="refit mode: layerwise | global | both")
    p.add_argument("--no-bias", action="store_true", help="do not refit the biases in the refit passes")
    args = p.parse_args()
    torch.manual_seed(0)

    teacher, tok = load_teacher(args.teacher)
    teacher.eval()
    dm = CorpusDataModule(tok, train_files=args.calibration, heldout_files=args.heldout, max_length=args.max_length,
                          batch_size=16, shuffle_buffer=0, max_train_sequences=args.sequences,
                          max_heldout_sequences=args.heldout_sequences)
    calib, heldout = list(dm.train_dataloader()), list(dm.val_dataloader())
    t0 = time.perf_counter()
    grams, tokens = collect_grams(teacher, calib)
    print(f"teacher {args.teacher}; calibration: {sum(len(b['input_ids']) for b in calib)} sequences "
          f"({tokens:,} tokens) of {Path(args.calibration).name}, Grams in {time.perf_counter() - t0:.1f} s; "
          f"held-out: {sum(len(b['input_ids']) for b in heldout)} sequences of {Path(args.heldout).name}; "
          f"fit_iters={args.iters}, damp={args.damp}, fit_passes={args.passes} ({args.refit}), bias refit={not args.no_bias}")
    weights = encoder_weights(teacher)
    L = len(teacher.encoder.layer)
    print("held-out relative output error per layer (teacher inputs) and of the last hidden state; "
          f"dead = blocks with calibration output error ≥ {DEAD_BLOCK_ERROR} [weight error ≥ {DEAD_BLOCK_ERROR}]\n")
    hdr = (f"{'compression':>11} {'ratio':>6} {'d':>4} {'k':>3} {'fit':>8} | "
           + " ".join(f"{'L' + str(l + 1):>6}" for l in range(L))
           + f" | {'last':>6} | {'dead':>8} | {'s':>6}")
    print(hdr)
    print("-" * len(hdr))
    for name in [r.strip() for r in args.ratios.split(",") if r.strip()]:
        student = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rep = compress(student, spec_of(name))
        t_hooi = time.perf_counter() - t0
        rs = rep.spec
        ratio = param_counts(encoder_shape(teacher), rs)["ratio"]
        before = output_errors(student, teacher, heldout)
        t0 = time.perf_counter()
        fitted = fit_outputs(student, weights, grams, damp=args.damp, iters=args.iters)
        t_fit = time.perf_counter() - t0
        after = output_errors(student, teacher, heldout)
        dead0 = sum(e >= DEAD_BLOCK_ERROR for e in fitted.start_output_errors.values())
        dead1 = sum(e >= DEAD_BLOCK_ERROR for e in fitted.output_errors.values())
        wdead1 = sum(e >= DEAD_BLOCK_ERROR for e in fitted.block_errors.values())
        k = next(iter(rs.banks.values()))
        for label, e, dead, s in (("HOOI", before, f"{dead0} [{len(rep.dead_blocks)}]", t_hooi),
                                  ("outputs", after, f"{dead1} [{wdead1}]", t_fit)):
            print(f"{name:>11} {ratio:>6.2f} {rs.rank_in:>4} {k:>3} {label:>8} | "
                  + " ".join(f"{x:>6.4f}" for x in e["layer_errors"])
                  + f" | {e['last_hidden']:>6.4f} | {dead:>8} | {s:>6.1f}")
        best = after
        if args.passes:
            t0 = time.perf_counter()
            passes = refit_outputs(student, teacher, calib, heldout, passes=args.passes, damp=args.damp,
                                   iters=args.iters, bias=not args.no_bias, mode=args.refit)
            t_refit = (time.perf_counter() - t0) / max(1, len(passes) - 1)
            for r in passes[1:]:
                label = f"refit {r['pass']}" + ("" if r["kept"] else "x")
                print(f"{name:>11} {ratio:>6.2f} {rs.rank_in:>4} {k:>3} {label:>8} | "
                      + " ".join(f"{x:>6.4f}" for x in r["layer_errors"])
                      + f" | {r['last_hidden']:>6.4f} | {'':>8} | {t_refit:>6.1f}")
                if r["kept"]:
                    best = r
        print(f"{'':>11} last-hidden-state error / HOOI: output fit {after['last_hidden'] / before['last_hidden']:.3f}, "
              f"with the refit {best['last_hidden'] / before['last_hidden']:.3f}  (refit Nx: pass not kept)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
