"""ScaleKD: the DFM alternative view, the frozen-but-differentiable teacher tail, the stage mapping, the
ablations and the ``live_teacher_tail`` wiring of the distill stage."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from kdbench.meta import DataInfo
from kdbench.methods import METHODS
from kdbench.methods.base import StepContext, Targets
from kdbench.methods.scalekd import (
    ScaleKD,
    dfm_alt_loss,
    dfm_direct_loss,
    remove_spatial_mean,
    stage_indices,
    teacher_tail,
)
from kdbench.models import ModelInfo, create_model, model_info
from kdbench.taps import TapDict, compute_taps

DATA = DataInfo(num_classes=10, in_chans=1, image_size=28, num_train=64, mean=(0.5,), std=(0.5,))


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``X = D x``, ``x = D^T X``)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


@pytest.mark.parametrize("hw", [(4, 4), (7, 5), (1, 3)])
def test_removing_the_spatial_mean_is_zeroing_the_dct_dc_coefficient(hw):
    h, w = hw
    x = torch.randn(3, 5, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dh, dw = dct_matrix(h), dct_matrix(w)
    assert torch.allclose(dh @ dh.T, torch.eye(h, dtype=torch.float64), atol=1e-12)
    coef = dh @ x @ dw.T
    coef[..., 0, 0] = 0
    assert torch.allclose(dh.T @ coef @ dw, remove_spatial_mean(x), atol=1e-12)


def test_dfm_losses_vanish_on_identical_maps_and_alt_ignores_a_per_channel_offset():
    t = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    assert float(dfm_direct_loss(t, t.clone())) == pytest.approx(0.0, abs=1e-12)
    shifted = t + torch.randn(4, 6, 1, 1, dtype=torch.float64)
    assert float(dfm_alt_loss(shifted, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(dfm_direct_loss(shifted, t)) > 0
    # = (1/B) sum_{b,h,w} 2 (1 - cos) over the channel vectors
    s = torch.randn_like(t)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=1)
    assert float(dfm_direct_loss(s, t)) == pytest.approx(float(2 * (1 - cos).sum() / 4), rel=1e-10)


def _info(family: str, n: int) -> ModelInfo:
    return ModelInfo("m", family, 10, 8, tuple((8, 4, 4) for _ in range(n)), 1)


def test_stage_mapping_generalises_the_official_vit_taps_by_depth():
    assert stage_indices(_info("vit", 12)) == [2, 5, 8, 11]
    assert stage_indices(_info("vit", 24)) == [5, 11, 17, 23]
    assert stage_indices(_info("vit", 6)) == [1, 2, 4, 5]
    assert stage_indices(_info("vit", 3)) == [0, 1, 2]
    assert stage_indices(_info("cnn", 3)) == [0, 1, 2]
    cfg = ScaleKD.Config()
    reason = ScaleKD.compatibility(cfg, _info("vit", 12), _info("cnn", 3))
    assert "teacher_stage: -4" in reason
    assert ScaleKD.compatibility(ScaleKD.make_config({"teacher_stage": -4}), _info("vit", 12), _info("cnn", 3)) is None
    assert "student_stage: -4" in ScaleKD.compatibility(cfg, _info("cnn", 3), _info("vit", 12))
    assert "2 feature stages" in ScaleKD.compatibility(cfg, _info("cnn", 1), _info("cnn", 3))
    assert ScaleKD.compatibility(cfg, None, _info("cnn", 3))


@pytest.mark.parametrize("name, tail_len, atol", [("vit_nano_patch4", 1, 0.02), ("cnn_m", 1, 1e-5)])
def test_teacher_tail_reproduces_the_teachers_final_features(name, tail_len, atol):
    """Exact for CNNs; close for ViTs, whose tail runs on the patch tokens without the class token (a
    documented deviation)."""
    torch.manual_seed(0)
    teacher = create_model(name, 10, 1, 28)
    teacher.train()
    info = model_info(teacher, name, 1, 28)
    tail = teacher_tail(teacher)
    assert len(tail._modules) == tail_len
    assert all(not m.training for m in tail.modules()) and all(not p.requires_grad for p in tail.parameters())
    teacher.eval()
    x = torch.randn(2, 1, 28, 28)
    taps = compute_taps(teacher, x, {tail.prev_tap, tail.final_tap})
    with torch.no_grad():
        got = tail(taps[tail.prev_tap])
        want = tail.finalize(taps[tail.final_tap])
    assert got.shape[1:] == info.feature_shapes[-1]
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    teacher.train()  # a later .train() of the teacher does not put the tail in train mode when it runs
    tail(taps[tail.prev_tap])
    assert all(not m.training for m in tail.modules())


def _run(teacher_name: str, student_name: str, params: dict | None = None, steps: int = 3):
    torch.manual_seed(0)
    teacher, student = create_model(teacher_name, 10, 1, 28), create_model(student_name, 10, 1, 28)
    t_info, s_info = model_info(teacher, teacher_name, 1, 28), model_info(student, student_name, 1, 28)
    cls = METHODS.get("scalekd")
    cfg = cls.make_config(params or {})
    method = cls(cfg, teacher=t_info, student=s_info, data=DATA)
    teacher.eval().requires_grad_(False)
    if cls.requirements(cfg).live_teacher_tail:
        method.live_teacher_module(teacher)
    before = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    outs = []
    for step in range(steps):
        x = torch.randn(4, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        with torch.no_grad():
            t_out = compute_taps(teacher, x, cls.teacher_taps(cfg))
        s_out = compute_taps(student, x, cls.student_taps(cfg))
        out = method.loss(
            TapDict({k: s_out[k] for k in cls.student_taps(cfg)}, "s"),
            TapDict({k: t_out[k] for k in cls.teacher_taps(cfg)}, "t"),
            Targets(y, y, torch.ones(4)),
            StepContext(epoch=0, num_epochs=1, step=step, steps_per_epoch=steps, view=0),
        )
        opt.zero_grad()
        out.loss.backward()
        outs.append((out, {n: (p.grad.clone() if p.grad is not None else None) for n, p in method.named_parameters()}))
        opt.step()
    return teacher, before, method, outs


@pytest.mark.parametrize("pair", [("vit_nano_patch4", "cnn_s"), ("cnn_m", "cnn_xs"), ("vit_pico_patch4", "vit_femto_patch7")])
def test_tail_passes_gradients_to_the_student_but_never_changes(pair):
    teacher, before, method, outs = _run(*pair)
    out, grads = outs[0]
    assert {"ce", "kd", "tpp_dir", "tpp_alt", "s4_dir", "s4_alt"} == set(out.terms)
    # Only the TPP terms reach the stage n-1 CAP, through the teacher's tail.
    for name, grad in grads.items():
        if name.startswith("cap3."):
            assert grad is not None, name
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith("cap3.") and g is not None)
    for p in teacher.parameters():
        assert p.grad is None and not p.requires_grad
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the teacher's tail changed"
    assert not any(p is q for p in method.parameters() for q in teacher.parameters())
    assert "_tail" not in dict(method.named_modules()) and not any("tail" in k for k in method.state_dict())
    assert method.tail_forward == 3 * 4 * 2  # steps x batch x views
    assert method.audit()["teacher_tail_forward"] == 24
    assert method.audit()["teacher_tail_params"] == sum(p.numel() for p in method.tail.parameters()) > 0
    assert method.audit()["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    assert all(not m.training for m in method.tail.modules())


@pytest.mark.parametrize("params, terms", [
    ({"tpp": False}, {"ce", "kd", "s3_dir", "s3_alt", "s4_dir", "s4_alt"}),
    ({"alt_view": False}, {"ce", "kd", "tpp_dir", "s4_dir"}),
    ({"tpp": False, "alt_view": False}, {"ce", "kd", "s3_dir", "s4_dir"}),
])
@pytest.mark.parametrize("pair", [("vit_nano_patch4", "cnn_s"), ("cnn_m", "vit_pico_patch4")])
def test_ablations_run_and_declare_their_needs(params, terms, pair):
    cls = METHODS.get("scalekd")
    cfg = cls.make_config(params)
    assert cls.requirements(cfg).live_teacher_tail == cfg.tpp
    assert not cls.requirements(cfg).live_teacher
    assert ("feature[-2]" in cls.teacher_taps(cfg)) == (not cfg.tpp)
    teacher, before, method, outs = _run(*pair, params=params, steps=2)
    out, grads = outs[0]
    assert set(out.terms) == terms and all(torch.isfinite(v) for v in out.terms.values())
    assert all(g is not None for g in grads.values())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distill_hands_the_teacher_over_and_still_reads_the_stores(monkeypatch, tmp_path):
    """``live_teacher_tail``: the method gets the teacher module; its taps still come from the stores."""
    from kdbench import distill

    opened = {}

    class FakeStore:
        @classmethod
        def open(cls, store_dir, identity, verify):
            opened[str(store_dir)] = identity
            return object()

    monkeypatch.setattr(distill, "TeacherStore", FakeStore)
    monkeypatch.setattr(distill, "CachedTeacher", lambda stores: ("cached", sorted(stores)))
    monkeypatch.setattr(distill, "sha256_file", lambda path: "sha")
    torch.manual_seed(0)
    teacher = create_model("vit_nano_patch4", 10, 1, 28)
    t_info = model_info(teacher, "vit_nano_patch4", 1, 28)
    s_info = model_info(create_model("cnn_s", 10, 1, 28), "cnn_s", 1, 28)
    method = ScaleKD(ScaleKD.Config(), teacher=t_info, student=s_info, data=DATA)
    job = SimpleNamespace(
        teacher=teacher, tmeta={"model": "vit_nano_patch4", "image_size": 28}, data=DATA,
        cfg=SimpleNamespace(cache=SimpleNamespace(verify=False)), store_identity=lambda tap: tap, streaming=False,
    )
    stores = {"logits": tmp_path / "logits", "feature[-1]": tmp_path / "feature_5"}
    source, manifests = distill._teacher_source(job, method, "scalekd", None, stores, t_info)
    assert source == ("cached", ["feature[-1]", "logits"])
    assert set(manifests) == {"logits", "feature[-1]"} and len(opened) == 2
    assert method.tail.kind == "vit"
