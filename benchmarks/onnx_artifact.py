"""What the user takes home as ONNX: file bytes at fp32 and int8, and ONNX Runtime latency, teacher vs students.

    python benchmarks/onnx_artifact.py --teacher minilm outputs/distill/<run>/model [more model dirs]
    python benchmarks/onnx_artifact.py --teacher <teacher dir> <student dir> --batch 32 --seq-len 128 --reps 20

Every directory (the teacher: a dense HF directory or ``minilm``; the others: compressed or dense
model directories) is exported by ``tdlight.export_onnx`` at ``precision=fp32`` and ``int8``
(each checked in ONNX Runtime against PyTorch, int8 against fp32; a compressed model's units as
``--execution`` says, by default ``size``: the fewest stored parameters). Rows, one per model and
precision:

* ``weights MB`` — the directory's ``model.safetensors`` (the teacher's: its weights file);
* ``onnx MB`` and ``/teacher`` — the exported file and its size over the fp32 teacher's ``.onnx``;
* ``int8 rel`` — the int8 graph's largest output difference from its fp32 graph on the export's
  check batch, relative to the fp32 outputs' largest magnitude;
* ``ms`` — ONNX Runtime (CPU provider, threads as torch's) at ``--batch`` × ``--seq-len``, median;
* ``x fp32 teacher`` — the fp32 teacher's time over this model's, paired: each repetition runs the
  two back to back, alternating which goes first, and the ratio is the median of the per-pair
  ratios (``tdlight.model.speed.paired_times``), so slow phases of a noisy machine hit both sides;
* ``x int8 teacher`` — the same against the int8 teacher (int8 rows): the fair ratio, quantization
  being available to the teacher too.

No thresholds: a table to read and to copy into docs/RESULTS.md with this command.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlight.model.execution import EXECUTIONS  # noqa: E402
from tdlight.model.onnx import export_onnx  # noqa: E402
from tdlight.model.speed import paired_times  # noqa: E402
from tdlight.model.teacher import EMBEDDED, embedded_path  # noqa: E402

PRECISIONS = ("fp32", "int8")


def weights_bytes(directory: str) -> int | None:
    path = Path(embedded_path(directory) if directory in EMBEDDED and not Path(directory).exists() else directory)
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories (compressed or dense) to compare with the teacher")
    p.add_argument("--teacher", default="minilm", help="the dense teacher: a directory or an embedded name")
    p.add_argument("--names", default="", help="comma list of row names for the models (default: directory names)")
    p.add_argument("--execution", default="size", choices=EXECUTIONS, help="compressed units' plan in the graph")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=20, help="timed pairs per comparison")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="keep the .onnx files in this folder (default: a temporary one)")
    args = p.parse_args()
    import onnxruntime as ort

    names = [n for n in args.names.split(",") if n] or [Path(m).name for m in args.models]
    if len(names) != len(args.models):
        p.error(f"--names gives {len(names)} names for {len(args.models)} models")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = Path(tempfile.mkdtemp(prefix="tdlight-onnx-artifact-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)

    rows = {}  # (name, precision) -> export result + session
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    for name, directory in [("teacher", args.teacher), *zip(names, args.models)]:
        for precision in PRECISIONS:
            r = export_onnx(directory, out / f"{name}.{precision}.onnx", execution=args.execution,
                            precision=precision, overwrite=True)
            r["weights"] = weights_bytes(directory)
            r["session"] = ort.InferenceSession(r["path"], opts, providers=["CPUExecutionProvider"])
            rows[(name, precision)] = r
            print(f"exported {name} {precision}: {r['bytes']:,} bytes" +
                  (f", units {r['execution']}" if r["execution"] else ""), flush=True)

    g = torch.Generator().manual_seed(0)
    configs = [_config(d) for d in [args.teacher, *args.models]]
    vocab = min(int(c["vocab_size"]) for c in configs)
    longest = min(int(c.get("max_position_embeddings", args.seq_len)) for c in configs)
    if args.seq_len > longest:
        print(f"--seq-len {args.seq_len} is longer than the models' {longest} positions: timing at {longest}")
        args.seq_len = longest
    ids = torch.randint(1, vocab, (args.batch, args.seq_len), generator=g).numpy()
    base = {"input_ids": ids, "attention_mask": 1 + 0 * ids, "token_type_ids": 0 * ids}

    def runner(r):
        feeds = {i.name: base[i.name] for i in r["session"].get_inputs()}
        return lambda: r["session"].run(None, feeds)

    teacher32, teacher8 = rows[("teacher", "fp32")], rows[("teacher", "int8")]
    for key, r in rows.items():  # every row paired with the fp32 teacher; int8 students with the int8 teacher too
        if r is teacher32:
            continue
        t = paired_times(runner(teacher32), runner(r), reps=args.reps, warmup=args.warmup)
        r["ms"], r["vs32"] = t["candidate_ms"], t["speedup"]
        teacher32.setdefault("baselines", []).append(t["baseline_ms"])
        if key[1] == "int8" and r is not teacher8:
            r["vs8"] = paired_times(runner(teacher8), runner(r), reps=args.reps, warmup=args.warmup)["speedup"]
    teacher32["ms"] = sorted(teacher32["baselines"])[len(teacher32["baselines"]) // 2]  # (median of its medians)

    print(f"\nONNX Runtime, cpu, {opts.intra_op_num_threads} threads, batch {args.batch} × seq {args.seq_len}, "
          f"{args.reps} paired reps (medians); execution={args.execution}\n")
    hdr = (f"{'model':>14} {'prec':>5} | {'weights MB':>10} | {'onnx MB':>8} {'/teacher':>8} | {'int8 rel':>8} | "
           f"{'ms':>8} | {'x fp32 teacher':>14} | {'x int8 teacher':>14}")
    print(hdr + "\n" + "-" * len(hdr))
    for (name, precision), r in rows.items():
        weights = f"{r['weights'] / 2**20:>10.2f}" if r["weights"] else f"{'–':>10}"
        rel = f"{r['int8_rel_diff']:>8.3f}" if "int8_rel_diff" in r else f"{'–':>8}"
        vs32 = f"{r['vs32']:.2f}x" if "vs32" in r else "–"
        vs8 = f"{r['vs8']:.2f}x" if "vs8" in r else "–"
        print(f"{name:>14} {precision:>5} | {weights} | {r['bytes'] / 2**20:>8.2f} "
              f"{r['bytes'] / teacher32['bytes']:>8.3f} | {rel} | {r['ms']:>8.2f} | {vs32:>14} | {vs8:>14}")


def _config(directory: str) -> dict:
    path = embedded_path(directory) if directory in EMBEDDED and not Path(directory).exists() else directory
    return json.loads((Path(path) / "config.json").read_text())


if __name__ == "__main__":
    main()
