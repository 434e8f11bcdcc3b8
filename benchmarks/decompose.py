"""tdlight's HOOI vs tensorly's ``tucker`` (PyTorch backend): time and error side by side.

    python benchmarks/decompose.py                      # MiniLM and BERT-base sizes
    python benchmarks/decompose.py --sizes minilm --device cuda
    python benchmarks/decompose.py --no-tensorly        # only tdlight (and the floor)

Random Gaussian float32 tensors (seeded), ``init='svd'`` for both solvers, each with its
default tolerance. Besides the two solvers, the table prints the *floor*: the MACs that
one of our HOOI sweeps does (Gram matrices and mode products, counted from the shapes)
divided by this machine's measured matmul throughput, next to our measured median sweep
time (the time between two sweep callbacks). The floor ignores the small eigh calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlight.tensor.decompose import Ranks, decompose  # noqa: E402

SETTINGS = {
    "minilm": [((72, 384, 384), (72, 96, 96)), ((72, 384, 384), (36, 64, 64))],
    "bert-base": [((144, 768, 768), (144, 384, 384)), ((144, 768, 768), (144, 64, 64))],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_throughput(device: torch.device, size: int = 2048, reps: int = 10) -> float:
    """Measured float32 matmul MAC/s (best of ``reps``) on square ``size`` matrices."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return size**3 / best


def sweep_macs(shape, ranks) -> int:
    """MACs of one sweep of ``tdlight.tensor.hooi.hooi`` (mode products + Grams)."""
    n, A, B = shape
    k, a, b = ranks
    need_p, need_u, need_v = k < n, a < A, b < B
    bb = b if need_v else B
    aa = a if need_u else A
    total = 0
    if need_u:
        total += n * A * B * bb if need_v else 0  # X ×₃ V
        total += n * k * A * bb if need_p else 0  # ×₁ Pᵀ
        total += A * A * k * bb  # Gram of the input-mode unfolding
        total += n * A * B * a  # W2 = Uᵀ X
    if need_v:
        total += n * k * aa * B if need_p else 0
        total += B * B * k * aa
    if need_p:
        total += n * aa * B * bb if need_v else 0
        total += n * n * aa * bb
    return total


def run_tdlight(X, ranks):
    k, a, b = ranks
    stamps: list[float] = []
    sync(X.device)
    t0 = time.perf_counter()
    d = decompose(X, "tucker", Ranks(a, b, k), init="svd",
                  callback=lambda it, err: (sync(X.device), stamps.append(time.perf_counter())))
    sync(X.device)
    total = time.perf_counter() - t0
    sweeps = [t1 - t0_ for t0_, t1 in zip(stamps, stamps[1:])]
    return total, d.rel_error, d.iterations, (statistics.median(sweeps) if sweeps else float("nan"))


def run_tensorly(X, ranks):
    import tensorly as tl
    from tensorly.decomposition import tucker

    tl.set_backend("pytorch")
    sync(X.device)
    t0 = time.perf_counter()
    core, factors = tucker(X, rank=list(ranks), init="svd", return_errors=False)
    sync(X.device)
    total = time.perf_counter() - t0
    err = ((tl.tucker_to_tensor((core, factors)) - X).norm() / X.norm()).item()
    return total, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="minilm,bert-base", help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-tensorly", action="store_true", help="skip the tensorly reference")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SETTINGS]
    if bad:
        p.error(f"unknown size(s) {bad}; valid: {list(SETTINGS)}")

    tput = matmul_throughput(device)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(f"measured float32 matmul throughput: {tput / 1e9:.1f} GMAC/s ({2 * tput / 1e9:.1f} GFLOP/s)\n")
    hdr = (f"{'tensor':>13} {'ranks (k,a,b)':>15} | {'tdlight s':>9} {'err':>8} {'it':>3} | "
           f"{'tensorly s':>10} {'err':>8} | {'speed-up':>8} | {'sweep s':>8} {'floor s':>8} {'x floor':>7}")
    print(hdr)
    print("-" * len(hdr))
    for size in sizes:
        for shape, ranks in SETTINGS[size]:
            g = torch.Generator().manual_seed(args.seed)
            X = torch.randn(*shape, generator=g).to(device)
            ours, err, its, sweep = run_tdlight(X, ranks)
            floor = sweep_macs(shape, ranks) / tput
            if args.no_tensorly:
                tl_cols = f"{'-':>10} {'-':>8} | {'-':>8}"
            else:
                tl_t, tl_err = run_tensorly(X, ranks)
                tl_cols = f"{tl_t:>10.2f} {tl_err:>8.6f} | {tl_t / ours:>7.1f}x"
            print(f"{'x'.join(map(str, shape)):>13} {str(ranks):>15} | {ours:>9.2f} {err:>8.6f} {its:>3} | "
                  f"{tl_cols} | {sweep:>8.3f} {floor:>8.3f} {sweep / floor:>7.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
