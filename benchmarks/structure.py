"""How much shared structure do real encoder weights have? Real vs Gaussian Tucker error.

    python benchmarks/structure.py                          # MiniLM, d x k grid, balance none,type
    python benchmarks/structure.py --teacher bert-base-uncased --ranks 64,192 --banks 36

Stacks all 12 D×D blocks of every layer of the teacher's encoder (one group: the
paper's layout), and a Gaussian tensor of the same shape and norm (seeded), then
decomposes both with variant IV (Tucker, d_in = d_out = d, bank k) and prints the
relative reconstruction error of each, their ratio, and how many blocks came back
dead (relative error ≥ 0.99), for every requested balance mode.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlight.model.surgery import encoder_shape, encoder_weights  # noqa: E402
from tdlight.model.teacher import load_teacher  # noqa: E402
from tdlight.tensor.decompose import DEAD_BLOCK_ERROR, Ranks, decompose  # noqa: E402
from tdlight.tensor.layout import Layout, stack  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="minilm", help="'minilm' (embedded), a local path or a hub name")
    p.add_argument("--ranks", type=ints, default=[32, 64, 128, 192, 256], help="d values (comma list)")
    p.add_argument("--banks", type=ints, default=[18, 36, 72], help="k values (comma list)")
    p.add_argument("--balance", default="none,type", help="comma list of none, slice, type")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, _ = load_teacher(args.teacher)
    shape = encoder_shape(model)
    layout = Layout(num_layers=shape.num_layers, hidden=shape.hidden, ffn_blocks=shape.ffn_blocks)
    real = stack(layout, encoder_weights(model))["encoder"].float()
    labels = [b.type for b in layout.groups["encoder"]]
    g = torch.Generator().manual_seed(args.seed)
    gauss = torch.randn(real.shape, generator=g)
    gauss *= real.norm() / gauss.norm()
    n = real.shape[0]
    print(f"teacher {args.teacher}: stacked encoder tensor {tuple(real.shape)}, ‖𝒲‖ = {real.norm():.2f}")
    print("columns: relative reconstruction error of the real weights and of a Gaussian tensor of the same "
          f"shape and norm; 'dead' = blocks with error ≥ {DEAD_BLOCK_ERROR} (of {n})\n")
    hdr = f"{'balance':>7} {'d':>4} {'k':>3} | {'real':>7} {'gauss':>7} {'real/gauss':>10} | {'dead real':>9} {'dead gauss':>10} | {'s':>5}"
    print(hdr)
    print("-" * len(hdr))
    for balance in [b.strip() for b in args.balance.split(",") if b.strip()]:
        for d in args.ranks:
            for k in args.banks:
                if k > n:
                    continue
                t0 = time.perf_counter()
                res = []
                for X in (real, gauss):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        dec = decompose(X, "tucker", Ranks(d, d, k), balance=balance, labels=labels, seed=args.seed)
                    res.append((dec.rel_error, int((dec.slice_errors >= DEAD_BLOCK_ERROR).sum())))
                (er, dr), (eg, dg) = res
                print(f"{balance:>7} {d:>4} {k:>3} | {er:>7.4f} {eg:>7.4f} {er / eg:>10.3f} | {dr:>9} {dg:>10} | "
                      f"{time.perf_counter() - t0:>5.1f}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
