"""InDistill: the pruned teacher layers (PyTorch's L1 structured pruning, the zero channels removed) equal the
cached teacher maps' kept channels on real kdbench teachers, and the layer curriculum follows the official
schedule at its reference length and scales to other protocols."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from kdbench.meta import DataInfo
from kdbench.methods import METHODS
from kdbench.methods.base import StepContext, Targets
from kdbench.methods.indistill import (
    curriculum_phase,
    l1_kept_channels,
    producing_conv,
    prune_conv_bn,
)
from kdbench.models import create_model, model_info
from kdbench.taps import TapDict, compute_taps, feature_tap

DATA = DataInfo(num_classes=10, in_chans=1, image_size=28, num_train=64, mean=(0.5,), std=(0.5,))


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and running statistics, so that slicing them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _teacher(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, DATA.num_classes, DATA.in_chans, DATA.image_size)
    _randomise_bn(model, seed)
    return model.eval()


def _unbound_method():
    """InDistill on cnn_m -> cnn_xs, its teacher weights not bound yet."""
    cls = METHODS.get("indistill")
    t, s = create_model("cnn_m", 10, 1, 28), create_model("cnn_xs", 10, 1, 28)
    return cls(cls.Config(), teacher=model_info(t, "cnn_m", 1, 28), student=model_info(s, "cnn_xs", 1, 28), data=DATA)


# --- pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 5, 8, 16])
def test_kept_channels_are_the_l1_largest_filters_as_torch_prunes_them(keep):
    torch.manual_seed(keep)
    conv = nn.Conv2d(4, 16, 3, padding=1, bias=True)
    before = conv.weight.detach().clone()
    kept = l1_kept_channels(conv, keep)
    assert torch.equal(conv.weight, before) and not hasattr(conv, "weight_mask"), "the layer was modified"

    l1 = before.abs().flatten(1).sum(1)
    assert torch.equal(kept, l1.topk(keep).indices.sort().values)
    assert (l1[kept].min() >= l1[[c for c in range(16) if c not in kept.tolist()]].max()) if keep < 16 else True

    # The library's own pruned layer: zero filters exactly outside `kept`, and the pruned layer with its zero
    # channels removed computes the same kept outputs.
    ref = copy.deepcopy(conv)
    prune.ln_structured(ref, "weight", amount=16 - keep, n=1, dim=0)
    nonzero = torch.nonzero(ref.weight.detach().flatten(1).abs().sum(1) > 0).flatten()
    assert torch.equal(nonzero, kept)
    x = torch.randn(2, 4, 7, 7)
    small, _ = prune_conv_bn(conv, None, kept)
    assert small.out_channels == keep and small.in_channels == 4
    torch.testing.assert_close(small(x), ref(x)[:, kept])


def test_keeping_more_channels_than_the_layer_has_is_refused():
    with pytest.raises(ValueError, match="cannot keep 9 of 8"):
        l1_kept_channels(nn.Conv2d(3, 8, 3), 9)


def _pruned_stage_output(teacher: nn.Module, i: int, kept: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Stage ``i`` of ``teacher`` with its producing conv (and BN) pruned to ``kept`` and the zero channels
    removed, run on the *unpruned* previous stage's output ``prev`` (as the official ``get_features``)."""
    stage = copy.deepcopy(teacher.stages[i])
    last = stage[-1]
    if isinstance(last, nn.Sequential) and isinstance(last[0], nn.Conv2d):  # cnn_*: conv-BN-ReLU
        last[0], last[1] = prune_conv_bn(last[0], last[1], kept)
        return stage(prev)
    # CIFAR ResNet basic block: relu(bn2(conv2(h)) + shortcut(x)), the shortcut indexed with `kept`
    # (the official PreActBlock.forward(idxs)).
    x = stage[:-1](prev)
    conv2, bn2 = prune_conv_bn(last.conv2, last.bn2, kept)
    h = F.relu(last.bn1(last.conv1(x)))
    return F.relu(bn2(conv2(h)) + last.shortcut(x)[:, kept])


@pytest.mark.parametrize("teacher_name, student_name", [("cnn_m", "cnn_xs"), ("resnet20", "resnet8"),
                                                        ("resnet8x4", "resnet8")])
def test_stored_indices_reproduce_the_pruned_layers_on_a_real_teacher(teacher_name, student_name):
    teacher = _teacher(teacher_name)
    student = create_model(student_name, DATA.num_classes, DATA.in_chans, DATA.image_size)
    t_info = model_info(teacher, teacher_name, DATA.in_chans, DATA.image_size)
    s_info = model_info(student, student_name, DATA.in_chans, DATA.image_size)
    cls = METHODS.get("indistill")
    method = cls(cls.Config(), teacher=t_info, student=s_info, data=DATA)
    method.bind_teacher_weights(teacher)
    audit = method.audit()["kept_channels"]

    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        taps = compute_taps(teacher, x, [feature_tap(i) for i in range(3)])
        stem = teacher.stem(x)
        for j, i in enumerate(range(-3, 0)):
            kept = getattr(method, f"kept_{j}")
            c_s = s_info.feature_shapes[i][0]
            assert audit[feature_tap(i)] == kept.tolist() and len(kept) == c_s
            conv = producing_conv(teacher.stages[i])
            l1 = conv.weight.abs().flatten(1).sum(1)
            assert torch.equal(kept, l1.topk(c_s).indices.sort().values)
            prev = stem if i % 3 == 0 else taps[feature_tap(i % 3 - 1)]
            pruned = _pruned_stage_output(teacher, i % 3, kept, prev)
            torch.testing.assert_close(pruned, taps[feature_tap(i % 3)][:, kept], rtol=1e-5, atol=1e-5)


def test_the_warmup_loss_is_the_mse_to_the_pruned_layer():
    teacher = _teacher("cnn_m", seed=2)
    student = create_model("cnn_xs", DATA.num_classes, DATA.in_chans, DATA.image_size)
    t_info = model_info(teacher, "cnn_m", DATA.in_chans, DATA.image_size)
    s_info = model_info(student, "cnn_xs", DATA.in_chans, DATA.image_size)
    cls = METHODS.get("indistill")
    cfg = cls.Config()
    method = cls(cfg, teacher=t_info, student=s_info, data=DATA)
    method.bind_teacher_weights(teacher)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t_out = {k: v for k, v in compute_taps(teacher, x, cls.teacher_taps(cfg)).items() if k in cls.teacher_taps(cfg)}
    s_all = compute_taps(student, x, cls.student_taps(cfg))
    s_out = {k: s_all[k] for k in cls.student_taps(cfg)}
    labels = torch.zeros(4, dtype=torch.long)
    targets = Targets(labels, labels, torch.ones(4))
    # 70-epoch protocol, 10 steps per epoch: epoch 4 is layer 1 (feature[-2]), epoch 20 is PKT.
    out = method.loss(TapDict(s_out, "s"), TapDict(t_out, "t"), targets, StepContext(4, 70, 40, 10, 0))
    with torch.no_grad():
        pruned = _pruned_stage_output(teacher, 1, method.kept_1, t_out["feature[-3]"])
    torch.testing.assert_close(out.terms["mse"], F.mse_loss(s_out["feature[-2]"], pruned))
    assert out.terms["pkt"] == 0 and out.metrics["phase"] == 1.0
    out = method.loss(TapDict(s_out, "s"), TapDict(t_out, "t"), targets, StepContext(20, 70, 200, 10, 0))
    assert out.terms["mse"] == 0 and out.terms["pkt"] > 0 and out.metrics["phase"] == 3.0
    assert "ce" not in out.terms  # the official code has no label loss


def test_loss_before_the_teacher_weights_are_bound_is_refused():
    method = _unbound_method()
    with pytest.raises(RuntimeError, match="bind_teacher_weights"):
        method.loss(TapDict({}, "s"), TapDict({}, "t"), None, StepContext(0, 3, 0, 10, 0))


def test_compatibility_reasons():
    cls = METHODS.get("indistill")
    cfg = cls.Config()
    info = {n: model_info(create_model(n, 10, 1, 28), n, 1, 28) for n in ("cnn_xs", "cnn_m", "vit_pico_patch4")}
    assert cls.compatibility(cfg, info["cnn_m"], info["cnn_xs"]) is None
    assert "more than teacher" in cls.compatibility(cfg, info["cnn_xs"], info["cnn_m"])
    assert "CNN stages" in cls.compatibility(cfg, info["cnn_m"], info["vit_pico_patch4"])
    assert "staged CNN teachers" in cls.compatibility(cfg, info["vit_pico_patch4"], info["cnn_xs"])
    assert "pairs 4" in cls.compatibility(cls.make_config({"num_layers": 4}), info["cnn_m"], info["cnn_xs"])


# --- curriculum ------------------------------------------------------------------------------------------


def _phases(num_epochs: int, steps_per_epoch: int = 1, **kw) -> list[int]:
    args = {"num_layers": 3, "a": 2, "reference_epochs": 70} | kw
    return [curriculum_phase(s / steps_per_epoch, num_epochs, **args) for s in range(num_epochs * steps_per_epoch)]


def test_curriculum_is_the_official_schedule_at_70_epochs():
    phases = _phases(70)
    assert phases[:12] == [0] * 3 + [1] * 4 + [2] * 5  # epochs 0-2, 3-6, 7-11
    assert phases[12:] == [3] * 58  # PKT from epoch 12 to the end


def test_curriculum_scales_to_the_protocol_length():
    assert _phases(140)[:24] == [0] * 6 + [1] * 8 + [2] * 10 and set(_phases(140)[24:]) == {3}
    # 3 epochs (the Fashion-MNIST default): the warm-up is the first 12/70 of training, ~0.51 epochs.
    p = _phases(3, steps_per_epoch=100)
    assert p.count(0) == 13 and p.count(1) == 17 and p.count(2) == 22 and p.count(3) == 248
    assert p == sorted(p)  # shallow -> deep, then the embedding, never back
    # 35 epochs: half lengths, 1.5 / 2 / 2.5 epochs.
    assert _phases(35, steps_per_epoch=2)[:12] == [0] * 3 + [1] * 4 + [2] * 5


def test_curriculum_with_absolute_lengths_and_other_depths():
    # reference_epochs = protocol epochs: the official lengths in epochs, whatever the protocol.
    assert _phases(24, reference_epochs=24)[:13] == [0] * 3 + [1] * 4 + [2] * 5 + [3]
    assert _phases(10, num_layers=2, a=0, reference_epochs=10) == [0] + [1] * 2 + [2] * 7
    # A protocol shorter than the warm-up never reaches the embedding phase.
    assert _phases(5, reference_epochs=5) == [0, 0, 0, 1, 1]


def test_method_phase_reads_the_step_context():
    method = _unbound_method()
    assert [method.phase(StepContext(e, 70, e * 7, 7, 0)) for e in (0, 2, 3, 6, 7, 11, 12, 69)] == [
        0, 0, 1, 1, 2, 2, 3, 3]
