"""Distillation losses (TinyBERT-style, as used by the paper) and the student→teacher layer map.

Layers are numbered 1..L as in ``hidden_states`` (0 is the embedding output). Every loss
is zero when the student's internals equal the teacher's and positive otherwise; padding
never contributes (token positions with ``attention_mask == 0`` are left out, and for
attention scores both the query and the key must be real tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdlight.errors import SpecError
from tdlight.model.capture import Internals

LAYER_MAPS = ("last", "all", "uniform")


def layer_map(kind: str | list, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``[(student layer, teacher layer), ...]`` for ``kind``:

    * ``last``: the last layers only;
    * ``all``: every student layer — one to one at the same depth; a shallower student (a teacher cut
      to fewer layers) at the same relative depth, layer i ↔ teacher layer ⌊i·Lt/Ls⌋, its last on the
      teacher's last (``uniform`` where Ls divides Lt);
    * ``uniform``: student layer i ↔ teacher layer i·Lt/Ls (TinyBERT's map for a shallower student);
    * an explicit list of ``[s, t]`` pairs, each checked to be in range.

    A student without layers (a teacher cut to none) has nothing to map but explicit pairs.
    """
    Ls, Lt = student_layers, teacher_layers
    if isinstance(kind, str) and Ls == 0 and kind in LAYER_MAPS:
        raise SpecError(f"layer map {kind!r}: the student has no encoder layer (a teacher cut to 0 layers), so no "
                        "hidden state or attention score to match; valid: no intermediate-layer distillation "
                        "(stage.intermediate_epochs=0), or a student with at least one layer")
    if isinstance(kind, str):
        if kind == "last":
            return [(Ls, Lt)]
        if kind == "all":
            if Ls > Lt:
                raise SpecError(f"layer map 'all' needs a student no deeper than its teacher, got student {Ls} vs "
                                f"teacher {Lt} layers; give explicit pairs instead")
            return [(i, i * Lt // Ls) for i in range(1, Ls + 1)]
        if kind == "uniform":
            if Lt % Ls:
                raise SpecError(f"layer map 'uniform' needs the teacher depth {Lt} to be a multiple of the student "
                                f"depth {Ls}; give explicit pairs instead")
            return [(i, i * Lt // Ls) for i in range(1, Ls + 1)]
        raise SpecError(f"unknown layer map {kind!r}; valid: {list(LAYER_MAPS)} or a list of [student, teacher] pairs")
    pairs = []
    for p in kind:
        try:
            s, t = (int(x) for x in p)
        except (TypeError, ValueError):
            raise SpecError(f"layer map entry {p!r} is not a [student, teacher] pair of layer numbers") from None
        if not (0 <= s <= Ls) or not (0 <= t <= Lt):
            raise SpecError(f"layer map entry [{s}, {t}] is out of range: student layers are 0..{Ls}, "
                            f"teacher layers 0..{Lt} (0 = the embedding output)")
        pairs.append((s, t))
    if not pairs:
        raise SpecError("the layer map is empty; give at least one [student, teacher] pair")
    return pairs


def _masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Mean squared error over the positions where ``weight`` (broadcastable) is 1.

    ``relative``: ‖a − b‖² / ‖b‖² over those positions instead — scale-free, so that terms of
    very different magnitudes (hidden states vs pre-softmax attention scores) weigh alike;
    1 for a student that outputs zeros, 0 when it matches.
    """
    diff = (a.float() - b.float()).square() * weight
    if relative:
        return diff.sum() / (b.float().square() * weight).sum().clamp_min(1e-12)
    denom = weight.expand_as(diff).sum().clamp_min(1.0)
    return diff.sum() / denom


def hidden_loss(student: Internals, teacher: Internals, pairs: list[tuple[int, int]],
                relative: bool = False) -> torch.Tensor:
    """Mean over mapped layers of the MSE between hidden states (B, S, D), real tokens only."""
    w = student.attention_mask[..., None].to(student.hidden_states[0].dtype)  # (B, S, 1)
    losses = [_masked_mse(student.hidden_states[s], teacher.hidden_states[t], w, relative) for s, t in pairs]
    return torch.stack(losses).mean()


def attention_loss(student: Internals, teacher: Internals, pairs: list[tuple[int, int]],
                   relative: bool = False) -> torch.Tensor:
    """Mean over mapped layers (≥ 1; layer 0 has none) of the MSE between pre-softmax scores (B, H, S, S)."""
    m = student.attention_mask.to(student.scores[0].dtype)
    w = (m[:, None, :, None] * m[:, None, None, :])  # query and key both real
    use = [(s, t) for s, t in pairs if s >= 1 and t >= 1]
    if not use:
        raise SpecError("attention distillation needs at least one pair of transformer layers (not 0)")
    losses = []
    for s, t in use:
        a, b = student.scores[s - 1], teacher.scores[t - 1]
        if a.shape[1] != b.shape[1]:
            raise SpecError(f"student layer {s} has {a.shape[1]} heads but teacher layer {t} has {b.shape[1]}")
        losses.append(_masked_mse(a, b, w, relative))
    return torch.stack(losses).mean()


def embedding_loss(student: Internals, teacher: Internals, relative: bool = False) -> torch.Tensor:
    """MSE between the embedding outputs (``hidden_states[0]``), real tokens only."""
    return hidden_loss(student, teacher, [(0, 0)], relative)


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                    regression: bool = False) -> torch.Tensor:
    """Prediction-layer distillation: MSE for regression (STS-B); for classification the KL
    divergence from the teacher's to the student's distribution at temperature T, × T²
    (Hinton's scaling, so gradients keep their size across T). The KL has the gradients of
    the soft cross-entropy but is zero when the two agree.
    """
    if regression:
        return F.mse_loss(student_logits.float().squeeze(-1), teacher_logits.float().squeeze(-1))
    if temperature <= 0:
        raise SpecError(f"temperature={temperature!r} must be > 0")
    T = temperature
    log_p = F.log_softmax(student_logits.float() / T, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * T * T


def gold_loss(logits: torch.Tensor, labels: torch.Tensor, *, regression: bool = False,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """The gold-label loss of HF's sequence classifiers: cross-entropy, or MSE for regression (STS-B).
    ``weight``: one weight per class (cross-entropy only), the batch's loss their weighted mean as torch's
    ``cross_entropy(weight=)`` gives it (finetune's ``class_weights``)."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels.long(), weight=None if weight is None else weight.float())


def intermediate_loss(student: Internals, teacher: Internals, pairs: list[tuple[int, int]],
                      weights: dict[str, float], relative: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the hidden-state, attention-score and embedding losses (weights 0 skip a term).

    ``relative``: each term is the squared error relative to the teacher's squared norm (see
    ``_masked_mse``). With plain MSE the pre-softmax attention scores, whose values are an order
    of magnitude larger than hidden states', dominate the sum (measured on MiniLM at ratio 7:
    attention 21 vs hidden 0.45 at the start; docs/RESULTS.md §7).

    Returns ``(total, {name: term})`` with names ``hidden``, ``attention``, ``embedding``.
    """
    parts: dict[str, torch.Tensor] = {}
    if weights.get("hidden"):
        parts["hidden"] = hidden_loss(student, teacher, pairs, relative)
    if weights.get("attention"):
        parts["attention"] = attention_loss(student, teacher, pairs, relative)
    if weights.get("embedding"):
        parts["embedding"] = embedding_loss(student, teacher, relative)
    if not parts:
        raise SpecError("no intermediate loss has a weight > 0; valid: hidden, attention and/or embedding weight > 0")
    return sum(weights[k] * v for k, v in parts.items()), parts
