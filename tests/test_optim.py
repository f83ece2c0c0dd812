"""The protocol's optimiser options for patient schedules (FunMatch): global-norm gradient clipping in the
loop, AdamW's decoupled weight decay (not multiplied by the learning rate) and no decay on 1-d parameters,
each in closed form on one step."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from kdbench.config import Protocol, ViewRecipe
from kdbench.data.shards import Split
from kdbench.meta import DataInfo
from kdbench.methods.base import LossOutput
from kdbench.methods.baseline import Baseline
from kdbench.models import create_model, model_info
from kdbench.train.loop import fit
from kdbench.train.optim import build_optimizer, lr_factor

DATA = DataInfo(num_classes=10, in_chans=1, image_size=28, num_train=16, mean=(0.5,), std=(0.5,))
SGD = Protocol(epochs=1, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
               schedule="constant", views=ViewRecipe(count=1, scale=(1.0, 1.0), flip=False))


class HugeLoss(Baseline):
    """The student-alone loss times 1e6: a gradient far above any clipping norm."""

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        return LossOutput.from_terms({"ce": 1e6 * super().loss(student, teacher, targets, ctx).loss})


def _one_step(protocol: Protocol) -> float:
    """The L2 norm of the parameter change of one SGD step of ``fit`` (16 images, one batch)."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (16,), generator=g), torch.arange(16), 16)
    torch.manual_seed(0)
    model = create_model("cnn_xs", 10, 1, 28)
    info = model_info(model, "cnn_xs", 1, 28)
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, HugeLoss(Baseline.Config(), teacher=None, student=info, data=DATA), split, {}, DATA, protocol, 0,
        torch.device("cpu"))
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))


def test_a_huge_gradient_is_clipped_to_the_norm():
    assert _one_step(SGD) > 1e3  # unclipped: lr * |g| is huge
    step = _one_step(dataclasses.replace(SGD, grad_clip_norm=1.0))
    assert step == pytest.approx(0.1 * 1.0, rel=1e-4)  # lr * clip norm


def _adamw_step(lr: float, factor: float, **options) -> tuple[torch.Tensor, ...]:
    """One AdamW step at learning rate ``lr * factor`` (as the loop sets it) on a weight matrix and a bias;
    returns (the matrix before, its gradient, the matrix after, the bias after / before)."""
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b.grad = torch.zeros(3, dtype=torch.float64)  # Adam's direction is 0: only the decay moves the bias
    opt = build_optimizer([w, b], Protocol(optimizer="adamw", lr=lr, weight_decay=3e-4, **options))
    for group in opt.param_groups:
        group["lr"] = lr * factor
    opt.step()
    return w0, w.grad, w.detach(), b.detach() / b0


def test_decoupled_weight_decay_is_schedule_times_wd_whatever_the_lr():
    """big_vision: theta_1 = theta_0 - sched * (lr * adam_dir + wd * theta_0); Adam's first direction is
    g / (|g| + eps) (bias-corrected moments of one gradient)."""
    wd, factor = 3e-4, 0.5
    for lr in (1e-3, 1e-1):
        w0, grad, w1, bias = _adamw_step(lr, factor, decoupled_weight_decay=True)
        adam_dir = grad / (grad.abs() + 1e-8)
        expected = w0 - factor * (lr * adam_dir + wd * w0)
        torch.testing.assert_close(w1, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias, torch.full((3,), 1 - factor * wd, dtype=torch.float64), rtol=0, atol=1e-15)


def test_pytorch_weight_decay_is_multiplied_by_the_lr_by_default():
    lr, factor = 1e-1, 0.5
    *_, bias = _adamw_step(lr, factor)
    torch.testing.assert_close(bias, torch.full((3,), 1 - lr * factor * 3e-4, dtype=torch.float64), rtol=0, atol=1e-15)


def test_1d_parameters_can_be_excluded_from_decay():
    w0, _, w1, bias = _adamw_step(1e-1, 1.0, decoupled_weight_decay=True, weight_decay_exclude_1d=True)
    assert torch.equal(bias, torch.ones(3, dtype=torch.float64))  # zero gradient, no decay: unchanged
    assert not torch.equal(w1, w0)


def test_linear_warmup_then_cosine_to_zero():
    p = Protocol(epochs=10, warmup_epochs=2, schedule="cosine")
    spe = 5
    factors = [lr_factor(p, s, spe) for s in range(p.epochs * spe)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear to 1 over 2 epochs
    assert factors[10] == 1.0 and factors[10 + 20] == pytest.approx(0.5)  # cosine over the other 8 epochs
    assert all(a >= b for a, b in itertools.pairwise(factors[10:])) and factors[-1] < 0.002
