"""The CIFAR-100 models of the CRD / RepDistiller tables: the same nets as RepDistiller's (parameter counts
measured from its ``models/`` at ``num_classes=100``), with timm's feature API and kdbench's model contract."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn as nn

from kdbench.models import REPDISTILLER_NAMES, create_model, model_info

# kdbench name: (RepDistiller name, exact parameters of RepDistiller's net at 100 classes, rounded "M" figure of
# the tables). The exact counts were measured by building RepDistiller's own models (HobbitLong/RepDistiller,
# commit b84f547); vgg8's 3,965,028 rounds to 3.97M (3.96M where the figure is truncated).
GOLDEN = {
    "resnet20": ("resnet20", 278_324, 0.28),
    "resnet32": ("resnet32", 472_756, 0.47),
    "resnet56": ("resnet56", 861_620, 0.86),
    "resnet110": ("resnet110", 1_736_564, 1.74),
    "resnet8x4": ("resnet8x4", 1_233_540, 1.23),
    "resnet32x4": ("resnet32x4", 7_433_860, 7.43),
    "wrn_16_2": ("wrn_16_2", 703_284, 0.70),
    "wrn_40_1": ("wrn_40_1", 569_780, 0.57),
    "wrn_40_2": ("wrn_40_2", 2_255_156, 2.26),
    "vgg8_cifar": ("vgg8", 3_965_028, 3.97),
    "vgg13_cifar": ("vgg13", 9_462_180, 9.46),
    "mobilenetv2_cifar": ("MobileNetV2", 812_836, 0.81),
    "resnet50_cifar": ("ResNet50", 23_705_252, 23.71),
    "shufflev1_cifar": ("ShuffleV1", 949_258, 0.95),
    "shufflev2_cifar": ("ShuffleV2", 1_355_528, 1.36),
}
NAMES = list(GOLDEN)
NEW = ["vgg8_cifar", "vgg13_cifar", "mobilenetv2_cifar", "resnet50_cifar", "shufflev1_cifar", "shufflev2_cifar"]

# ``feature[i]`` shapes at 32 px (RepDistiller's feat[1:-1], but WRNs' last stage ends in the final BN-ReLU),
# and the width of ``pre_logits``.
_RESNET = ((16, 32, 32), (32, 16, 16), (64, 8, 8))
_RESNET_X4 = ((64, 32, 32), (128, 16, 16), (256, 8, 8))
_WRN2 = ((32, 32, 32), (64, 16, 16), (128, 8, 8))
_VGG = ((128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4))
FEATURES = {
    "resnet20": (_RESNET, 64),
    "resnet32": (_RESNET, 64),
    "resnet56": (_RESNET, 64),
    "resnet110": (_RESNET, 64),
    "resnet8x4": (_RESNET_X4, 256),
    "resnet32x4": (_RESNET_X4, 256),
    "wrn_16_2": (_WRN2, 128),
    "wrn_40_1": (_RESNET, 64),
    "wrn_40_2": (_WRN2, 128),
    "vgg8_cifar": (_VGG, 512),
    "vgg13_cifar": (_VGG, 512),
    "mobilenetv2_cifar": (((12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)), 1280),
    "resnet50_cifar": (((256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)), 2048),
    "shufflev1_cifar": (((240, 16, 16), (480, 8, 8), (960, 4, 4)), 960),
    "shufflev2_cifar": (((116, 16, 16), (232, 8, 8), (464, 4, 4)), 1024),
}


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, 100, 3, 32).eval()


def test_the_mapping_covers_the_tables_and_names_kdbench_models():
    assert {rd for rd, _, _ in GOLDEN.values()} <= set(REPDISTILLER_NAMES)
    assert all(REPDISTILLER_NAMES[rd] == name for name, (rd, _, _) in GOLDEN.items())
    assert all(timm.is_model(name) for name in REPDISTILLER_NAMES.values())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_repdistillers(name):
    _, exact, rounded = GOLDEN[name]
    n = sum(p.numel() for p in _model(name).parameters())
    assert n == exact
    assert round(n / 1e6, 2) == pytest.approx(rounded)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_model_info(name):
    model = _model(name)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    info = model_info(model, name, 3, 32)
    shapes, width = FEATURES[name]
    assert info.family == "cnn" and info.num_classes == 100
    assert info.feature_shapes == shapes and info.num_features == width
    assert info.num_params == GOLDEN[name][1]
    assert [(f["num_chs"], 32 // f["reduction"]) for f in model.feature_info] == [(c, h) for c, h, _ in shapes]


@pytest.mark.parametrize("name", NAMES)
def test_timm_feature_api(name):
    model = _model(name)
    x = torch.randn(2, 3, 32, 32)
    n = len(model.feature_info)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
        assert [tuple(f.shape[1:]) for f in feats] == list(FEATURES[name][0])
        last = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], feats[-1])
        first_two = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        assert [t.shape for t in first_two] == [f.shape for f in feats[n - 2:]]
        assert model.forward_head(final, pre_logits=True).shape == (2, FEATURES[name][1])
        assert torch.allclose(model.forward_head(final), model(x))


@pytest.mark.parametrize("name", NEW)
def test_new_models_take_timm_arguments(name):
    model = timm.create_model(name, num_classes=10, in_chans=1, img_size=32)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(TypeError, match="unexpected model arguments"):
        timm.create_model(name, drop_rate=0.1)
