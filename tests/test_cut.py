"""stage=cut: the teacher cut to fewer of its own layers, the peer at equal size of a compressed student
(DESIGN §7), and the pipeline that trains it with the compressed student's budget."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from tdlight.errors import SpecError
from tdlight.model.surgery import cut_layers, layer_choice
from tdlight.tensor.accounting import dense_counts, nearest_depth, param_counts
from tdlight.tensor.spec import CompressionSpec, EncoderShape, resolve
from tests.conftest import cli, compose_cfg, needs_data, runs, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _by_hand(model, layers: list[int], ids, mask) -> torch.Tensor:
    """The embeddings, then the original model's layers ``layers`` in order, under the padding mask."""
    h = model.embeddings(input_ids=ids)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in layers:
        h = model.encoder.layer[i](h, additive)
    return h


@torch.no_grad()
def test_cut_layers_runs_the_kept_layers_of_the_original(token_ids):
    torch.manual_seed(0)
    original = transformers.BertModel(tiny_config(num_hidden_layers=4)).eval()
    ids, mask = token_ids["input_ids"], token_ids["attention_mask"]
    full = original(**token_ids, output_hidden_states=True).hidden_states
    for layers in ([0, 1], layer_choice(4, 3, "even"), [3], []):
        cut = cut_layers(copy.deepcopy(original), layers)
        assert cut.config.num_hidden_layers == len(layers) == len(cut.encoder.layer)
        got = cut(**token_ids).last_hidden_state
        torch.testing.assert_close(got, _by_hand(original, layers, ids, mask), rtol=1e-5, atol=1e-5)
        if layers == list(range(len(layers))) and layers:  # the first L: the teacher's own L-th hidden state
            torch.testing.assert_close(got, full[len(layers)], rtol=1e-5, atol=1e-5)
    assert layer_choice(4, 3, "even") == [0, 2, 3]
    # no layer: the embedding output itself (HF's encoder runs with an empty stack)
    torch.testing.assert_close(cut_layers(copy.deepcopy(original), [])(**token_ids).last_hidden_state,
                               original.embeddings(input_ids=ids))
    for bad in ([2, 1], [4], [1, 1], [-1]):
        with pytest.raises(SpecError, match=r"valid: increasing distinct indices in \[0, 3\]"):
            cut_layers(copy.deepcopy(original), bad)


def test_layer_choice_and_the_nearest_depth():
    assert layer_choice(6, 3, "first") == [0, 1, 2] and layer_choice(6, 0, "even") == []
    assert layer_choice(6, 2, "even") == [0, 5] and layer_choice(6, 4, "even") == [0, 2, 3, 5]
    assert layer_choice(6, 1, "even") == [0] and layer_choice(6, 6, "even") == list(range(6))
    with pytest.raises(SpecError, match=r"layers=7; valid: an integer in \[0, 6\]"):
        layer_choice(6, 7)
    with pytest.raises(SpecError, match=r"select='middle'; valid: \['first', 'even'\]"):
        layer_choice(6, 2, "middle")

    minilm = EncoderShape(6, 384, 1536)
    per_layer = dense_counts(EncoderShape(1, 384, 1536))["encoder"]
    assert per_layer == 1_774_464 and dense_counts(minilm)["encoder"] == 6 * per_layer
    assert nearest_depth(minilm, 0) == 0 and nearest_depth(minilm, 10**9) == 6
    assert nearest_depth(minilm, 0.6 * per_layer) == 1 and nearest_depth(minilm, 0.4 * per_layer) == 0
    assert nearest_depth(minilm, 2.5 * per_layer) == 2  # a tie goes to the smaller depth
    # the compressed students of the paper's two rows on the MiniLM: 1/7 is nearest to one layer, 1/48 to none
    for spec, want in ((CompressionSpec(rank_ratio=0.5, bank_ratio=0.5), 1),
                       (CompressionSpec(bank_ratio=0.25, target_ratio=48), 0)):
        assert nearest_depth(minilm, param_counts(minilm, resolve(spec, minilm))["encoder"]) == want
    with pytest.raises(SpecError, match="target=-1; valid: a parameter count ≥ 0"):
        nearest_depth(minilm, -1)


def test_the_cut_stage_saves_a_model_plain_transformers_loads(teacher_dir, tmp_path):
    """stage=cut sized by the compression config: the tiny teacher (2 layers of 12,704 parameters) at rank 16,
    bank 24 compresses to 8,576 encoder parameters, nearest to one layer. The directory loads in plain
    transformers with the logits of the teacher cut in this process."""
    r = cli(tmp_path, "stage=cut", f"teacher.path={teacher_dir}", "compression.rank=16", "compression.bank=24")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "cut")
    m = json.loads((run / "metrics.json").read_text())
    assert m["layers"] == 1 and m["kept"] == [0] and m["teacher_layers"] == 2 and m["select"] == "first"
    assert m["target_encoder_params"] == 8_576 and m["encoder_params"] == 12_704
    assert m["teacher_encoder_params"] == 25_408 and m["ratio"] == 2.0
    assert "tdlight cut" in r.stdout and "a layer cut, not compressed" in r.stdout

    ids = torch.randint(5, 99, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    assert saved.config.num_hidden_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids, attention_mask=mask).logits,
                                   cut_layers(teacher, [0])(input_ids=ids, attention_mask=mask).logits)

    # a mean-pooling cut to no layer (the bag-of-embeddings peer): saved with its pooling, which plain
    # transformers reads with trust_remote_code=True as tdlight's own loader does
    from tdlight.model.teacher import load_classifier

    r = cli(tmp_path, "stage=cut", f"teacher.path={teacher_dir}", "stage.layers=0", "teacher.pooling=mean",
            "stage.select=even")
    assert r.returncode == 0, r.stderr[-3000:]
    run = runs(tmp_path, "cut")[-1]
    m = json.loads((run / "metrics.json").read_text())
    assert m["layers"] == 0 and m["kept"] == [] and m["encoder_params"] == 0 and m["ratio"] is None
    assert m["target_encoder_params"] is None and m["pooling"] == "mean" and "no encoder layer" in r.stdout
    ours, _ = load_classifier(str(run / "model"), 2)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=ids, attention_mask=mask).logits,
                                   ours.eval()(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("extra, message", [
    (["stage.layers=3"], "stage.layers=3; valid: an integer in [0, 2] (the teacher has 2 layers)"),
    (["stage.layers=-1"], "stage.layers=-1"),
    (["stage.select=middle"], "valid: first, even"),
    (["stage.teacher_weights=finetuned"], "stage.teacher_weights=finetuned needs the fine-tuned teacher"),
    (["compression.rank=33"], "rank"),  # sized by an impossible spec: refused as decompose refuses it
])
def test_the_cut_stage_refuses_bad_input(teacher_dir, tmp_path, extra, message):
    r = cli(tmp_path, "stage=cut", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "cut").exists() or not any((tmp_path / "cut").iterdir())


def test_a_pipeline_makes_its_student_with_exactly_one_of_decompose_and_cut(teacher_dir, tmp_path):
    base = ["stage=pipeline", "task=mrpc", f"teacher.path={teacher_dir}", "trainer=cpu", "logger=none"]
    for steps, message in (("[finetune,decompose,cut,distill]", "both are there"),
                           ("[finetune,distill]", "neither is there"),
                           ("[finetune,cut,distill]", None)):
        r = cli(tmp_path, *base, f"stage.steps={steps}", "stage.cut.layers=5", "dry_run=true")
        assert r.returncode == 2, r.stderr[-2000:]
        assert (message or "stage.cut.layers=5; valid: an integer in [0, 2]") in r.stderr, r.stderr[-2000:]
        assert "exactly one of ['decompose', 'cut']" in r.stderr or message is None
        assert list(tmp_path.iterdir()) == []


@needs_data
def test_the_peer_of_a_preset_reuses_its_finetune_step_and_cuts_the_same_teacher(tmp_path):
    """``experiment=cpu_7`` with cut in place of decompose: the same finetune step (same key), the fine-tuned
    teacher cut (cpu_7 decomposes the fine-tuned one) to the depth nearest to cpu_7's student — one layer
    of the MiniLM — and pretrained against that same teacher. cpu_48's student is nearest to no layer:
    its peer has no pretrain step to run."""
    from tdlight.stages.pipeline import check

    def plan(*overrides):
        return {s: (d, w, sc) for s, sc, d, w in check(compose_cfg(tmp_path, "task=sst2", *overrides))}

    peer = "stage.steps=[finetune,cut,pretrain,distill,evaluate]"
    student, cut = plan("experiment=cpu_7"), plan("experiment=cpu_7", peer)
    assert student["finetune"][0] == cut["finetune"][0]
    assert cut["cut"][1] == {"teacher.run_dir": str(cut["finetune"][0])}
    assert cut["pretrain"][1] == {"stage.student": str(cut["cut"][0]), "teacher.run_dir": str(cut["finetune"][0])}
    assert cut["distill"][1]["stage.student"] == str(cut["pretrain"][0])
    assert student["pretrain"][2] == cut["pretrain"][2] and student["distill"][2] == cut["distill"][2]  # same budget
    cut48 = plan("experiment=cpu_48", peer)
    assert list(cut48) == ["finetune", "cut", "distill", "evaluate"]
    assert cut48["finetune"][0] == student["finetune"][0] and "teacher.run_dir" not in cut48["cut"][1]
    assert cut48["distill"][1]["stage.student"] == str(cut48["cut"][0])


def test_tiny_pipeline_with_the_teacher_cut_in_place_of_decompose(pretrain_inputs, teacher_dir, tmp_path):
    """finetune -> cut (1 of 2 layers) -> pretrain -> distill (with a phase 1 on the layer map) -> evaluate;
    then the cut to no layer: the finetune step is reused, pretrain skipped, phase 1 refused."""
    _, _, files = pretrain_inputs
    args = ["stage=pipeline", "task=mrpc", f"teacher.path={teacher_dir}", "trainer=cpu",
            "trainer.enable_progress_bar=false", "logger=none", "stage.steps=[finetune,cut,pretrain,distill,evaluate]",
            "stage.limit_train=32", "stage.limit_eval=16", "stage.finetune.epochs=1", "stage.finetune.batch_size=16",
            "stage.finetune.max_length=16", "stage.cut.layers=1",
            *[f.replace("stage.", "stage.pretrain.") for f in files],
            "stage.pretrain.max_steps=2", "stage.pretrain.val_every_n_steps=2", "stage.pretrain.max_length=16",
            "stage.pretrain.batch_size=4", "stage.pretrain.max_heldout_sequences=8",
            "stage.distill.intermediate_epochs=1", "stage.distill.prediction_epochs=1", "stage.distill.batch_size=16",
            "stage.distill.max_length=16", "stage.evaluate.max_length=16", "stage.speed_reps=2", "stage.speed_batch_size=8"]
    r = cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    (p,) = runs(tmp_path, "pipeline")
    summary = json.loads((p / "pipeline.json").read_text())
    assert summary["student_kind"] == "cut" and summary["student_layers"] == 1 and summary["teacher_layers"] == 2
    assert summary["cut_kept"] == [0] and summary["skipped"] == []
    assert summary["student_encoder_params"] == 12_704 and summary["ratio"] == pytest.approx(2.0)
    assert "the teacher cut to 1 of its 2 layers" in r.stdout and "a layer cut, not compressed" in r.stdout
    (pt,), (dist,) = runs(tmp_path, "pretrain"), runs(tmp_path, "distill")
    assert json.loads((pt / "metrics.json").read_text())["pairs"] == [[1, 2]]  # its one layer on the teacher's last
    assert json.loads((dist / "metrics.json").read_text())["pairs"] == [[1, 2]]
    assert OmegaConf.load(pt / ".hydra" / "config.yaml").stage.student == str(runs(tmp_path, "cut")[0])
    assert transformers.AutoConfig.from_pretrained(dist / "model").num_hidden_layers == 1

    r = cli(tmp_path, *args, "stage.cut.layers=0")
    assert r.returncode == 2 and "stage.distill.intermediate_epochs=1: the cut student has no encoder layer" in r.stderr
    r = cli(tmp_path, *args, "stage.cut.layers=0", "stage.distill.intermediate_epochs=0")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "finetune: reusing" in r.stderr + r.stdout and "pretrain: skipped" in r.stderr + r.stdout
    # (run directories of one second sort by their random suffix: find each pipeline by what it holds)
    summary = next(s for s in _pipelines(tmp_path).values() if s["student_layers"] == 0)
    assert summary["skipped"] == ["pretrain"] and summary["student_layers"] == 0 and summary["ratio"] is None
    assert "pretrain" not in summary["steps"] and "no encoder layer" in r.stdout
    assert [len(runs(tmp_path, s)) for s in ("finetune", "cut", "pretrain", "distill", "evaluate")] == [1, 2, 1, 2, 2]

    # the grid's `gold` column: the same cut student fine-tuned on gold labels (reusing all but distill);
    # then benchmarks/reproduce_table.py reads these pipelines as the grid's peer and gold columns
    r = cli(tmp_path, *args, "stage.distill.gold_weight=1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert [len(runs(tmp_path, s)) for s in ("finetune", "cut", "pretrain", "distill")] == [1, 2, 1, 3]
    pipelines = _pipelines(tmp_path)
    weights = {p: json.loads((Path(s["steps"]["distill"]) / "metrics.json").read_text())["gold_weight"]
               for p, s in pipelines.items()}
    (first,) = [p for p, s in pipelines.items() if s["student_layers"] == 1 and weights[p] == 0]
    (none,) = [p for p, s in pipelines.items() if s["student_layers"] == 0]
    (gold,) = [p for p, s in pipelines.items() if s["student_layers"] == 1 and weights[p] == 1]
    grid = tmp_path / "repro" / "grid"
    for col, ratio, src in (("peer", 7, first), ("peer", 48, none), ("gold", 7, gold)):
        (grid / col / f"cpu_{ratio}-mrpc").mkdir(parents=True)
        shutil.copy(src / "pipeline.json", grid / col / f"cpu_{ratio}-mrpc" / "pipeline.json")
    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce_table.py"), "--out",
                            str(tmp_path / "repro")], capture_output=True, text=True, cwd=REPO)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.stdout.splitlines()}
    head = rows["task (metric)"]
    gold_score = json.loads((gold / "pipeline.json").read_text())["student_score"]
    assert f"{gold_score:.4f}" in rows["mrpc (f1/accuracy)"][head.index("1/7 gold labels (same student)")]
    assert rows["mrpc (f1/accuracy)"][head.index("1/48 gold labels (same student)")].strip() == "–"
    assert "the teacher cut to 1 layer(s)" in table.stdout and "no encoder layer" in table.stdout


def _pipelines(out) -> dict:
    """Each pipeline run under ``out``: its directory -> its ``pipeline.json``."""
    return {p: json.loads((p / "pipeline.json").read_text()) for p in runs(out, "pipeline")}


def test_pretrain_refuses_a_student_with_no_layer(pretrain_inputs, teacher_dir, tmp_path):
    _, _, files = pretrain_inputs
    r = cli(tmp_path, "stage=cut", f"teacher.path={teacher_dir}", "stage.layers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    (cut,) = runs(tmp_path, "cut")
    r = cli(tmp_path, "stage=pretrain", f"teacher.path={teacher_dir}", f"stage.student={cut}", *files,
            "stage.max_steps=1", "trainer=cpu", "logger=none")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "has no encoder layer (a teacher cut to 0 layers): reconstruction pretraining has no hidden state" in r.stderr
