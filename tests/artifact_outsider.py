"""Run as a script, in a process that never imports tdlight itself: load each directory named in the
JSON job file the way a user outside tdlight would, and write what came out (tests/test_artifact.py).

All loads without ``trust_remote_code`` come first: once a modeling file has run, tdlight is imported
and has registered its model types, after which transformers reads them without the flag (rightly)."""

import json
import sys

import torch
import transformers

job = json.loads(open(sys.argv[1]).read())
out = {d["path"]: {} for d in job["dirs"]}
for d in job["dirs"]:
    r = out[d["path"]]
    try:  # without trust_remote_code: refused, or (a plain HF directory) loaded
        r["plain_class"] = type(getattr(transformers, d["auto"]).from_pretrained(d["path"])).__name__
    except ValueError as e:
        r["refused"] = str(e)
assert "tdlight" not in sys.modules
for d in job["dirs"]:
    r = out[d["path"]]
    feeds = {k: torch.tensor(v) for k, v in d["feeds"].items()}
    m = getattr(transformers, d["auto"]).from_pretrained(d["path"], trust_remote_code=True).eval()
    r["class"] = type(m).__name__
    with torch.no_grad():
        r["output"] = m(**feeds)[0].tolist()
    if d.get("resave"):
        m.save_pretrained(d["resave"])
    if d.get("sentences"):
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(d["path"], trust_remote_code=True, device="cpu")
        r["st"] = st.encode(d["sentences"], convert_to_tensor=True).tolist()
json.dump(out, open(sys.argv[2], "w"))
