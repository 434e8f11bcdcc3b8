"""Dense vs compressed forward latency per runtime, with the MAC-predicted speed-up beside the measured one.

    python benchmarks/latency.py                      # MiniLM at ratios ~2, ~7, ~48; batch 1 and 32; eager + ONNX Runtime
    python benchmarks/latency.py --points 64:36 --batches 8 --reps 30 --device cuda --runtimes eager

Each point ``d:k`` is variant IV (all 12 blocks per layer in one group, bank k, d_in = d_out = d);
the defaults are the ratios ~2 (256:72), ~7 (192:36, ``paper_1_7``) and ~48 (83:18, ``paper_1_48``).
Columns per runtime, each speed-up being dense / compressed *in that runtime*:

* ``factorized`` — PyTorch eager, every unit factorized (the forward as trained);
* ``planned`` — PyTorch eager with the execution plan timed on this machine
  (``tdlight.model.execution``, ``policy=timed``): each unit kind factorized or dense, whichever
  was faster; the plan is printed;
* ``compiled`` — the planned model through ``torch.compile`` with the weights frozen
  (``tdlight.model.execution.compile_for_inference``) against the dense teacher compiled the same
  way; compilation (once per model and input shape) happens in the warm-up, outside the timing;
* ``onnxruntime`` — the planned model exported by ``tdlight.export_onnx`` against the dense
  teacher exported the same way, in ONNX Runtime (CPU provider, as many threads as torch uses).

Timing is paired: each repetition times the dense and the compressed forward back to back
(alternating which goes first), and the speed-up is the median of the per-pair ratios, so slow
phases of a noisy machine hit both sides. The prediction is dense / compressed encoder MACs
(``tdlight.tensor.accounting.predicted_speedup``: every linear and attention matmul, plus the
per-forward core mixing C′ = P·𝒞) for the all-factorized model; element-wise work (softmax, GELU,
LayerNorm, embeddings) is not in it. ``--profile`` prints where the eager time goes. Memory: the
bytes each model holds for its weights (parameters, buffers, the dense units' cached weights),
not the activations' peak.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlight.model import execution as ex  # noqa: E402
from tdlight.model.io import onnx_export_model  # noqa: E402
from tdlight.model.speed import paired_speedup, paired_times, random_inputs  # noqa: E402
from tdlight.model.surgery import compress, count_parameters, encoder_shape  # noqa: E402
from tdlight.model.teacher import load_teacher  # noqa: E402
from tdlight.tensor.accounting import predicted_speedup  # noqa: E402
from tdlight.tensor.spec import CompressionSpec, resolve  # noqa: E402

RUNTIMES = ("factorized", "planned", "compiled", "onnxruntime")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split(":")) for x in text.split(",") if x.strip()]


def onnx_session(model, path: Path):
    """An ONNX Runtime session of ``model`` (dense, or compressed with its execution plan)."""
    import onnxruntime as ort

    onnx_export_model(model, path)  # a compressed model's units as its plan says
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--points", type=points, default=[(256, 72), (192, 36), (83, 18)], help="d:k pairs (comma list)")
    p.add_argument("--batches", type=ints, default=[1, 32])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=20, help="timed pairs per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    p.add_argument("--profile", action="store_true",
                   help="also print where the eager time goes (torch.profiler, top ops) for dense and each point")
    args = p.parse_args()
    device = torch.device(args.device)
    runtimes = [r for r in args.runtimes.split(",") if r]
    if bad := [r for r in runtimes if r not in RUNTIMES]:
        p.error(f"unknown runtime(s) {bad}; valid: {list(RUNTIMES)}")
    if "onnxruntime" in runtimes and device.type != "cpu":
        runtimes.remove("onnxruntime")  # the CPU provider only here

    dense, _ = load_teacher(args.teacher)
    dense = dense.to(device).eval()
    shape = encoder_shape(dense)
    tmp = Path(tempfile.mkdtemp(prefix="tdlight-latency-"))
    models = {}
    for d, k in args.points:
        spec = CompressionSpec(variant="tucker", rank=d, bank=k)
        m = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # dead blocks do not matter for timing
            compress(m, spec)
        m.eval()
        planned = copy.deepcopy(m)
        plan = ex.apply(planned, ex.plan(planned, "timed", batches=tuple(args.batches), seq_len=args.seq_len))
        with torch.no_grad():  # builds the dense units' cached weights (counted below)
            planned(**random_inputs(1, 8, dense.config.vocab_size, device=device))
        models[(d, k)] = (m, planned, plan, resolve(spec, shape))
    sessions = {}
    if "onnxruntime" in runtimes:
        sessions["dense"] = onnx_session(dense, tmp / "dense.onnx")
        for (d, k), (_, planned, _, _) in models.items():
            sessions[(d, k)] = onnx_session(planned, tmp / f"d{d}k{k}.onnx")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"teacher {args.teacher} ({count_parameters(dense)['encoder']:,} encoder params), {where}, "
          f"seq {args.seq_len}, {args.reps} paired reps (median)\n")
    dense_mb = sum(t.numel() * t.element_size() for t in [*dense.parameters(), *dense.buffers()]) / 2**20
    for (d, k), (fact, planned, plan, _) in models.items():
        print(f"plan d={d} k={k}: " + ", ".join(f"{u} {m} ({plan['timed_speedup'][u]:.2f}x)"
                                                 for u, m in plan["modes"].items())
              + f"; weights in memory: dense {dense_mb:.1f} MB, factorized {ex.weight_bytes(fact) / 2**20:.1f} MB, "
                f"planned {ex.weight_bytes(planned) / 2**20:.1f} MB (dense units' cached weights included)")
    cols = " | ".join(f"{r + ' ms':>15} {'x':>6}" for r in runtimes)
    hdr = f"{'batch':>5} {'d:k':>7} {'ratio':>6} | {'dense ms':>9} | {cols} | {'predicted':>9} {'best/pred':>9}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    vocab = dense.config.vocab_size
    with torch.inference_mode():
        for i, batch in enumerate(args.batches):
            ids = random_inputs(batch, args.seq_len, vocab, seed=i, device=device)
            feeds = {n: t.cpu().numpy() for n, t in ids.items()}
            feeds["token_type_ids"] = 0 * feeds["input_ids"]
            for (d, k), (fact, planned, _, rspec) in models.items():
                cells, best, dense_ms = [], 0.0, None
                for r in runtimes:
                    if r == "compiled":
                        if ("compiled", "dense") not in sessions:
                            sessions[("compiled", "dense")] = ex.compile_for_inference(copy.deepcopy(dense))
                        if ("compiled", d, k) not in sessions:
                            sessions[("compiled", d, k)] = ex.compile_for_inference(planned)
                        t = paired_speedup(sessions[("compiled", "dense")], sessions[("compiled", d, k)], ids,
                                           reps=args.reps, warmup=args.warmup)
                    elif r == "onnxruntime":
                        t = paired_times(lambda: sessions["dense"].run(None, feeds),
                                         lambda s=sessions[(d, k)]: s.run(None, feeds), reps=args.reps,
                                         warmup=args.warmup)
                    else:
                        t = paired_speedup(dense, fact if r == "factorized" else planned, ids, reps=args.reps,
                                           warmup=args.warmup)
                        dense_ms = dense_ms or t["baseline_ms"]
                    cells.append(f"{t['candidate_ms']:>15.2f} {t['speedup']:>5.2f}x")
                    best = max(best, t["speedup"])
                pred = predicted_speedup(shape, rspec, args.seq_len, batch * args.seq_len)
                ratio = count_parameters(dense)["encoder"] / count_parameters(fact)["encoder"]
                print(f"{batch:>5} {f'{d}:{k}':>7} {ratio:>6.1f} | {dense_ms or float('nan'):>9.2f} | "
                      f"{' | '.join(cells)} | {pred:>8.2f}x {best / pred:>8.0%}")
                sys.stdout.flush()
            if args.profile:
                for name, model in [("dense", dense)] + [(f"{d}:{k}", m[1]) for (d, k), m in models.items()]:
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
