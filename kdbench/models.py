"""Models: a thin layer over ``timm.create_model``.

kdbench registers its own small models into timm's registry, so ``timm.create_model("resnet8x4")`` works
once :mod:`kdbench.models` is imported:

* ``cnn_xs`` … ``cnn_l``: VGG-style conv nets sized for 28-32 px inputs (the Fashion-MNIST default);
* ``resnet8`` … ``resnet110``, ``resnet8x4``, ``resnet32x4``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``: the
  CIFAR models of the CRD / RepDistiller protocol (He et al. 2016 CIFAR variants, Zagoruyko & Komodakis 2016);
* ``vgg8_cifar``, ``vgg13_cifar``, ``mobilenetv2_cifar``, ``resnet50_cifar``, ``shufflev1_cifar``,
  ``shufflev2_cifar``: the protocol's other CIFAR models (:mod:`kdbench.cifar_nets`);
* ``vit_femto_patch7``, ``vit_pico_patch4``, ``vit_pico_patch7``, ``vit_nano_patch4``, ``vit_nano_patch7``:
  tiny timm Vision Transformers for small images.

The CRD / RepDistiller tables' model names (:data:`REPDISTILLER_NAMES`), with parameters at 100 classes:

==============  =====================  ======
RepDistiller    kdbench (timm)         params
==============  =====================  ======
resnet20        resnet20               0.28M
resnet32        resnet32               0.47M
resnet56        resnet56               0.86M
resnet110       resnet110              1.74M
resnet8x4       resnet8x4              1.23M
resnet32x4      resnet32x4             7.43M
wrn_16_2        wrn_16_2               0.70M
wrn_40_1        wrn_40_1               0.57M
wrn_40_2        wrn_40_2               2.26M
vgg8            vgg8_cifar             3.97M
vgg13           vgg13_cifar            9.46M
MobileNetV2     mobilenetv2_cifar      0.81M
ResNet50        resnet50_cifar         23.71M
ShuffleV1       shufflev1_cifar        0.95M
ShuffleV2       shufflev2_cifar        1.36M
==============  =====================  ======

(timm's own ``vgg13``, ``resnet50`` and ``mobilenetv2_*`` are the ImageNet nets, hence the ``_cifar`` names.)

Every kdbench model implements timm's feature API (``feature_info``, ``forward_features``,
``forward_head(pre_logits=...)``, ``forward_intermediates``), which is what the taps of
:mod:`kdbench.taps` use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from kdbench import cifar_nets
from kdbench._staged import StagedNet, conv_bn, ignore_kwargs, no_pretrained
from kdbench._util import did_you_mean
from kdbench.plugins import load_models

_logger = logging.getLogger(__name__)


class ConvNet(StagedNet):
    """A VGG-style net: stage ``i`` is ``depths[i]`` conv-BN-ReLU layers of ``widths[i]`` channels, then a 2x2
    max-pool (none after the last stage); global average pooling and a linear head.

    Args:
        widths: Channels per stage.
        depths: Conv layers per stage.
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    def __init__(
        self, widths: Sequence[int], depths: Sequence[int], num_classes: int = 10, in_chans: int = 1, **kwargs
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        self.stem = nn.Identity()
        stages, cin, reduction, info = [], in_chans, 1, []
        for i, (w, d) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            reduction *= 2 if i > 0 else 1
            for _ in range(d):
                layers.append(conv_bn(cin, w))
                cin = w
            stages.append(nn.Sequential(*layers))
            info.append(dict(num_chs=w, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.feature_info = info
        self.num_features = cin
        self.reset_classifier(num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """Wide-ResNet block (BN-ReLU-conv), as in Zagoruyko & Komodakis 2016."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class CifarResNet(StagedNet):
    """The CIFAR ResNets of He et al. 2016 / RepDistiller (3x3 stem, three stages at strides 1, 2, 2).

    Args:
        depth: Total depth (6n + 2), e.g. 20 for resnet20.
        widths: Stem width then the three stage widths, e.g. ``(16, 16, 32, 64)``.
        wide: Use pre-activation Wide-ResNet blocks (depth 6n + 4 convention of WRN is mapped by the caller).
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    def __init__(
        self,
        depth: int,
        widths: Sequence[int],
        wide: bool = False,
        num_classes: int = 100,
        in_chans: int = 3,
        **kwargs,
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        n = (depth - 4) // 6 if wide else (depth - 2) // 6
        block = _PreActBlock if wide else _BasicBlock
        self.stem = (
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
            if wide
            else nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        )
        stages, cin, info, reduction = [], widths[0], [], 1
        for i, w in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [block(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            if wide and i == len(widths) - 2:
                blocks.append(nn.Sequential(nn.BatchNorm2d(w), nn.ReLU()))
            stages.append(nn.Sequential(*blocks))
            info.append(dict(num_chs=w, reduction=reduction, module=f"stages.{i}"))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.feature_info = info
        self.num_features = cin
        self.reset_classifier(num_classes)


_CONVNETS = {
    "cnn_xs": ((8, 16, 32), (1, 1, 1)),
    "cnn_s": ((16, 32, 64), (1, 1, 1)),
    "cnn_m": ((32, 64, 128), (1, 2, 1)),
    "cnn_l": ((64, 128, 256), (2, 2, 2)),
}
_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
_WRNS = {"wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}

REPDISTILLER_NAMES = {
    **{n: n for n in (*_RESNETS, *_WRNS)},
    "vgg8": "vgg8_cifar",
    "vgg13": "vgg13_cifar",
    "MobileNetV2": "mobilenetv2_cifar",
    "ResNet50": "resnet50_cifar",
    "ShuffleV1": "shufflev1_cifar",
    "ShuffleV2": "shufflev2_cifar",
}
"""RepDistiller's ``model_dict`` names (``models/__init__.py``) -> kdbench's timm names of the same nets."""

STAGED_CNNS = frozenset(_CONVNETS) | frozenset(_RESNETS) | frozenset(_WRNS)
"""kdbench's own conv nets (``ConvNet``, ``CifarResNet``): each feature stage ends in a conv whose output
channels reach the stage's output one for one (per-channel BN / ReLU / residual sum)."""


def _register_all() -> None:
    def convnet(name: str, widths, depths):
        def fn(pretrained: bool = False, **kwargs) -> ConvNet:
            no_pretrained(pretrained, name)
            return ConvNet(kwargs.pop("widths", widths), depths, **kwargs)

        fn.__name__ = name
        fn.__doc__ = f"VGG-style conv net, widths {widths}, depths {depths}."
        return fn

    def resnet(name: str, depth: int, widths):
        def fn(pretrained: bool = False, **kwargs) -> CifarResNet:
            no_pretrained(pretrained, name)
            return CifarResNet(depth, kwargs.pop("widths", widths), **kwargs)

        fn.__name__ = name
        fn.__doc__ = f"CIFAR ResNet of depth {depth}, widths {widths} (RepDistiller's {name})."
        return fn

    def wrn(name: str, depth: int, k: int):
        def fn(pretrained: bool = False, **kwargs) -> CifarResNet:
            no_pretrained(pretrained, name)
            return CifarResNet(depth, kwargs.pop("widths", (16, 16 * k, 32 * k, 64 * k)), wide=True, **kwargs)

        fn.__name__ = name
        fn.__doc__ = f"Wide ResNet {depth}-{k} (Zagoruyko & Komodakis 2016)."
        return fn

    def vit(name: str, dim: int, depth: int, heads: int, patch: int = 4):
        def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
            no_pretrained(pretrained, name)
            for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(k, None)
            kwargs.setdefault("img_size", 28)
            return VisionTransformer(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=2.0, **kwargs)

        fn.__name__ = name
        fn.__doc__ = f"Tiny ViT, patch {patch}, width {dim}, depth {depth}, {heads} heads."
        return fn

    fns = [convnet(n, *a) for n, a in _CONVNETS.items()]
    fns += [resnet(n, *a) for n, a in _RESNETS.items()]
    fns += [wrn(n, *a) for n, a in _WRNS.items()]
    fns += cifar_nets.ENTRYPOINTS
    fns += [vit("vit_pico_patch4", 64, 4, 4), vit("vit_pico_patch7", 64, 4, 4, patch=7),
            vit("vit_femto_patch7", 48, 3, 3, patch=7), vit("vit_nano_patch4", 96, 6, 4),
            vit("vit_nano_patch7", 96, 6, 4, patch=7)]
    for fn in fns:
        if not timm.is_model(fn.__name__):
            fn.__module__ = __name__
            register_model(fn)


_register_all()


PRUNED_SEP = ":w"
"""Separates a staged CNN's name from its channel widths in a pruned model's name (``cnn_m:w13-26-51``)."""


def staged_widths(name: str) -> tuple[int, ...]:
    """The widths a staged CNN (:data:`STAGED_CNNS`) is built with: its stages' (``cnn_*``) or its stem's then
    stages' (CIFAR ResNets) channels; a pruned name's own widths."""
    base, widths = split_pruned_name(name)
    if widths is not None:
        return widths
    if base in _CONVNETS:
        return tuple(_CONVNETS[base][0])
    if base in _RESNETS:
        return tuple(_RESNETS[base][1])
    if base in _WRNS:
        k = _WRNS[base][1]
        return (16, 16 * k, 32 * k, 64 * k)
    raise ValueError(f"{name!r} is not one of kdbench's staged CNNs ({', '.join(sorted(STAGED_CNNS))})")


def pruned_name(base: str, widths: Sequence[int]) -> str:
    """The name of ``base`` (a staged CNN) built with other channel widths: what a pruned model is called."""
    staged_widths(base)
    return f"{base}{PRUNED_SEP}{'-'.join(str(int(w)) for w in widths)}"


def split_pruned_name(name: str) -> tuple[str, tuple[int, ...] | None]:
    """``(base name, widths)`` of a pruned model's name; ``(name, None)`` for any other name."""
    if PRUNED_SEP not in name:
        return name, None
    base, _, text = name.partition(PRUNED_SEP)
    try:
        widths = tuple(int(w) for w in text.split("-"))
    except ValueError:
        raise ValueError(f"model {name!r}: widths after {PRUNED_SEP!r} must be integers joined by '-'") from None
    if base not in STAGED_CNNS or len(widths) != len(staged_widths(base)) or min(widths) < 1:
        raise ValueError(f"model {name!r}: a pruned name is a staged CNN and {len(staged_widths(base)) if base in STAGED_CNNS else 'its'}"
                         " positive widths")
    return base, widths


def check_model_name(name: str) -> str | None:
    """Returns ``None`` if timm knows ``name`` (or it is a valid pruned name), else a reason with close matches."""
    load_models()  # plugins' models (kdbench.models entry points) first
    try:
        name, _ = split_pruned_name(name)
    except ValueError as e:
        return str(e)
    if timm.is_model(name):
        return None
    hint = did_you_mean(name, timm.list_models())  # kdbench's own models are in timm's registry too
    if not hint:  # nothing close: the models that share its family name (resnet, vit, ...), if any
        family = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; models named like it: {', '.join(family)}" if family else ""
    return f"unknown timm model {name!r}{hint}"


def create_model(name: str, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Creates a timm model for a dataset (never pretrained: there is no model hub here).

    Args:
        name: A timm model name, or a pruned staged CNN's name (:func:`pruned_name`).
        num_classes: Classes of the head.
        in_chans: Input channels.
        img_size: Input resolution, passed to models that take it (ViTs).
    """
    load_models()  # plugins' models (kdbench.models entry points) first
    name, widths = split_pruned_name(name)
    if widths is not None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, widths=widths)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


@dataclass(frozen=True)
class ModelInfo:
    """Metadata a method builds its adapters from (no weights).

    Attributes:
        name: timm model name.
        family: ``cnn`` or ``vit`` (a ViT's feature maps are token grids).
        num_classes: Classes.
        num_features: Width of ``pre_logits``.
        feature_shapes: ``(C, H, W)`` of every ``feature[i]`` tap at the protocol's resolution.
        num_params: Parameter count.
    """

    name: str
    family: str
    num_classes: int
    num_features: int
    feature_shapes: tuple[tuple[int, int, int], ...]
    num_params: int

    def to_dict(self) -> dict:
        return dict(
            name=self.name,
            family=self.family,
            num_classes=self.num_classes,
            num_features=self.num_features,
            feature_shapes=[list(s) for s in self.feature_shapes],
            num_params=self.num_params,
        )


@torch.no_grad()
def model_info(model: nn.Module, name: str, in_chans: int, img_size: int) -> ModelInfo:
    """Reads :class:`ModelInfo` from a model with one dry forward pass on zeros (in eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    final, feats = model.forward_intermediates(x)
    pre = model.forward_head(final, pre_logits=True)
    model.train(was_training)
    return ModelInfo(
        name=name,
        family="vit" if isinstance(model, VisionTransformer) else "cnn",
        num_classes=model.num_classes,
        num_features=int(pre.shape[-1]),
        feature_shapes=tuple(tuple(int(d) for d in f.shape[1:]) for f in feats),
        num_params=sum(p.numel() for p in model.parameters()),
    )
