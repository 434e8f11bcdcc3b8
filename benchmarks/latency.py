"""Dense vs compressed forward latency, with the MAC-predicted speed-up beside the measured one.

    python benchmarks/latency.py                           # MiniLM, k=36, d in 64,128,384, batch 1 and 32
    python benchmarks/latency.py --ranks 64 --batches 8 --reps 30 --device cuda

The teacher is compressed with variant IV (all 12 blocks per layer in one group, bank
k, d_in = d_out = d) in the factorized mode. Timing is paired: each repetition times
the dense and the compressed forward back to back (alternating which goes first), and
the speed-up is the median of the per-pair ratios, so slow phases of a noisy machine
hit both sides. The prediction is dense / compressed encoder MACs
(``tdlight.tensor.accounting.predicted_speedup``: every linear and attention matmul,
plus the per-forward core mixing C′ = P·𝒞); element-wise work (softmax, GELU,
LayerNorm, embeddings) is not in it, which is what keeps the measured figure below.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlight.model.speed import paired_speedup, random_inputs  # noqa: E402
from tdlight.model.surgery import compress, count_parameters, encoder_shape  # noqa: E402
from tdlight.model.teacher import load_teacher  # noqa: E402
from tdlight.tensor.accounting import predicted_speedup  # noqa: E402
from tdlight.tensor.spec import CompressionSpec, resolve  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--ranks", type=ints, default=[64, 128, 384], help="d values (comma list)")
    p.add_argument("--bank", type=int, default=36, help="k")
    p.add_argument("--batches", type=ints, default=[1, 32])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=20, help="timed pairs per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true",
                   help="also print where the time goes (torch.profiler, top ops) for dense and each d")
    args = p.parse_args()
    device = torch.device(args.device)

    dense, _ = load_teacher(args.teacher)
    dense = dense.to(device).eval()
    shape = encoder_shape(dense)
    models = {}
    for d in args.ranks:
        spec = CompressionSpec(variant="tucker", rank=d, bank=args.bank)
        m = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # dead blocks do not matter for timing
            compress(m, spec)
        models[d] = (m.eval(), resolve(spec, shape))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"teacher {args.teacher} ({count_parameters(dense)['encoder']:,} encoder params), {where}, "
          f"seq {args.seq_len}, k={args.bank}, {args.reps} paired reps (median)\n")
    hdr = (f"{'batch':>5} {'d':>4} {'ratio':>6} | {'dense ms':>9} {'compr ms':>9} | "
           f"{'measured':>8} {'predicted':>9} {'meas/pred':>9}")
    print(hdr)
    print("-" * len(hdr))
    vocab = dense.config.vocab_size
    with torch.inference_mode():
        for i, batch in enumerate(args.batches):
            ids = random_inputs(batch, args.seq_len, vocab, seed=i, device=device)
            for d, (model, rspec) in models.items():
                r = paired_speedup(dense, model, ids, reps=args.reps, warmup=args.warmup)
                meas = r["speedup"]
                pred = predicted_speedup(shape, rspec, args.seq_len, batch * args.seq_len)
                ratio = count_parameters(dense)["encoder"] / count_parameters(model)["encoder"]
                print(f"{batch:>5} {d:>4} {ratio:>6.1f} | {r['baseline_ms']:>9.2f} "
                      f"{r['candidate_ms']:>9.2f} | {meas:>7.2f}x {pred:>8.2f}x {meas / pred:>8.0%}")
                sys.stdout.flush()
            if args.profile:
                for name, model in [("dense", dense)] + [(f"d={d}", m) for d, (m, _) in models.items()]:
                    profile_ops(name, model, ids, batch)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_ops(name: str, model, ids, batch: int, reps: int = 5) -> None:
    """ms per forward spent in matmuls vs everything else (self time, torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(reps):
            model(**ids)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total - e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / reps / 1e3
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS) / reps / 1e3
    top = ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / reps / 1e3:.2f}" for e in ops[:6])
    print(f"  profile batch {batch} {name:>6}: {total:7.2f} ms/forward, matmul {mm:7.2f}, other {total - mm:6.2f} | top: {top}")


if __name__ == "__main__":
    main()
