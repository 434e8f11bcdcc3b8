"""Distillation internals and losses: captured scores, zero iff equal, masking, layer maps, no teacher gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from tdlight.errors import SpecError
from tdlight.model.capture import forward_with_scores
from tdlight.stages.losses import attention_loss, embedding_loss, hidden_loss, layer_map, prediction_loss


def test_captured_scores_are_pre_softmax_and_the_forward_is_unchanged(tiny_classifier, token_ids):
    ref = tiny_classifier(**token_ids, output_hidden_states=True, output_attentions=True)
    got = forward_with_scores(tiny_classifier, **token_ids)
    torch.testing.assert_close(got.logits, ref.logits)
    assert len(got.hidden_states) == 3 and len(got.scores) == 2
    for layer, (scores, probs) in enumerate(zip(got.scores, ref.attentions)):
        mask = (1 - token_ids["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        torch.testing.assert_close((scores + mask).softmax(-1), probs, msg=f"layer {layer}")
    assert tiny_classifier.config._attn_implementation == "eager"  # switched back
    assert not hasattr(tiny_classifier.bert.encoder.layer[0].attention.self, "tdlight_scores")


def test_capture_works_on_a_compressed_model(tiny_classifier, token_ids):
    from tdlight.model.surgery import compress
    from tdlight.tensor.spec import CompressionSpec

    student = copy.deepcopy(tiny_classifier)
    compress(student, CompressionSpec(variant="tucker", rank=32))  # full rank: same function
    a = forward_with_scores(student, **token_ids)
    b = forward_with_scores(tiny_classifier, **token_ids)
    pairs = layer_map("all", 2, 2)
    for loss in (hidden_loss(a, b, pairs), attention_loss(a, b, pairs), embedding_loss(a, b)):
        assert loss.item() < 1e-9
    assert prediction_loss(a.logits, b.logits, temperature=2.0).item() < 1e-9


def test_losses_zero_iff_equal_and_positive_otherwise(tiny_classifier, token_ids):
    teacher = tiny_classifier
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        t = forward_with_scores(teacher, **token_ids)
    s = forward_with_scores(student, **token_ids)
    pairs = layer_map("all", 2, 2)
    assert hidden_loss(s, t, pairs).item() == 0 and attention_loss(s, t, pairs).item() == 0
    assert embedding_loss(s, t).item() == 0 and prediction_loss(s.logits, t.logits).item() == 0
    assert prediction_loss(s.logits[:, :1], t.logits[:, :1], regression=True).item() == 0
    with torch.no_grad():
        for p in student.bert.encoder.layer[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
        student.bert.embeddings.word_embeddings.weight.mul_(1.1)
        student.classifier.weight.add_(0.3)
    s = forward_with_scores(student, **token_ids)
    for loss in (hidden_loss(s, t, pairs), attention_loss(s, t, pairs), embedding_loss(s, t),
                 prediction_loss(s.logits, t.logits, temperature=3.0),
                 prediction_loss(s.logits[:, :1], t.logits[:, :1], regression=True)):
        assert loss.item() > 0


def test_padding_does_not_count(tiny_classifier, token_ids):
    """Changing what sits at padded positions changes no loss."""
    t = forward_with_scores(tiny_classifier, **token_ids)
    s = forward_with_scores(tiny_classifier, **token_ids)
    pad = token_ids["attention_mask"] == 0
    assert pad.any()
    s.hidden_states = tuple(h.masked_fill(pad[..., None], 7.0) for h in s.hidden_states)
    key_pad = pad[:, None, None, :] | pad[:, None, :, None]
    s.scores = [x.masked_fill(key_pad, -3.0) for x in s.scores]
    pairs = [(1, 1), (2, 2)]
    assert hidden_loss(s, t, pairs).item() == 0 and attention_loss(s, t, pairs).item() == 0


def test_teacher_receives_no_gradient(tiny_classifier, token_ids):
    teacher = tiny_classifier.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        student.bert.encoder.layer[0].output.dense.weight.add_(0.1)
    with torch.no_grad():
        t = forward_with_scores(teacher, **token_ids)
    s = forward_with_scores(student, **token_ids)
    pairs = layer_map("last", 2, 2)
    loss = hidden_loss(s, t, pairs) + attention_loss(s, t, pairs) + prediction_loss(s.logits, t.logits)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0


def test_layer_maps():
    assert layer_map("last", 4, 12) == [(4, 12)]
    assert layer_map("all", 3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert layer_map("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert layer_map([[0, 0], [2, 6]], 4, 12) == [(0, 0), (2, 6)]
    # a shallower student (a teacher cut to fewer layers): every layer at the same relative depth, last on last
    assert layer_map("all", 4, 12) == layer_map("uniform", 4, 12)
    assert layer_map("all", 4, 6) == [(1, 1), (2, 3), (3, 4), (4, 6)] and layer_map("all", 1, 6) == [(1, 6)]
    cases = [("all", 12, 4, "no deeper than its teacher"), ("uniform", 5, 12, "multiple"),
             ("all", 0, 6, "the student has no encoder layer"), ("uniform", 0, 6, "no encoder layer"),
             ("every", 4, 4, r"unknown layer map 'every'; valid: \['last', 'all', 'uniform'\]"),
             ([[5, 12]], 4, 12, r"\[5, 12\] is out of range: student layers are 0..4, teacher layers 0..12"),
             ([[1, 13]], 4, 12, "out of range"), ([[1]], 4, 12, "not a \\[student, teacher\\] pair"),
             ([], 4, 12, "empty")]
    for kind, ls, lt, match in cases:
        with pytest.raises(SpecError, match=match):
            layer_map(kind, ls, lt)
    with pytest.raises(SpecError, match="temperature"):
        prediction_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)


def test_gold_loss_is_the_classifiers_own(tiny_classifier, token_ids):
    from tdlight.stages.losses import gold_loss

    labels = torch.tensor([0, 2, 1])
    out = tiny_classifier(**token_ids, labels=labels)
    torch.testing.assert_close(gold_loss(out.logits, labels), out.loss)
    scores, target = torch.tensor([[0.5], [2.0]]), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(gold_loss(scores, target, regression=True), torch.tensor(0.125))


def test_relative_intermediate_losses_are_scale_free(tiny_classifier, token_ids):
    from tdlight.stages.losses import intermediate_loss

    with torch.no_grad():
        t = forward_with_scores(tiny_classifier, **token_ids)
    pairs = [(1, 1), (2, 2)]
    zero = copy.copy(t)
    zero.hidden_states = tuple(torch.zeros_like(h) for h in t.hidden_states)
    zero.scores = [torch.zeros_like(x) for x in t.scores]
    weights = {"hidden": 1.0, "attention": 1.0, "embedding": 1.0}
    total, parts = intermediate_loss(zero, t, pairs, weights, relative=True)
    for name in ("hidden", "attention", "embedding"):  # a student that outputs zeros is at 1 on every term
        assert parts[name].item() == pytest.approx(1.0)
    scaled = copy.copy(t)  # 10x larger teacher and student: the relative loss does not change, plain MSE does
    scaled.hidden_states = tuple(10 * h for h in t.hidden_states)
    assert hidden_loss(zero, scaled, pairs, relative=True).item() == pytest.approx(1.0)
    assert hidden_loss(zero, scaled, pairs).item() == pytest.approx(100 * hidden_loss(zero, t, pairs).item(), rel=1e-5)
    assert intermediate_loss(t, t, pairs, weights, relative=True)[0].item() == 0
