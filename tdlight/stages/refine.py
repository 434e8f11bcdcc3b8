"""Activation-aware refinement of a fresh decomposition (an option of ``stage=decompose``).

HOOI minimises the error of the *weights*; what matters is each layer's *output* on real
inputs. Here every compressed layer l gets the teacher's own input h_{l-1} (a forward
pre-hook swaps it in, so errors do not propagate from layer to layer) and its output is
pulled towards the teacher's h_l by MSE over real tokens, training only the factors
(U, V, cores, P) on a few hundred calibration batches of text. The relative layer-output
error ‖ĥ_l − h_l‖ / ‖h_l‖ (mean over layers) is measured on held-out batches before and
after.
"""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from tdlight.model.surgery import get_encoder
from tdlight.stages.classifier import MODEL_INPUTS


@contextmanager
def teacher_inputs(student: nn.Module, teacher_hidden: tuple[torch.Tensor, ...], outputs: list):
    """Feed student layer l the teacher's h_{l-1}; collect each student layer's output in ``outputs``."""
    handles = []
    for i, layer in enumerate(get_encoder(student).layer):
        def pre(module, args, kwargs, i=i):
            return (teacher_hidden[i].detach(), *args[1:]), kwargs

        def post(module, args, kwargs, out):
            outputs.append(out[0] if isinstance(out, tuple) else out)

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def layer_errors(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE over real tokens, mean relative error) of the student's layer outputs given teacher inputs."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True).hidden_states
    outs: list[torch.Tensor] = []
    with teacher_inputs(student, t, outs):
        student(**inputs)
    w = inputs["attention_mask"][..., None].to(t[0].dtype)
    mse, rel = [], []
    for l, s_out in enumerate(outs, start=1):
        diff = (s_out - t[l]) * w
        mse.append(diff.square().sum() / (w.sum() * s_out.shape[-1]))
        rel.append(diff.norm() / (t[l] * w).norm().clamp_min(1e-12))
    return torch.stack(mse).mean(), torch.stack(rel).mean()


class RefineModule(L.LightningModule):
    """Trains only the factor banks of ``student`` so that its layer outputs match ``teacher``'s."""

    def __init__(self, student: nn.Module, teacher: nn.Module, lr: float, steps: int):
        super().__init__()
        self.model = student
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))  # not a submodule
        self.lr, self.steps = lr, steps
        self.model.requires_grad_(False)
        get_encoder(self.model).factor_banks.requires_grad_(True)

    def on_fit_start(self) -> None:
        self.model.eval()  # no dropout: match the teacher's deterministic outputs
        self.teacher.to(self.device).eval()

    def training_step(self, batch, batch_idx):
        loss, rel = layer_errors(self.model, self.teacher, batch)
        self.log("refine/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log("refine/rel_error", rel, batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, self.steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def heldout_error(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> float:
    mode = student.training
    student.eval()
    errs = [layer_errors(student, teacher, b)[1].item() for b in batches]
    student.train(mode)
    return sum(errs) / len(errs)
