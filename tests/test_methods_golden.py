"""Golden values of every pure loss function of the method zoo, plus independent closed-form checks per
method.

The golden values (``tests/golden/method_losses.json``) are computed in float64 on fixed seeded inputs and
compared with a relative tolerance of 1e-5. They change only on purpose: run

    KDBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_methods_golden.py

which rewrites the file and fails to say so; review the diff and commit it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.meta import DataInfo
from kdbench.methods import METHODS
from kdbench.methods.at import at_loss, attention_map
from kdbench.methods.base import StepContext, Targets
from kdbench.methods.crd import contrast_scores, nce_loss
from kdbench.methods.dist import dist_loss, inter_class_relation, intra_class_relation, pearson_correlation
from kdbench.methods.dkd import decoupled_kd_terms, dkd_loss, dkd_warmup
from kdbench.methods.fitnet import hint_loss, resize_to
from kdbench.methods.indistill import layer_mse, match_spatial
from kdbench.methods.kd import kd_loss
from kdbench.methods.pkt import cosine_kernel_probs, pkt_loss
from kdbench.methods.rkd import pairwise_distances, rkd_angle_loss, rkd_distance_loss, triplet_angles
from kdbench.methods.scalekd import (
    CrossAttentionProjector,
    dfm_alt_loss,
    dfm_direct_loss,
    remove_spatial_mean,
)
from kdbench.models import ModelInfo
from kdbench.taps import TapDict

GOLDEN = Path(__file__).parent / "golden" / "method_losses.json"
UPDATE = os.environ.get("KDBENCH_UPDATE_GOLDEN") == "1"
RTOL = 1e-5

B, C = 8, 10


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded float64 normal tensor (numpy's generator: stable across torch versions)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)) * scale


LOGITS_S = _randn(B, C, seed=1, scale=2.0)
LOGITS_T = _randn(B, C, seed=2, scale=3.0)
LABELS = torch.from_numpy(np.random.default_rng(3).integers(0, C, B)).long()
FEAT_S = _randn(B, 16, seed=4)
FEAT_T = _randn(B, 24, seed=5)
MAP_S = _randn(B, 6, 8, 8, seed=6)
MAP_T = _randn(B, 12, 4, 4, seed=7)
ANCHOR = F.normalize(_randn(B, 16, seed=8), dim=1)
MEMORY = F.normalize(_randn(40, 16, seed=9), dim=1)
_POS = np.arange(B) * 5
ROWS = torch.from_numpy(  # [B, 6]: the positive, then 5 negatives that never repeat it (as CRD samples them)
    np.concatenate(
        [_POS[:, None], (_POS[:, None] + 1 + np.random.default_rng(10).integers(0, 39, (B, 5))) % 40], 1
    )
).long()


def _probs(x: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return (x / tau).softmax(dim=1)


CASES: dict[str, Callable[[], torch.Tensor]] = {
    "kd.kd_loss": lambda: kd_loss(LOGITS_S, LOGITS_T, 4.0),
    "dkd.decoupled_kd_terms.tckd": lambda: decoupled_kd_terms(LOGITS_S, LOGITS_T, LABELS, 4.0)[0],
    "dkd.decoupled_kd_terms.nckd": lambda: decoupled_kd_terms(LOGITS_S, LOGITS_T, LABELS, 4.0)[1],
    "dkd.dkd_loss": lambda: dkd_loss(LOGITS_S, LOGITS_T, LABELS, 1.0, 8.0, 4.0),
    "dist.pearson_correlation": lambda: pearson_correlation(LOGITS_S, LOGITS_T),
    "dist.inter_class_relation": lambda: inter_class_relation(_probs(LOGITS_S), _probs(LOGITS_T)),
    "dist.intra_class_relation": lambda: intra_class_relation(_probs(LOGITS_S), _probs(LOGITS_T)),
    "dist.dist_loss": lambda: dist_loss(LOGITS_S, LOGITS_T, 1.0, 1.0, 1.0),
    "dist.dist_loss.tau4_beta2_gamma2": lambda: dist_loss(LOGITS_S, LOGITS_T, 2.0, 2.0, 4.0),
    "fitnet.resize_to.down": lambda: resize_to(MAP_S, (4, 4))[0, 0].flatten(),
    "fitnet.resize_to.up": lambda: resize_to(MAP_T, (8, 8))[0, 0, :2].flatten(),
    "fitnet.hint_loss": lambda: hint_loss(MAP_T, _randn(B, 12, 4, 4, seed=11)),
    "at.attention_map": lambda: attention_map(MAP_T, 2.0)[0],
    "at.at_loss": lambda: at_loss(MAP_S, MAP_T, 2.0),
    "at.at_loss.p1": lambda: at_loss(MAP_S, MAP_T, 1.0),
    "pkt.cosine_kernel_probs": lambda: cosine_kernel_probs(FEAT_S)[0],
    "pkt.pkt_loss": lambda: pkt_loss(FEAT_S, FEAT_T),
    "rkd.pairwise_distances": lambda: pairwise_distances(FEAT_S)[0],
    "rkd.triplet_angles": lambda: triplet_angles(FEAT_S[:3]),
    "rkd.rkd_distance_loss": lambda: rkd_distance_loss(FEAT_S, FEAT_T),
    "rkd.rkd_angle_loss": lambda: rkd_angle_loss(FEAT_S, FEAT_T),
    "crd.contrast_scores": lambda: contrast_scores(ANCHOR, MEMORY, ROWS, 0.07)[0],
    "crd.nce_loss": lambda: nce_loss(contrast_scores(ANCHOR, MEMORY, ROWS, 0.07) / 2000.0, 40),
    "funmatch.loss": lambda: _funmatch().loss,
    "funmatch.loss.tau10": lambda: _funmatch(tau=10.0).loss,
    "indistill.match_spatial": lambda: match_spatial(MAP_S, MAP_T)[0][0, 0].flatten(),
    "indistill.layer_mse": lambda: layer_mse(MAP_S, MAP_T, torch.tensor([0, 3, 4, 7, 10, 11])),
    "indistill.layer_mse.same_size": lambda: layer_mse(
        MAP_T[:, :5], _randn(B, 12, 4, 4, seed=11), torch.tensor([1, 2, 6, 8, 9])
    ),
    "scalekd.remove_spatial_mean": lambda: remove_spatial_mean(MAP_T)[0, 0].flatten(),
    "scalekd.dfm_direct_loss": lambda: dfm_direct_loss(MAP_T, _randn(B, 12, 4, 4, seed=11)),
    "scalekd.dfm_alt_loss": lambda: dfm_alt_loss(MAP_T, _randn(B, 12, 4, 4, seed=11)),
    "scalekd.cap_shapes": lambda: _cap_shapes(),
}


def _cap_shapes() -> torch.Tensor:
    """Output shapes of ScaleKD's CAP: learned 4x4 queries on an 8x8 student map (6 -> 12 channels), then
    supplied 2x3 queries, as a float64 vector (no weights involved)."""
    torch.manual_seed(0)
    cap = CrossAttentionProjector(6, (8, 8), 12, (4, 4), head_dim=4).double()
    learned = cap(MAP_S)
    supplied = cap(MAP_S, _randn(B, 6, 12, seed=12))
    return torch.tensor([*learned.shape, *supplied.shape, cap.num_heads], dtype=torch.float64)


def _value(name: str) -> list[float]:
    with torch.no_grad():
        return [float(v) for v in CASES[name]().detach().flatten()]


@pytest.fixture(scope="module")
def golden() -> dict[str, list[float]]:
    if UPDATE or not GOLDEN.exists():
        return {}
    return json.loads(GOLDEN.read_text())


def test_golden_file_is_current(golden):
    if UPDATE:
        values = {name: _value(name) for name in sorted(CASES)}
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
        pytest.fail(
            f"KDBENCH_UPDATE_GOLDEN=1: rewrote {GOLDEN} ({len(values)} cases); review the diff, commit, rerun"
        )
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with KDBENCH_UPDATE_GOLDEN=1"
    missing, stale = sorted(set(CASES) - set(golden)), sorted(set(golden) - set(CASES))
    assert not missing and not stale, (
        f"{GOLDEN} is out of date (missing {missing}, stale {stale}); refresh with KDBENCH_UPDATE_GOLDEN=1"
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_value(name, golden):
    if UPDATE:
        pytest.skip("refreshing the golden file")
    if name not in golden:
        pytest.fail(f"no golden value for {name!r} in {GOLDEN}; refresh with KDBENCH_UPDATE_GOLDEN=1")
    got, want = _value(name), golden[name]
    assert len(got) == len(want), f"{name}: {len(got)} values, golden has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert math.isclose(g, w, rel_tol=RTOL, abs_tol=1e-12), f"{name}[{i}]: {g!r} != golden {w!r}"


def test_golden_inputs_are_float64():
    assert all(CASES[n]().dtype == torch.float64 for n in CASES)


# --- closed-form checks ----------------------------------------------------------------------------------

DATA = DataInfo(num_classes=C, in_chans=1, image_size=28, num_train=40, mean=(0.5,), std=(0.5,))


def _info(name: str, family: str, num_features: int, shapes) -> ModelInfo:
    return ModelInfo(name, family, C, num_features, tuple(shapes), 1)


def _ctx(
    step: int = 0, epoch: int = 0, num_epochs: int = 2, index: torch.Tensor | None = None
) -> StepContext:
    return StepContext(epoch=epoch, num_epochs=num_epochs, step=step, steps_per_epoch=4, view=0, index=index)


def _targets(labels: torch.Tensor) -> Targets:
    return Targets(labels, labels, torch.ones(len(labels)))


def close(a, b, tol=1e-10) -> bool:
    return bool(
        torch.allclose(
            torch.as_tensor(a, dtype=torch.float64),
            torch.as_tensor(b, dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )
    )


# KD / TAKD


def test_kd_of_identical_logits_is_zero():
    assert close(kd_loss(LOGITS_T, LOGITS_T, 4.0), 0.0)


def test_takd_is_kd_with_an_assistant():
    takd, kd = METHODS.get("takd"), METHODS.get("kd")
    assert takd.assistant(takd.Config()) == "cnn_s"
    assert takd.declarations(takd.make_config({"assistant": "resnet20"}))["assistant"] == "resnet20"
    info = _info("m", "cnn", 4, [(4, 2, 2)])
    a = takd(takd.Config(), teacher=info, student=info, data=DATA)
    b = kd(kd.Config(), teacher=info, student=info, data=DATA)
    assert (takd.Config().tau, takd.Config().ce_weight, takd.Config().kd_weight) == (
        kd.Config().tau,
        kd.Config().ce_weight,
        kd.Config().kd_weight,
    )
    s, t = TapDict({"logits": LOGITS_S}, "s"), TapDict({"logits": LOGITS_T}, "t")
    assert torch.equal(
        a.loss(s, t, _targets(LABELS), _ctx()).loss, b.loss(s, t, _targets(LABELS), _ctx()).loss
    )


def test_takd_rejects_an_unknown_assistant():
    with pytest.raises(ValueError, match="takd.*assistant"):
        METHODS.get("takd").make_config({"assistant": "no_such_model_xyz"})


# FunMatch


def _funmatch(student=LOGITS_S, teacher=LOGITS_T, labels=LABELS, **params):
    """FunMatch's whole :class:`LossOutput` on given logits (labels only reach the ``ce`` metric)."""
    cls = METHODS.get("funmatch")
    info = _info("m", "cnn", 4, [(4, 2, 2)])
    m = cls(cls.make_config(params), teacher=info, student=info, data=DATA)
    return m.loss(TapDict({"logits": student}, "s"), TapDict({"logits": teacher}, "t"), _targets(labels), _ctx())


def test_funmatch_of_identical_logits_is_zero():
    for tau in (1.0, 10.0):
        assert close(_funmatch(teacher=LOGITS_S.clone(), tau=tau).loss, 0.0)


def test_funmatch_is_tau_squared_kl_with_no_label_term():
    tau = 2.0
    log_pt, log_ps = F.log_softmax(LOGITS_T / tau, 1), F.log_softmax(LOGITS_S / tau, 1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()
    out = _funmatch(tau=tau)
    assert list(out.terms) == ["kd"] and close(out.loss, tau**2 * kl)
    other = _funmatch(labels=(LABELS + 1) % C, tau=tau)
    assert torch.equal(other.loss, out.loss)  # the labels are not used ...
    assert out.metrics["ce"] != other.metrics["ce"]  # ... but their cross-entropy is reported
    assert math.isclose(out.metrics["ce"], float(F.cross_entropy(LOGITS_S, LABELS)), rel_tol=1e-9)


def test_funmatch_tau_squared_keeps_the_loss_finite_as_tau_grows():
    """tau^2 * KL -> sum_c (d_c - mean_c d)^2 / (2C), d = t - s, as tau -> infinity: without the tau^2
    factor the loss (and its gradient) would vanish like 1 / tau^2."""
    d = LOGITS_T - LOGITS_S
    limit = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).mean() / (2 * C)
    assert close(_funmatch(tau=1000.0).loss, limit, tol=5e-3)


def test_funmatch_variants_declare_their_teacher_view():
    fm = METHODS.get("funmatch")
    assert fm.declarations(fm.Config())["teacher_view"] == "same"
    assert fm.Config().tau == 1.0  # big_vision's ImageNet distillation config
    assert fm.requirements(fm.make_config({"teacher_view": "other"})).live_teacher is False
    assert fm.requirements(fm.make_config({"teacher_view": "clean"})).live_teacher is True
    assert all(fm.requirements(fm.make_config({"teacher_view": v})).full_logits for v in ("same", "other", "clean"))
    with pytest.raises(ValueError, match="teacher_view.*same, other, clean"):
        fm.make_config({"teacher_view": "centre"})


# DKD


def test_dkd_decomposes_kd_exactly_per_sample():
    """The paper's Eq. 1: KD = TCKD + (1 - p_t) * NCKD per sample, p_t the teacher's target probability."""
    tau = 4.0
    tckd, nckd = decoupled_kd_terms(LOGITS_S, LOGITS_T, LABELS, tau)
    kd_per_sample = (
        F.kl_div(
            F.log_softmax(LOGITS_S / tau, 1),
            F.log_softmax(LOGITS_T / tau, 1),
            reduction="none",
            log_target=True,
        ).sum(1)
        * tau**2
    )
    p_t = _probs(LOGITS_T, tau).gather(1, LABELS[:, None]).squeeze(1)
    assert close(kd_per_sample, tckd + (1 - p_t) * nckd)


def test_dkd_with_alpha_1_and_beta_1_minus_pt_is_kd():
    """With the same teacher target probability on every sample, alpha = 1, beta = 1 - p_t make DKD = KD."""
    rng = np.random.default_rng(12)
    base = np.sort(rng.standard_normal(C))[::-1] * 3.0  # base[0] is the labelled class's logit
    teacher = torch.empty(B, C, dtype=torch.float64)
    for i, y in enumerate(LABELS.tolist()):
        others = [c for c in range(C) if c != y]
        teacher[i, y] = base[0]
        teacher[i, others] = torch.from_numpy(rng.permutation(base[1:]).copy())
    tau = 4.0
    p_t = _probs(teacher, tau).gather(1, LABELS[:, None]).squeeze(1)
    assert close(p_t, p_t[0].expand(B))
    assert close(
        dkd_loss(LOGITS_S, teacher, LABELS, 1.0, float(1 - p_t[0]), tau), kd_loss(LOGITS_S, teacher, tau)
    )


def test_dkd_of_identical_logits_is_zero():
    tckd, nckd = decoupled_kd_terms(LOGITS_T, LOGITS_T, LABELS, 4.0)
    assert close(tckd, torch.zeros(B)) and close(nckd, torch.zeros(B))


def test_dkd_warmup_follows_mdistiller_on_240_epochs_and_scales_to_shorter_protocols():
    assert dkd_warmup(0, 240, 20, 240) == 1 / 20  # mdistiller's epoch 1
    assert dkd_warmup(9, 240, 20, 240) == 0.5
    assert dkd_warmup(19, 240, 20, 240) == 1.0
    assert dkd_warmup(0, 24, 20, 240) == 0.5  # same 1/12 of training
    assert dkd_warmup(1, 24, 20, 240) == 1.0
    assert dkd_warmup(0, 10, 20, 240) == 1.0  # shorter than one epoch: no warm-up
    assert dkd_warmup(0, 10, 0, 240) == 1.0


def test_dkd_method_is_mixup_aware_and_warms_up():
    dkd = METHODS.get("dkd")
    info = _info("m", "cnn", 4, [(4, 2, 2)])
    m = dkd(dkd.Config(), teacher=info, student=info, data=DATA)
    s, t = TapDict({"logits": LOGITS_S}, "s"), TapDict({"logits": LOGITS_T}, "t")
    partner = (LABELS + 3) % C
    lam = torch.linspace(0.2, 1.0, B, dtype=torch.float64)
    out = m.loss(s, t, Targets(LABELS, partner, lam), _ctx(epoch=0, num_epochs=24))
    tckd_a, nckd_a = decoupled_kd_terms(LOGITS_S, LOGITS_T, LABELS, 4.0)
    tckd_b, nckd_b = decoupled_kd_terms(LOGITS_S, LOGITS_T, partner, 4.0)
    assert out.metrics["warmup"] == 0.5
    assert close(out.terms["tckd"], 0.5 * (lam * tckd_a + (1 - lam) * tckd_b).mean())
    assert close(out.terms["nckd"], 0.5 * 8.0 * (lam * nckd_a + (1 - lam) * nckd_b).mean())


# DIST


def test_dist_of_identical_logits_is_zero():
    assert close(dist_loss(LOGITS_T, LOGITS_T, 1.0, 1.0, 1.0, eps=0.0), 0.0)


def test_dist_relations_are_invariant_to_positive_affine_maps():
    y_s, y_t = _probs(LOGITS_S), _probs(LOGITS_T)
    for rel in (inter_class_relation, intra_class_relation):
        assert close(rel(3.0 * y_s - 0.7, y_t, eps=0.0), rel(y_s, y_t, eps=0.0))
        assert close(rel(y_s, 0.5 * y_t + 2.0, eps=0.0), rel(y_s, y_t, eps=0.0))


def test_dist_is_invariant_to_shifting_each_samples_logits():
    shift = _randn(B, 1, seed=13, scale=5.0)
    assert close(
        dist_loss(LOGITS_S + shift, LOGITS_T, 1.0, 1.0, 4.0), dist_loss(LOGITS_S, LOGITS_T, 1.0, 1.0, 4.0)
    )


def test_dist_of_anticorrelated_predictions_is_two():
    y = _probs(LOGITS_T)
    assert close(inter_class_relation(-y, y, eps=0.0), 2.0)
    assert close(intra_class_relation(1 - y, y, eps=0.0), 2.0)


# FitNet


def test_hint_loss_of_identical_maps_is_zero():
    assert close(hint_loss(MAP_T, MAP_T.clone()), 0.0)


def test_resize_to_pools_down_and_interpolates_up():
    assert resize_to(MAP_S, (8, 8)) is MAP_S
    assert close(resize_to(MAP_S, (4, 4)), F.adaptive_avg_pool2d(MAP_S, (4, 4)))
    assert resize_to(MAP_T, (8, 8)).shape == (B, 12, 8, 8)
    assert close(resize_to(torch.ones(1, 1, 2, 2, dtype=torch.float64), (5, 7)), torch.ones(1, 1, 5, 7))


def _identity_fitnet():
    fitnet = METHODS.get("fitnet")
    shapes = [(6, 16, 16), (6, 8, 8), (6, 4, 4)]
    m = fitnet(
        fitnet.make_config({"regressor_act": "none"}),
        teacher=_info("t", "cnn", 6, shapes),
        student=_info("s", "cnn", 6, shapes),
        data=DATA,
    ).double()
    conv, bn = m.regressor[0], m.regressor[1]
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(6):
            conv.weight[c, c, 1, 1] = 1.0
    bn.eps = 0.0  # running stats (0, 1) and affine (1, 0): the identity in eval mode
    return m.eval()


def test_fitnet_with_an_identity_regressor_and_identical_maps_is_zero():
    m = _identity_fitnet()
    f = MAP_S[:, :6]
    out = m.loss(
        TapDict({"logits": LOGITS_S, "feature[-2]": f}, "s"),
        TapDict({"feature[-2]": f.clone()}, "t"),
        _targets(LABELS),
        _ctx(),
    )
    assert close(out.terms["hint"], 0.0)
    # ... and so is it when the cache pooled the teacher's map: the regressed student map is pooled to match.
    pooled = F.adaptive_avg_pool2d(f, (4, 4))
    out = m.loss(
        TapDict({"logits": LOGITS_S, "feature[-2]": f}, "s"),
        TapDict({"feature[-2]": pooled}, "t"),
        _targets(LABELS),
        _ctx(),
    )
    assert close(out.terms["hint"], 0.0)


def test_fitnet_regressor_activation_follows_the_teacher_family():
    fitnet = METHODS.get("fitnet")
    shapes = [(4, 8, 8), (8, 4, 4), (8, 2, 2)]
    cnn = fitnet(
        fitnet.Config(), teacher=_info("t", "cnn", 8, shapes), student=_info("s", "vit", 8, shapes), data=DATA
    )
    vit = fitnet(
        fitnet.Config(), teacher=_info("t", "vit", 8, shapes), student=_info("s", "cnn", 8, shapes), data=DATA
    )
    assert (cnn.regressor_act, vit.regressor_act) == ("relu", "none")
    assert fitnet.compatibility(
        fitnet.Config(), _info("t", "cnn", 8, shapes[:1]), _info("s", "cnn", 8, shapes)
    )


# AT


def test_attention_maps_have_unit_norm():
    assert close(attention_map(MAP_T, 2.0).norm(dim=1), torch.ones(B))


def test_at_of_identical_maps_is_zero_and_ignores_scale_and_channel_order():
    assert close(at_loss(MAP_T, MAP_T.clone(), 2.0), 0.0)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert close(at_loss(MAP_T, 7.0 * MAP_T[:, perm], 2.0), 0.0)
    # Sizes are matched at run time: a teacher map pooled by the cache compares with the pooled student.
    assert close(at_loss(MAP_S, F.adaptive_avg_pool2d(MAP_S, (4, 4)), 2.0), 0.0)


def test_at_needs_enough_stages():
    at = METHODS.get("at")
    two = _info("m", "cnn", 4, [(4, 4, 4), (4, 2, 2)])
    assert isinstance(at.compatibility(at.Config(), two, two), str)
    assert at.compatibility(at.make_config({"num_stages": 2}), two, two) is None


# PKT


def test_pkt_of_identical_features_is_zero():
    assert close(pkt_loss(FEAT_S, FEAT_S.clone()), 0.0)
    assert bool(pkt_loss(FEAT_S, FEAT_T) > 0)


def test_pkt_ignores_positive_per_sample_scaling():
    scale = torch.from_numpy(np.random.default_rng(14).uniform(0.5, 4.0, (B, 1)))
    assert close(pkt_loss(FEAT_S * scale, FEAT_T), pkt_loss(FEAT_S, FEAT_T), tol=1e-6)
    assert close(cosine_kernel_probs(FEAT_S).sum(1), torch.ones(B))


# RKD


def test_rkd_of_identical_embeddings_is_zero():
    assert close(rkd_distance_loss(FEAT_S, FEAT_S.clone()), 0.0)
    assert close(rkd_angle_loss(FEAT_S, FEAT_S.clone()), 0.0)


def test_rkd_is_invariant_to_scaling_and_the_angle_loss_to_translation():
    d = rkd_distance_loss(FEAT_S, FEAT_T)
    assert close(rkd_distance_loss(5.0 * FEAT_S, 0.1 * FEAT_T), d)
    assert close(rkd_distance_loss(3.0 * FEAT_S, 3.0 * FEAT_T), d)
    a = rkd_angle_loss(FEAT_S, FEAT_T)
    assert close(rkd_angle_loss(2.5 * FEAT_S + 1.0, FEAT_T), a)


def test_pairwise_distances_match_cdist():
    assert close(pairwise_distances(FEAT_S), torch.cdist(FEAT_S, FEAT_S), tol=1e-6)
    assert bool((pairwise_distances(FEAT_S).diagonal() == 0).all())


# CRD


def test_contrast_scores_are_exp_of_dot_products_on_both_paths():
    want = torch.exp(torch.einsum("bkd,bd->bk", MEMORY[ROWS], ANCHOR) / 0.07)
    assert close(contrast_scores(ANCHOR, MEMORY, ROWS, 0.07), want)  # dense path (N <= (K + 1) * D)
    big = F.normalize(_randn(200, 2, seed=15), dim=1)
    rows = ROWS[:, :2] * 5
    want = torch.exp(torch.einsum("bkd,bd->bk", big[rows], ANCHOR[:, :2]) / 0.5)
    assert close(contrast_scores(ANCHOR[:, :2], big, rows, 0.5), want)  # gathered rows (N > (K + 1) * D)


def test_nce_loss_at_the_noise_level_is_k_plus_1_log_2():
    """With every score equal to the noise mass K / N, each of the K + 1 terms is log 2 (D = 1/2)."""
    k, n = 5, 40
    probs = torch.full((B, k + 1), k / n, dtype=torch.float64)
    assert close(nce_loss(probs, n, eps=0.0), (k + 1) * math.log(2.0))


def test_crd_loss_is_finite_and_lower_when_the_anchor_is_its_positive():
    z = float(contrast_scores(ANCHOR, MEMORY, ROWS, 0.07).mean()) * 40
    random_anchor = nce_loss(contrast_scores(ANCHOR, MEMORY, ROWS, 0.07) / z, 40)
    matched_anchor = nce_loss(contrast_scores(MEMORY[ROWS[:, 0]], MEMORY, ROWS, 0.07) / z, 40)
    assert math.isfinite(float(random_anchor)) and math.isfinite(float(matched_anchor))
    assert float(matched_anchor) < float(random_anchor)


def _crd(seed: int = 0, **params):
    crd = METHODS.get("crd")
    torch.manual_seed(seed)
    return crd(
        crd.make_config(params),
        teacher=_info("t", "cnn", 24, [(24, 2, 2)]),
        student=_info("s", "cnn", 16, [(16, 2, 2)]),
        data=DATA,
    )


def test_crd_negatives_are_deterministic_and_exclude_the_positive():
    m = _crd()
    index = torch.arange(0, 40, 5)
    rows = m.sample_rows(index, step=3)
    assert rows.shape == (8, 40) and m.num_negatives == 39  # nce_k clipped to num_train - 1
    assert torch.equal(rows[:, 0], index)
    assert not (rows[:, 1:] == index[:, None]).any()
    assert torch.equal(rows, m.sample_rows(index, step=3))
    assert not torch.equal(rows, m.sample_rows(index, step=4))
    assert torch.equal(rows, _crd().sample_rows(index, step=3))  # same run seed, same negatives
    assert not torch.equal(rows, _crd(seed=1).sample_rows(index, step=3))


def test_crd_memory_is_a_buffer_updated_towards_the_embeddings():
    m = _crd(nce_k=7)
    assert {n for n, _ in m.named_buffers()} >= {"memory_s", "memory_t", "z"}
    assert m.extra_parameters() == (16 * 128 + 128) + (24 * 128 + 128)
    index = torch.tensor([1, 5, 9, 30])
    before_s, other = m.memory_s[index].clone(), m.memory_s[0].clone()
    f_s, f_t = torch.randn(4, 16), torch.randn(4, 24)
    out = m.loss(
        TapDict({"logits": torch.randn(4, C), "pre_logits": f_s}, "s"),
        TapDict({"pre_logits": f_t}, "t"),
        _targets(torch.tensor([0, 1, 2, 3])),
        _ctx(index=index),
    )
    assert torch.isfinite(out.loss) and bool((m.z > 0).all())
    v_s = F.normalize(m.embed_s(f_s), dim=1).detach()
    assert close(m.memory_s[index], F.normalize(0.5 * before_s + 0.5 * v_s, dim=1), tol=1e-6)
    assert close(m.memory_s[index].norm(dim=1), torch.ones(4), tol=1e-6)
    assert torch.equal(m.memory_s[0], other)


def test_crd_needs_the_sample_index():
    m = _crd(nce_k=7)
    with pytest.raises(ValueError, match="sample_index"):
        m.loss(
            TapDict({"logits": torch.randn(4, C), "pre_logits": torch.randn(4, 16)}, "s"),
            TapDict({"pre_logits": torch.randn(4, 24)}, "t"),
            _targets(torch.tensor([0, 1, 2, 3])),
            _ctx(),
        )
