"""Run as a script, in a process that never imports tdlight itself: load each directory named in the
JSON job file the way a user outside tdlight would, and write what came out (tests/test_artifact.py).

All loads without ``trust_remote_code`` come first: once a modeling file has run, tdlight is imported
and has registered its model types, after which transformers reads them without the flag (rightly).
A directory given ``texts`` is also read by ``AutoTokenizer`` (with the flag: it reads config.json
first), its ids written for each text."""

import json
import sys

import torch
import transformers

WITH_FLAG = "--- loads with trust_remote_code=True ---"
job = json.loads(open(sys.argv[1]).read())
out = {d["path"]: {} for d in job["dirs"]}
for d in job["dirs"]:
    r = out[d["path"]]
    try:  # without trust_remote_code: refused, or (a plain HF directory) loaded
        r["plain_class"] = type(getattr(transformers, d["auto"]).from_pretrained(d["path"])).__name__
    except ValueError as e:
        r["refused"] = str(e)
assert "tdlight" not in sys.modules
print(WITH_FLAG, flush=True)  # what transformers prints after this line comes from loads given the flag
# the tokenizers first, while no modeling file has run: AutoTokenizer reads config.json (whose AutoConfig is
# the modeling file's) before the tokenizer's files, so it needs the flag as the models do (README)
for d in (d for d in job["dirs"] if d.get("texts")):
    tok = transformers.AutoTokenizer.from_pretrained(d["path"], trust_remote_code=True)
    out[d["path"]]["ids"] = [tok(t)["input_ids"] for t in d["texts"]]
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
