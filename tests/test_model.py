"""The compressed model: surgery, forward modes, gradients, densify, save/load."""

import copy
import warnings

import pytest
import torch
from torch import nn

from tdlight.errors import ArtifactError, SpecError, TeacherError
from tdlight.model.io import export_dense, load_compressed, save_compressed
from tdlight.model.linear import FactorizedLinear
from tdlight.model.surgery import compress, count_parameters, densify, encoder_shape, set_mode
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.spec import CompressionSpec

FULL = {
    "tucker": CompressionSpec(variant="tucker", rank=32),
    "shared": CompressionSpec(variant="shared", rank=32),
    "lowrank": CompressionSpec(variant="lowrank", rank=32),
}
SPECS = [
    CompressionSpec(variant="tucker", rank=8, bank=12),
    CompressionSpec(variant="tucker", rank_in=8, rank_out=12, bank=5, balance="type"),
    CompressionSpec(variant="shared", rank=6),
    CompressionSpec(variant="lowrank", rank_in=4, rank_out=6),
    CompressionSpec(variant="tucker", rank=8, bank=6, grouping="type"),
    CompressionSpec(variant="tucker", rank=8, bank=6, grouping="type", group_banks={"attention": 8, "ffn": 3}),
    CompressionSpec(variant="tucker", rank=8, bank=6, grouping="layers", layers_per_group=1),
    CompressionSpec(variant="tucker", rank=8, bank=6, scope="attention"),
    CompressionSpec(variant="shared", rank=8, scope="ffn"),
]


def quiet_compress(model, spec, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return compress(model, spec, **kw)


def outputs(model, ids):
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True, output_attentions=True)
    return out


@pytest.mark.parametrize("variant", sorted(FULL))
def test_full_rank_reproduces_tiny_bert(tiny_classifier, token_ids, variant):
    ref = outputs(tiny_classifier, token_ids)
    model = copy.deepcopy(tiny_classifier)
    report = compress(model, FULL[variant])
    assert type(model) is type(tiny_classifier)
    assert report.rel_error < 1e-5
    out = outputs(model, token_ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    for h, r in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(h, r, rtol=1e-4, atol=1e-5)
    assert len(out.attentions) == 2
    for a, r in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["tucker", "shared", "lowrank"])
def test_full_rank_reproduces_real_minilm(minilm, variant):
    teacher, tokenizer = minilm
    enc = tokenizer(["Tucker decomposition with shared factors.", "A second, longer sentence here."],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = teacher(**enc, output_hidden_states=True)
    model = copy.deepcopy(teacher)
    compress(model, CompressionSpec(variant=variant, rank=384))
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    for h, r in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(h, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.variant}-{s.scope}-{s.grouping}")
def test_parameter_count_equals_formula(tiny_classifier, spec):
    model = copy.deepcopy(tiny_classifier)
    dense = count_parameters(model)
    report = quiet_compress(model, spec)
    counted = count_parameters(model)
    formula = param_counts(encoder_shape(model), report.spec)
    assert counted["encoder"] == formula["encoder"]
    assert counted["encoder_weights"] == formula["encoder_weights"]
    assert dense["encoder"] == formula["dense_encoder"]
    assert counted["embeddings"] == dense["embeddings"] == formula["embeddings"]
    assert counted["other"] == dense["other"]  # pooler + classifier untouched
    assert formula["ratio"] == pytest.approx(dense["encoder"] / counted["encoder"])


def test_parameter_formula_matches_paper_bert_base():
    from tdlight.tensor.spec import EncoderShape, resolve

    shape = EncoderShape(12, 768, 3072, 30522, 512, 2)
    counts = param_counts(shape, resolve(CompressionSpec(variant="tucker", rank=384, bank=72), shape))
    assert counts["dense_encoder"] == 85_054_464  # 85.1M
    assert counts["encoder_weights"] == 2 * 768 * 384 + 72 * 384 * 384 + 144 * 72
    assert round(counts["encoder"] / 1e6, 1) == 11.3  # the paper's 1/7 row
    tiny = resolve(CompressionSpec(variant="tucker", bank_ratio=0.25, target_ratio=48), shape)
    assert param_counts(shape, tiny)["encoder"] < 2_000_000  # "under 2M encoder parameters"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.variant}-{s.scope}-{s.grouping}")
def test_factorized_and_dense_modes_agree(tiny_classifier, token_ids, spec):
    model = copy.deepcopy(tiny_classifier)
    quiet_compress(model, spec)
    fact = outputs(model, token_ids)
    set_mode(model, "dense")  # the weights rebuilt from the factors, one F.linear each
    dense = outputs(model, token_ids)
    set_mode(model, "factorized")
    scale = dense.logits.abs().max()
    assert (fact.logits - dense.logits).abs().max() <= 1e-5 * scale + 1e-7
    for h, r in zip(fact.hidden_states, dense.hidden_states, strict=True):
        assert (h - r).norm() <= 1e-5 * r.norm()


def test_set_mode_rejects_unknown(tiny_bert):
    quiet_compress(tiny_bert, SPECS[0])
    with pytest.raises(SpecError, match="'fast'.*factorized"):
        set_mode(tiny_bert, "fast")


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=["tucker", "lowrank"])
def test_gradients_reach_factors_and_biases(tiny_classifier, token_ids, spec):
    model = copy.deepcopy(tiny_classifier).train()
    quiet_compress(model, spec)
    out = model(**token_ids, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    banks = model.bert.encoder.factor_banks
    for bank in banks.values():
        for name, p in bank.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    lin = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(lin, FactorizedLinear)
    assert lin.bias.grad is not None and lin.bias.grad.abs().sum() > 0
    ffn = model.bert.encoder.layer[1].output.dense
    assert ffn.bias.grad.abs().sum() > 0


def test_qkv_share_one_input_projection(tiny_bert, token_ids, monkeypatch):
    """x @ U is computed once for Q, K and V (DESIGN §1), not three times."""
    quiet_compress(tiny_bert, SPECS[0])
    calls = []
    from tdlight.model import linear

    original = linear.SharedInput.output

    def spy(self, x, slot):
        calls.append(self.hit(x))
        return original(self, x, slot)

    monkeypatch.setattr(linear.SharedInput, "output", spy)
    with torch.no_grad():
        ref = tiny_bert(**token_ids).last_hidden_state
    assert calls == [False, True, True] * 2  # per layer: one miss (query), two hits
    calls.clear()
    with torch.inference_mode():  # inference tensors have no version counter
        out = tiny_bert(**token_ids).last_hidden_state
    assert calls == [False, True, True] * 2
    torch.testing.assert_close(out, ref)


def test_state_dict_holds_each_bank_once(tiny_bert):
    quiet_compress(tiny_bert, SPECS[0])
    keys = [k for k in tiny_bert.state_dict() if "factor_banks" in k]
    assert sorted(keys) == sorted(f"encoder.factor_banks.encoder.{n}" for n in ("U", "V", "core", "P"))
    assert not any(".query.bank" in k for k in tiny_bert.state_dict())


@pytest.mark.parametrize("variant", sorted(FULL))
def test_densify_of_full_rank_equals_original(tiny_classifier, token_ids, variant):
    ref = outputs(tiny_classifier, token_ids)
    model = copy.deepcopy(tiny_classifier)
    compress(model, FULL[variant])
    densify(model)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_classifier.state_dict())
    for (k, a), b in zip(model.state_dict().items(), tiny_classifier.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(outputs(model, token_ids).logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_densify_keeps_low_rank_function(tiny_classifier, token_ids, tmp_path):
    model = copy.deepcopy(tiny_classifier)
    quiet_compress(model, SPECS[0])
    expect = outputs(model, token_ids).logits
    save_compressed(model, tmp_path / "c")
    out = export_dense(tmp_path / "c", tmp_path / "dense")
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    torch.testing.assert_close(outputs(plain, token_ids).logits, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[4], SPECS[7]],
                         ids=["tucker", "lowrank", "grouped", "ffn"])
def test_save_load_identical(tiny_classifier, token_ids, tmp_path, spec):
    model = copy.deepcopy(tiny_classifier)
    quiet_compress(model, spec)
    path = save_compressed(model, tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "modeling_tdlight.py",
                                                      "tdlight.json"]
    loaded = load_compressed(path)
    assert isinstance(loaded, type(model)) and type(loaded).__name__ == "Tdlight" + type(model).__name__
    for name, value in model.state_dict().items():  # the weights come back bit for bit
        assert torch.equal(loaded.state_dict()[name], value), name
    # outputs agree to float rounding (BLAS may pick another kernel for fresh buffers)
    torch.testing.assert_close(outputs(loaded, token_ids).logits, outputs(model, token_ids).logits,
                               rtol=1e-6, atol=1e-7)


def test_load_compressed_real_minilm_with_tokenizer(minilm, tmp_path):
    import tdlight

    teacher, tokenizer = minilm
    model = copy.deepcopy(teacher)
    quiet_compress(model, CompressionSpec(variant="tucker", rank=32, bank=18))
    save_compressed(model, tmp_path / "m", tokenizer)
    loaded = tdlight.load_compressed(tmp_path / "m")
    tok = tdlight.load_tokenizer(tmp_path / "m")
    enc = tok(["three lines for inference"], return_tensors="pt")
    with torch.no_grad():  # loaded runs its MAC plan (folded): the same weights, sums in another order
        torch.testing.assert_close(loaded(**enc).last_hidden_state, model(**enc).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)


def test_save_replaces_atomically_and_keeps_old_on_failure(tiny_bert, tmp_path, monkeypatch):
    quiet_compress(tiny_bert, SPECS[0])
    path = save_compressed(tiny_bert, tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(tiny_bert, tmp_path / "m")
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp leftovers


def test_load_errors(tiny_bert, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_compressed(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="tdlight.json is missing"):
        load_compressed(tmp_path / "plain")
    quiet_compress(tiny_bert, SPECS[0])
    path = save_compressed(tiny_bert, tmp_path / "m")
    (path / "tdlight.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_compressed(path)
    path = save_compressed(tiny_bert, tmp_path / "m2")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_compressed(path)


@pytest.mark.parametrize("edit", [
    lambda m: None, lambda m: [m], lambda m: 3,
    lambda m: {**m, "spec": {k: v for k, v in m["spec"].items() if k != "banks"}},
    lambda m: {**m, "spec": {**m["spec"], "rank_in": -5}},
    lambda m: {**m, "spec": {**m["spec"], "rank_out": 10_000}},
    lambda m: {**m, "spec": {**m["spec"], "banks": {"encoder": 0}}},
    lambda m: {**m, "spec": {**m["spec"], "banks": {"nope": 2}}},
    lambda m: {**m, "spec": {**m["spec"], "variant": "IV+"}},
    lambda m: {**m, "spec": None},
    lambda m: {**m, "shape": {**m["shape"], "num_layers": -1}},
    lambda m: {**m, "class": 5}, lambda m: {**m, "class": None}, lambda m: {**m, "class": "BertTokenizer"},
], ids=["null", "list", "number", "spec-without-banks", "negative-rank", "rank-above-D", "empty-bank",
        "unknown-group", "unknown-variant", "spec-null", "negative-layers", "class-number", "class-null",
        "class-not-a-model"])
def test_malformed_metadata_is_an_artifact_error(tiny_bert, tmp_path, edit):
    """Whatever a hand-edited tdlight.json holds, loading says it is corrupt (never a crash deeper in)."""
    import json

    quiet_compress(tiny_bert, SPECS[0])
    path = save_compressed(tiny_bert, tmp_path / "m")
    meta = json.loads((path / "tdlight.json").read_text())
    (path / "tdlight.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(ArtifactError, match="tdlight.json"):
        load_compressed(path)


def test_a_bad_device_is_named_not_taken_for_a_corrupt_file(tiny_bert, tmp_path):
    quiet_compress(tiny_bert, SPECS[0])
    path = save_compressed(tiny_bert, tmp_path / "m")
    assert load_compressed(path, device=torch.device("cpu")) is not None  # a torch.device is a device
    for device, msg in [("mps", "tdlight runs on cpu or cuda"), ("nonsense", "is not a device"),
                        *([] if torch.cuda.is_available() else [("cuda", "no CUDA device is available")])]:
        with pytest.raises(ArtifactError, match=msg) as e:
            load_compressed(path, device=device)
        assert "corrupt" not in str(e.value)


def test_flipped_bytes_in_the_weights_are_detected(tiny_bert, tmp_path):
    """A changed model.safetensors (same size, still parseable) no longer loads silently."""
    quiet_compress(tiny_bert, SPECS[0])
    path = save_compressed(tiny_bert, tmp_path / "m")
    load_compressed(path)  # intact: loads
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data: the header still parses
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256 differs"):
        load_compressed(path)


def test_compressed_weights_without_metadata_are_refused(tiny_bert, tmp_path):
    """Deleting tdlight.json must not turn a compressed model into a random dense one."""
    from tdlight.model.teacher import load_classifier, load_teacher

    quiet_compress(tiny_bert, SPECS[0])
    path = save_compressed(tiny_bert, tmp_path / "m")
    (path / "tdlight.json").unlink()
    for load in (lambda: load_teacher(str(path)), lambda: load_classifier(str(path), 2)):
        with pytest.raises(ArtifactError, match="no tdlight.json"):
            load()


def test_compress_twice_is_an_error(tiny_bert):
    quiet_compress(tiny_bert, SPECS[0])
    with pytest.raises(SpecError, match="already compressed"):
        compress(tiny_bert, SPECS[0])


def test_not_bert_shaped_teacher_is_rejected():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TeacherError, match="not BERT-shaped"):
        compress(model, SPECS[0])

    class Odd(nn.Module):  # BERT structure but an FFN that is not a multiple of D
        def __init__(self):
            super().__init__()
            from transformers import BertModel

            from tests.conftest import tiny_config

            self.inner = BertModel(tiny_config(intermediate_size=40))

    with pytest.raises(TeacherError, match="not a multiple"):
        compress(Odd().inner, SPECS[0])


@pytest.mark.parametrize("kw, match", [
    ({"rank": 0}, "rank_in=0"),
    ({"rank": -3}, "rank_in=-3"),
    ({"rank": 33}, r"rank_in=33 .*\[1, 32\]"),
    ({"rank": 8, "bank": 25}, r"bank=25 .*\[1, 24\]"),
    ({"rank": 8, "variant": "V"}, "unknown variant 'V'"),
    ({"rank": 8, "scope": "heads"}, "unknown layout scope 'heads'"),
    ({"rank": 8, "grouping": "layers", "layers_per_group": 3}, "layers_per_group=3"),
    ({"rank": 8, "variant": "shared", "bank": 4}, "only apply to variant 'tucker'"),
    ({"rank_ratio": 1.5}, "rank_ratio=1.5"),
    ({"target_ratio": 1e9, "bank": 24}, "out of reach"),
    ({}, "no rank given"),
])
def test_bad_specs(tiny_bert, kw, match):
    with pytest.raises(SpecError, match=match):
        compress(tiny_bert, CompressionSpec(**kw))
    assert not any(isinstance(m, FactorizedLinear) for m in tiny_bert.modules())  # untouched


def test_teacher_errors(tmp_path):
    from tdlight.model.teacher import load_teacher

    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(str(tmp_path))


def test_copy_head_gives_a_compressed_student_the_teachers_head(tiny_bert, tiny_classifier, token_ids):
    from tdlight.model.teacher import as_classifier, copy_head, head_state

    encoder = copy.deepcopy(tiny_bert)
    quiet_compress(encoder, SPECS[0])
    student = as_classifier(encoder, 3)
    assert (student.classifier.weight - tiny_classifier.classifier.weight).abs().max() > 0  # a new head
    copied = copy_head(student, tiny_classifier)
    assert copied == sorted(["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                             "classifier.bias"])
    for k, v in head_state(tiny_classifier).items():
        assert torch.equal(head_state(student)[k], v), k
    # the encoder is untouched: the student still runs its own (compressed) layers
    assert isinstance(student.bert.encoder.layer[0].attention.self.query, FactorizedLinear)
    student(**token_ids)
    with pytest.raises(TeacherError, match=r"does not fit the student.*classifier.weight"):
        copy_head(as_classifier(copy.deepcopy(tiny_bert), 2), tiny_classifier)  # 2 labels vs 3


def test_load_masked_lm_needs_a_trained_mlm_head(tmp_path, teacher_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    from tdlight.model.teacher import load_masked_lm
    from tests.conftest import tiny_config

    for name in ("minilm", str(teacher_dir)):  # a sentence encoder, a sequence classifier
        with pytest.raises(TeacherError, match=r"has no masked-LM head \(its checkpoint lacks \['cls\.predictions"):
            load_masked_lm(name)
    path = tmp_path / "mlm"
    BertForMaskedLM(tiny_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    model, tokenizer = load_masked_lm(str(path))
    assert type(model).__name__ == "BertForMaskedLM" and not model.training \
        and tokenizer.get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()


def test_paper_presets_resolve_on_minilm_shape():
    from tdlight.tensor.spec import EncoderShape, resolve

    shape = EncoderShape(6, 384, 1536, 30522, 512, 2)
    r7 = resolve(CompressionSpec(variant="tucker", rank_ratio=0.5, bank_ratio=0.5), shape)
    assert (r7.rank_in, r7.banks["encoder"]) == (192, 36)
    r48 = resolve(CompressionSpec(variant="tucker", bank_ratio=0.25, target_ratio=48), shape)
    assert param_counts(shape, r48)["ratio"] >= 48
    bigger = resolve(CompressionSpec(variant="tucker", rank=r48.rank_in + 1, bank_ratio=0.25), shape)
    assert param_counts(shape, bigger)["ratio"] < 48  # the largest rank that reaches the target
    # an explicit rank on the command line beats a preset's ratio
    assert resolve(CompressionSpec(variant="tucker", rank=64, rank_ratio=0.5, bank=36), shape).rank_in == 64


def test_group_banks_move_the_budget_between_groups_at_the_same_ratio():
    """group_banks beats bank / bank_ratio for the groups it names; with target_ratio the rank is solved
    for those banks, so attention can keep every core while the FFN shares a few, at the preset's ratio."""
    from tdlight.tensor.spec import EncoderShape, resolve

    shape = EncoderShape(6, 384, 1536, 30522, 512, 2)
    base = dict(variant="tucker", grouping="type", bank_ratio=0.5, target_ratio=7.06)
    even = resolve(CompressionSpec(**base), shape)
    assert even.banks == {"attention": 12, "ffn": 24}
    attn = resolve(CompressionSpec(**base, group_banks={"attention": 24, "ffn": 6}), shape)
    assert attn.banks == {"attention": 24, "ffn": 6}
    assert param_counts(shape, attn)["ratio"] >= 7.06  # the same budget, spent otherwise
    assert resolve(CompressionSpec(**base, group_banks={"attention": 24}), shape).banks == {"attention": 24, "ffn": 24}
    assert resolve(CompressionSpec(variant="tucker", grouping="type", rank=8, bank=5, group_banks={"ffn": 40}),
                   shape).banks == {"attention": 5, "ffn": 40}


@pytest.mark.parametrize("kw, message", [
    (dict(grouping="type", group_banks={"attn": 3}), r"group_banks names group 'attn', which grouping='type' does not "
                                                    r"have; valid groups: attention \(n=24\), ffn \(n=48\)"),
    (dict(group_banks={"attention": 3}), r"which grouping='none' does not have; valid groups: encoder \(n=72\) "
                                        r"\(set grouping=type or layers"),
    (dict(grouping="type", group_banks={"attention": 25}), r"group_banks\['attention'\]=25; valid: an integer in \[1, 24\]"),
    (dict(grouping="type", group_banks={"ffn": 0}), r"group_banks\['ffn'\]=0; valid: an integer in \[1, 48\]"),
    (dict(grouping="type", group_banks=0), r"group_banks=0; valid: a mapping of group name to bank size"),
    (dict(grouping="type", group_banks=[3, 4]), r"group_banks=\[3, 4\]; valid: a mapping of group name to bank size"),
    (dict(variant="shared", group_banks={"encoder": 3}), r"group_banks=\{'encoder': 3\} only applies to variant 'tucker'"),
])
def test_group_banks_refusals_name_the_value_and_what_is_valid(kw, message):
    from tdlight.errors import SpecError
    from tdlight.tensor.spec import EncoderShape, resolve

    with pytest.raises(SpecError, match=message):
        resolve(CompressionSpec(**{"variant": "tucker", "rank": 8, **kw}), EncoderShape(6, 384, 1536, 30522, 512, 2))


@pytest.mark.parametrize("spec", [None] + SPECS, ids=lambda s: "dense" if s is None else f"{s.variant}-{s.scope}-{s.grouping}")
def test_mac_accounting_equals_counted_matmuls(spec, token_ids):
    """tensor.accounting.macs counts exactly the matmul work the model does (no pooler)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertModel

    from tests.conftest import tiny_config
    from tdlight.tensor.accounting import macs
    from tdlight.tensor.spec import resolve

    torch.manual_seed(0)
    model = BertModel(tiny_config(), add_pooling_layer=False).eval()
    shape = encoder_shape(model)
    resolved = None
    if spec is not None:
        quiet_compress(model, spec)
        resolved = resolve(spec, shape)
    ids = token_ids["input_ids"]
    modes = ["factorized"] if spec is None else ["factorized", "dense"] + ["folded"] * resolved.strategy.shared_factors
    for mode in modes:  # each execution mode's work (tdlight.model.execution), its weights built beforehand
        if spec is not None:
            set_mode(model, mode)
        with torch.no_grad():
            model(input_ids=ids)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(input_ids=ids)
        kinds = ("qkv", "query", "key", "value", "attn_out", "ffn_in", "ffn_out")
        predicted = macs(shape, resolved, seq_len=ids.shape[1], modes={k: mode for k in kinds})
        expected = predicted["per_token"] * ids.numel() + predicted["core_mixing_per_forward"]
        assert counter.get_total_flops() / 2 == expected, mode
