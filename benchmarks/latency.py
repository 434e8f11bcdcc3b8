"""Dense vs compressed forward latency per runtime, with the MAC-predicted speed-up beside the measured one.

    python benchmarks/latency.py                      # MiniLM at ratios ~2, ~7, ~48; batch 1 and 32; eager + ONNX Runtime
    python benchmarks/latency.py --points 64:36 --batches 8 --reps 30 --device cuda --runtimes eager

Each point ``d:k`` is variant IV (all 12 blocks per layer in one group, bank k, d_in = d_out = d);
the defaults are the ratios ~2 (256:72), ~7 (192:36, ``paper_1_7``) and ~48 (83:18, ``paper_1_48``).
Columns per runtime, each speed-up being dense / compressed *in that runtime*:

* ``factorized`` — PyTorch eager, every unit factorized (the forward as trained);
* ``planned`` — PyTorch eager with the execution plan timed on this machine
  (``tdlight.model.execution``, ``policy=timed``): each unit kind in its fastest mode (factorized,
  folded or dense); the plan is printed;
* ``compiled`` — the planned model through ``torch.compile`` with the weights frozen
  (``tdlight.model.execution.compile_for_inference``) against the dense teacher compiled the same
  way; compilation (once per model and input shape) happens in the warm-up, outside the timing;
* ``onnxruntime`` — the planned model exported by ``tdlight.export_onnx`` against the dense
  teacher exported the same way, in ONNX Runtime (CPU provider, as many threads as torch uses).

Timing is paired: each repetition times the dense and the compressed forward back to back
(alternating which goes first), and the speed-up is the median of the per-pair ratios, so slow
phases of a noisy machine hit both sides. The prediction is dense / compressed encoder MACs
(``tdlight.tensor.accounting.predicted_speedup``: every linear and attention matmul, plus the
per-forward core mixing C′ = P·𝒞 where a unit runs factorized), for the all-factorized model
(``pred fact``) and for the planned one (``pred plan``, its units' modes; ``best/pred`` is the best
runtime's speed-up over it); element-wise work (softmax, GELU, LayerNorm, embeddings) is not in it. ``--profile`` prints where the eager time goes.

Memory: the plan line gives the bytes each model holds for its weights (parameters, buffers, the
cached dense or folded weights of its planned units). ``--memory`` (CPU, Linux) also measures
resident memory, in a fresh process per model, runtime and batch, so that no memory another model
freed and the allocator kept is counted. Rows: the dense teacher (``load_teacher``), eager and in
ONNX Runtime; each point saved with its timed plan (``tdlight.model.io.save_compressed``) and loaded
by ``load_compressed`` with ``execution="factorized"`` (the memory-lean mode) and ``"auto"`` (its
plan: ``planned``), and its ``.onnx`` above in ONNX Runtime (threads as torch's) — the runtimes in
``--runtimes``; ``torch.compile`` is not measured (its graphs and caches would need their own
accounting). Columns, from ``/proc/self/status``:

* ``weights MB`` — the bytes of the weights, as in the plan line (ONNX Runtime: the file's size);
* ``model MB`` — VmRSS once the model is loaded, its weights read once (transformers maps a
  teacher's safetensors file: its pages are resident only once read) and a first call made on a
  1×8 batch (it builds the cached weights), minus VmRSS after the imports. It holds what loading
  leaves besides the weights: Python objects, pages the allocator kept from building the model
  (~150 MB for either PyTorch loader on MiniLM, against ~20-45 MB for an ONNX Runtime session);
* ``inference peak MB`` — VmHWM over 4 forwards of the batch (the timing's inputs, under
  ``inference_mode``), reset to the loaded VmRSS first (``5`` written to ``/proc/self/clear_refs``),
  minus the loaded VmRSS: activations, workspace, and what the allocators keep between forwards
  (ONNX Runtime's arena reaches its size on the 2nd forward; measured from after a warm-up forward
  instead, what the warm-up left in the allocators would be missed);
* ``total MB`` — their sum: what the process holds above its imports while serving that batch.

Repeated runs agree to ~1 MB on model MB (the teacher's ONNX Runtime session: 129 or 115 MB from run
to run) and to ~10 % on a batch-32 peak (where the allocators happen to place things).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlight.model import execution as ex  # noqa: E402
from tdlight.model.io import load_compressed, save_compressed  # noqa: E402
from tdlight.model.onnx import onnx_export_model  # noqa: E402
from tdlight.model.speed import paired_speedup, paired_times, random_inputs  # noqa: E402
from tdlight.model.surgery import compress, count_parameters, encoder_shape  # noqa: E402
from tdlight.model.teacher import load_teacher  # noqa: E402
from tdlight.tensor.accounting import predicted_speedup  # noqa: E402
from tdlight.tensor.spec import CompressionSpec, resolve  # noqa: E402

RUNTIMES = ("factorized", "planned", "compiled", "onnxruntime")
MEMORY_RUNTIMES = ("factorized", "planned", "onnxruntime")  # --memory: torch.compile is not measured


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
    p.add_argument("--memory", action="store_true",
                   help="also measure resident memory (CPU, Linux): a fresh process per model, runtime and batch")
    p.add_argument("--_memory-child", metavar="JOB", help=argparse.SUPPRESS)  # one measurement (memory_child)
    args = p.parse_args()
    if args._memory_child:
        print(json.dumps(memory_child(json.loads(args._memory_child))))
        return
    device = torch.device(args.device)
    runtimes = [r for r in args.runtimes.split(",") if r]
    if bad := [r for r in runtimes if r not in RUNTIMES]:
        p.error(f"unknown runtime(s) {bad}; valid: {list(RUNTIMES)}")
    if "onnxruntime" in runtimes and device.type != "cpu":
        runtimes.remove("onnxruntime")  # the CPU provider only here
    if "compiled" in runtimes:  # one compiled graph per model and shape; Dynamo's default limit (8 per code
        torch._dynamo.config.recompile_limit = 64  # object, shared by every model of a class) would fall back to eager
    if args.memory and device.type != "cpu":
        p.error("--memory measures the process's resident memory: --device cpu only")

    dense, _ = load_teacher(args.teacher)
    dense = dense.to(device).eval()
    shape = encoder_shape(dense)
    tmp = Path(tempfile.mkdtemp(prefix="tdlight-latency-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
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
    dense_mb = ex.weight_bytes(dense) / 2**20
    for (d, k), (fact, planned, plan, _) in models.items():
        x = plan["timed_speedup"]  # per kind {mode: speed-up over dense}
        print(f"plan d={d} k={k}: " + ", ".join(f"{u} {m} ({x[u][m]:.2f}x)" for u, m in plan["modes"].items())
              + f"; weights in memory: dense {dense_mb:.1f} MB, factorized {ex.weight_bytes(fact) / 2**20:.1f} MB, "
                f"planned {ex.weight_bytes(planned) / 2**20:.1f} MB (cached dense/folded weights included)")
    cols = " | ".join(f"{r + ' ms':>15} {'x':>6}" for r in runtimes)
    hdr = (f"{'batch':>5} {'d:k':>7} {'ratio':>6} | {'dense ms':>9} | {cols} | {'pred fact':>9} {'pred plan':>9} "
           f"{'best/pred':>9}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    vocab = dense.config.vocab_size
    with torch.inference_mode():
        for i, batch in enumerate(args.batches):
            ids = random_inputs(batch, args.seq_len, vocab, seed=i, device=device)
            feeds = {n: t.cpu().numpy() for n, t in ids.items()}
            feeds["token_type_ids"] = 0 * feeds["input_ids"]
            for (d, k), (fact, planned, plan, rspec) in models.items():
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
                pred_fact = predicted_speedup(shape, rspec, args.seq_len, batch * args.seq_len)
                pred = predicted_speedup(shape, rspec, args.seq_len, batch * args.seq_len, plan["modes"])
                ratio = count_parameters(dense)["encoder"] / count_parameters(fact)["encoder"]
                print(f"{batch:>5} {f'{d}:{k}':>7} {ratio:>6.1f} | {dense_ms or float('nan'):>9.2f} | "
                      f"{' | '.join(cells)} | {pred_fact:>8.2f}x {pred:>8.2f}x {best / pred:>8.0%}")
                sys.stdout.flush()
            if args.profile:
                dense_total, _ = profile_ops("dense", dense, ids, batch)
                for (d, k), m in models.items():
                    profile_ops(f"{d}:{k}", m[1], ids, batch, dense_total)
    if args.memory:
        jobs = []
        for i, batch in enumerate(args.batches):
            for name in ["dense", *(f"{d}:{k}" for d, k in models)]:
                for r in [r for r in MEMORY_RUNTIMES if r in runtimes]:
                    if name == "dense" and r != "onnxruntime":
                        r = "eager"  # the teacher has one eager forward
                    if (job := {"model": name, "runtime": r, "batch": batch, "seed": i}) not in jobs:
                        jobs.append(job)
        for (d, k), (_, planned, _, _) in models.items():
            save_compressed(planned, tmp / f"d{d}k{k}")  # its timed plan with it, for load_compressed("auto")
        memory_table(jobs, args, tmp, vocab)


def memory_table(jobs: list[dict], args, tmp: Path, vocab: int) -> None:
    """Each measurement in a fresh process (:func:`memory_child`), one table row each."""
    hdr = (f"{'batch':>5} | {'model':>7} | {'runtime':>11} | {'weights MB':>10} | {'model MB':>8} | "
           f"{'inference peak MB':>17} | {'total MB':>8}")
    print(f"\nresident memory (VmRSS, VmHWM) above the imports, a fresh process per row, seq {args.seq_len}, "
          f"{torch.get_num_threads()} threads\n{hdr}\n" + "-" * len(hdr))
    for job in jobs:
        stem = "dense" if job["model"] == "dense" else "d{}k{}".format(*job["model"].split(":"))
        job.update(teacher=args.teacher, dir=str(tmp / stem), onnx=str(tmp / f"{stem}.onnx"), seq_len=args.seq_len,
                   vocab=vocab, threads=torch.get_num_threads())
        run = subprocess.run([sys.executable, __file__, "--_memory-child", json.dumps(job)], check=False,
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"memory measurement {job} failed:\n{run.stderr}")
        m = json.loads(run.stdout.splitlines()[-1])
        print(f"{job['batch']:>5} | {job['model']:>7} | {job['runtime']:>11} | {m['weights_mb']:>10.1f} | "
              f"{m['model_mb']:>8.1f} | {m['peak_mb']:>17.1f} | {m['model_mb'] + m['peak_mb']:>8.1f}")
        sys.stdout.flush()


MEMORY_FORWARDS = 4  # forwards of the batch under the peak (ONNX Runtime's arena reaches its size on the 2nd)


def status_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB, from /proc/self/status (Linux)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values["VmRSS"], values["VmHWM"]


def memory_child(job: dict) -> dict:
    """One row of the memory table, measured in this (fresh) process; the module doc says what."""
    torch.set_num_threads(job["threads"])
    inputs = random_inputs(job["batch"], job["seq_len"], job["vocab"], seed=job["seed"])
    first = random_inputs(1, 8, job["vocab"])
    onnx = job["runtime"] == "onnxruntime"
    if onnx:
        import onnxruntime as ort
    gc.collect()
    imported, _ = status_mb()
    if onnx:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = job["threads"]
        session = ort.InferenceSession(job["onnx"], opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
    elif job["model"] == "dense":
        model, _ = load_teacher(job["teacher"])
    else:
        model = load_compressed(job["dir"], execution="auto" if job["runtime"] == "planned" else "factorized")

    def forward(x):
        if not onnx:
            return model(**x)
        feeds = {n: t.numpy() for n, t in x.items()} | {"token_type_ids": 0 * x["input_ids"].numpy()}
        return session.run(None, {n: feeds[n] for n in names})

    with torch.inference_mode():
        if not onnx:  # a teacher's weights are mapped from its safetensors file: resident once read
            for t in [*model.parameters(), *model.buffers()]:
                t.sum()
        forward(first)  # a first call builds what the model keeps (the planned units' cached weights)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        loaded, _ = status_mb()
        for _ in range(MEMORY_FORWARDS):
            forward(inputs)
        _, peak = status_mb()
    if onnx:
        weights = Path(job["onnx"]).stat().st_size  # its initializers, about
    else:
        weights = ex.weight_bytes(model)
    # (the kernel's peak is kept from an approximate RSS count, within ~0.3 MB here: a flat forward can read -0.2)
    return {"weights_mb": weights / 2**20, "model_mb": loaded - imported, "peak_mb": max(peak - loaded, 0.0)}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_ops(name: str, model, ids, batch: int, dense_total: float | None = None,
                reps: int = 5) -> tuple[float, float]:
    """ms per forward spent in the linear layers' matmuls vs everything else (self time,
    torch.profiler; the attention kernel is in "other"). For a compressed model, also the bound on its
    speed-up if its matmuls cost nothing: dense total / its other time. Returns (total, matmul) ms."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(reps):
            model(**ids)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total - e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / reps / 1e3
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS) / reps / 1e3
    top = ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / reps / 1e3:.2f}" for e in ops[:6])
    bound = f", bound {dense_total / (total - mm):.2f}x" if dense_total else ""
    print(f"  profile batch {batch} {name:>6}: {total:7.2f} ms/forward, matmul {mm:7.2f}, other {total - mm:6.2f}"
          f"{bound} | top: {top}")
    return total, mm


if __name__ == "__main__":
    main()
