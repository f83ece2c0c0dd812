"""The CIFAR-100 nets of the CRD / RepDistiller tables that are not CIFAR ResNets: VGG, MobileNetV2, the
bottleneck ResNet-50, ShuffleNet V1 and V2, built for 32x32 inputs exactly as RepDistiller builds them
(Tian et al. 2020, github.com/HobbitLong/RepDistiller ``models/``): same layers, strides, widths and biases,
so that parameter counts match. :mod:`kdbench.models` registers them into timm's registry as
``vgg8_cifar``, ``vgg13_cifar``, ``mobilenetv2_cifar``, ``resnet50_cifar``, ``shufflev1_cifar`` and
``shufflev2_cifar``.

Feature stages are RepDistiller's ``feat`` list without its first entry (the stem's output, ``f0``) and its
last (the pooled vector): the maps that its AT, VID and CC losses read (``feat[1:-1]``). Module names differ
from RepDistiller's, so its checkpoints need a key mapping to load.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbench._staged import StagedNet, conv_bn, ignore_kwargs, no_pretrained


def _finish(
    net: StagedNet, stages: list[nn.Module], info: list[dict], num_features: int, num_classes: int,
    neck: nn.Module | None = None,
) -> None:
    """Sets the stages, neck, feature info and head of a freshly built net (modules in forward order)."""
    net.stages = nn.ModuleList(stages)
    if neck is not None:
        net.neck = neck
    net.feature_info = info
    net.num_features = num_features
    net.reset_classifier(num_classes)


def _info(num_chs: int, reduction: int, i: int) -> dict:
    return dict(num_chs=num_chs, reduction=reduction, module=f"stages.{i}")


class CifarVGG(StagedNet):
    """RepDistiller's CIFAR VGG with BatchNorm (``models/vgg.py``, ``vgg8_bn`` / ``vgg13_bn``): five blocks of
    3x3 conv (with bias) - BN - ReLU layers, a 2x2 max-pool between blocks 0-1, 1-2 and 2-3, none between
    blocks 3 and 4, then global average pooling and a linear head on 512 channels.

    The stem is block 0 (``f0``); feature stages are blocks 1-4 (``f1`` … ``f4``): at 32 px, ``128x16x16``,
    ``256x8x8``, ``512x4x4``, ``512x4x4``. RepDistiller adds a fourth max-pool before block 4 only for
    64-px inputs; this net never does.

    Args:
        blocks: Conv widths of each of the five blocks, e.g. ``((64,), (128,), (256,), (512,), (512,))``.
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    def __init__(
        self, blocks: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3, **kwargs
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        cin = in_chans

        def block(widths: Sequence[int]) -> list[nn.Module]:
            nonlocal cin
            layers = []
            for w in widths:
                layers.append(conv_bn(cin, w, bias=True))
                cin = w
            return layers

        self.stem = nn.Sequential(*block(blocks[0]))
        stages, info, reduction = [], [], 1
        for i, widths in enumerate(blocks[1:]):
            pool = [nn.MaxPool2d(2)] if i < 3 else []
            reduction *= 2 if pool else 1
            stages.append(nn.Sequential(*pool, *block(widths)))
            info.append(_info(cin, reduction, i))
        _finish(self, stages, info, cin, num_classes)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block as RepDistiller builds it: 1x1 expansion (kept even at expansion 1), 3x3 depthwise,
    linear 1x1 projection; identity shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, 1, relu=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(StagedNet):
    """RepDistiller's CIFAR MobileNetV2 (``models/mobilenetv2.py``; the tables' "MobileNetV2" is
    ``mobile_half``: expansion 6, width 0.5): a stride-2 3x3 stem, seven groups of inverted residuals, a 1x1
    conv to 1280 channels (the neck), global average pooling and a linear head.

    Feature stages are groups 0-1, 2, 3-4 and 5-6 (``f1`` … ``f4``): at 32 px and width 0.5, ``12x16x16``,
    ``16x8x8``, ``48x4x4``, ``160x2x2``.

    Args:
        expansion: Expansion ratio of every group but the first (which has 1).
        width: Width multiplier (channels are ``int(c * width)``, not rounded to multiples of 8).
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    GROUPS = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
    """``(channels, blocks, stride)`` of each group of inverted residuals at width 1."""
    STAGES = ((0, 1), (2,), (3, 4), (5, 6))
    """The groups of each feature stage."""

    def __init__(
        self, expansion: int = 6, width: float = 0.5, num_classes: int = 100, in_chans: int = 3, **kwargs
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        cin = int(32 * width)
        self.stem = conv_bn(in_chans, cin, 3, 2)
        stages, info, reduction = [], [], 2
        for i, group_ids in enumerate(self.STAGES):
            blocks = []
            for g in group_ids:
                c, n, s = self.GROUPS[g]
                for j in range(n):
                    cout = int(c * width)
                    blocks.append(_InvertedResidual(cin, cout, s if j == 0 else 1, expansion if g else 1))
                    cin = cout
                reduction *= s
            stages.append(nn.Sequential(*blocks))
            info.append(_info(cin, reduction, i))
        last = int(1280 * width) if width > 1.0 else 1280
        _finish(self, stages, info, last, num_classes, neck=conv_bn(cin, last, 1))


class _Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 with the stride, 1x1 to 4x channels) with a projection shortcut when the
    shape changes; ReLU after the sum."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = 4 * planes
        self.branch = nn.Sequential(
            conv_bn(cin, planes, 1), conv_bn(planes, planes, 3, stride), conv_bn(planes, cout, 1, relu=False)
        )
        keep = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if keep else conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class CifarBottleneckResNet(StagedNet):
    """RepDistiller's CIFAR bottleneck ResNet (``models/resnetv2.py``, ``ResNet50``): a stride-1 3x3 stem of
    64 channels (no max-pool), four stages of bottlenecks at strides 1, 2, 2, 2, global average pooling and a
    linear head.

    Feature stages are the four stages (``f1`` … ``f4``): at 32 px and depths (3, 4, 6, 3), ``256x32x32``,
    ``512x16x16``, ``1024x8x8``, ``2048x4x4``.

    Args:
        depths: Bottlenecks per stage.
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    def __init__(
        self, depths: Sequence[int] = (3, 4, 6, 3), num_classes: int = 100, in_chans: int = 3, **kwargs
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        self.stem = conv_bn(in_chans, 64)
        stages, info, cin, reduction = [], [], 64, 1
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                blocks.append(_Bottleneck(cin, planes, stride if j == 0 else 1))
                cin = 4 * planes
            stages.append(nn.Sequential(*blocks))
            info.append(_info(cin, reduction, i))
        _finish(self, stages, info, cin, num_classes)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: ``[B, g * c, H, W]`` viewed as ``[B, g, c, H, W]``, transposed to
    ``[B, c, g, H, W]`` and flattened back."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class _ShuffleV1Unit(nn.Module):
    """ShuffleNet V1 unit as RepDistiller builds it: grouped 1x1 (``first_groups`` groups), channel shuffle,
    3x3 depthwise (with the stride, BN and ReLU), grouped 1x1; at stride 2 the branch is concatenated with a
    3x3 average-pooled input, else added to it; ReLU at the end. The bottleneck is a quarter of the branch's
    output channels."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        branch_out = cout - cin if stride == 2 else cout
        mid = branch_out // 4
        self.first_groups = first_groups
        self.conv1 = conv_bn(cin, mid, 1, groups=first_groups)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = conv_bn(mid, branch_out, 1, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.first_groups)))
        out = torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x
        return F.relu(out)


class CifarShuffleNetV1(StagedNet):
    """RepDistiller's CIFAR ShuffleNet V1 (``models/ShuffleNetv1.py``, ``ShuffleV1``: 3 groups): a 1x1 stem
    of 24 channels (stride 1, no max-pool), three stages of units whose first has stride 2, global average
    pooling and a linear head. The net's very first 1x1 conv is ungrouped.

    Feature stages are the three stages (``f1`` … ``f3``): at 32 px, ``240x16x16``, ``480x8x8``, ``960x4x4``.

    Args:
        widths: Output channels per stage.
        depths: Units per stage.
        groups: Groups of the 1x1 convs.
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    def __init__(
        self,
        widths: Sequence[int] = (240, 480, 960),
        depths: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        **kwargs,
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        self.stem = conv_bn(in_chans, 24, 1)
        stages, info, cin = [], [], 24
        for i, (w, n) in enumerate(zip(widths, depths)):
            units = []
            for j in range(n):
                units.append(_ShuffleV1Unit(cin, w, 2 if j == 0 else 1, groups, 1 if i == j == 0 else groups))
                cin = w
            stages.append(nn.Sequential(*units))
            info.append(_info(w, 2 ** (i + 1), i))
        _finish(self, stages, info, cin, num_classes)


class _ShuffleV2Unit(nn.Module):
    """ShuffleNet V2 basic unit: the first half of the channels passes through, the second goes through 1x1,
    3x3 depthwise (no ReLU), 1x1; the halves are concatenated and shuffled (2 groups)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, relu=False), conv_bn(half, half, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, rest = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(rest)], 1), 2)


class _ShuffleV2Down(nn.Module):
    """ShuffleNet V2 stride-2 unit: two branches on the whole input (3x3 depthwise then 1x1; 1x1, 3x3
    depthwise, 1x1), each to half the output channels, concatenated and shuffled (2 groups)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, relu=False), conv_bn(cin, mid, 1))
        self.right = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid, relu=False), conv_bn(mid, mid, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class CifarShuffleNetV2(StagedNet):
    """RepDistiller's CIFAR ShuffleNet V2 (``models/ShuffleNetv2.py``, ``ShuffleV2``: net size 1): a 1x1 stem
    of 24 channels (stride 1, no max-pool), three stages of one stride-2 unit and basic units, a 1x1 conv
    to 1024 channels (the neck), global average pooling and a linear head.

    Feature stages are the three stages (``f1`` … ``f3``): at 32 px, ``116x16x16``, ``232x8x8``, ``464x4x4``.

    Args:
        widths: Output channels per stage.
        depths: Basic units per stage (after its stride-2 unit).
        neck_width: Channels of the last 1x1 conv.
        num_classes: Classes of the head.
        in_chans: Input channels.
    """

    def __init__(
        self,
        widths: Sequence[int] = (116, 232, 464),
        depths: Sequence[int] = (3, 7, 3),
        neck_width: int = 1024,
        num_classes: int = 100,
        in_chans: int = 3,
        **kwargs,
    ) -> None:
        super().__init__()
        ignore_kwargs(kwargs)
        self.stem = conv_bn(in_chans, 24, 1)
        stages, info, cin = [], [], 24
        for i, (w, n) in enumerate(zip(widths, depths)):
            stages.append(nn.Sequential(_ShuffleV2Down(cin, w), *[_ShuffleV2Unit(w) for _ in range(n)]))
            cin = w
            info.append(_info(w, 2 ** (i + 1), i))
        _finish(self, stages, info, neck_width, num_classes, neck=conv_bn(cin, neck_width, 1))


def _entrypoint(name: str, cls: type[StagedNet], doc: str, **arch) -> Callable[..., StagedNet]:
    def fn(pretrained: bool = False, **kwargs) -> StagedNet:
        no_pretrained(pretrained, name)
        return cls(**arch, **kwargs)

    fn.__name__ = name
    fn.__doc__ = doc
    return fn


ENTRYPOINTS: tuple[Callable[..., StagedNet], ...] = (
    _entrypoint("vgg8_cifar", CifarVGG, "RepDistiller's vgg8 (models/vgg.py cfg 'S', with BN).",
                blocks=((64,), (128,), (256,), (512,), (512,))),
    _entrypoint("vgg13_cifar", CifarVGG, "RepDistiller's vgg13 (models/vgg.py cfg 'B', with BN).",
                blocks=((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))),
    _entrypoint("mobilenetv2_cifar", CifarMobileNetV2,
                "RepDistiller's MobileNetV2 (models/mobilenetv2.py mobile_half: expansion 6, width 0.5).",
                expansion=6, width=0.5),
    _entrypoint("resnet50_cifar", CifarBottleneckResNet, "RepDistiller's ResNet50 (models/resnetv2.py).",
                depths=(3, 4, 6, 3)),
    _entrypoint("shufflev1_cifar", CifarShuffleNetV1,
                "RepDistiller's ShuffleV1 (models/ShuffleNetv1.py, 3 groups)."),
    _entrypoint("shufflev2_cifar", CifarShuffleNetV2,
                "RepDistiller's ShuffleV2 (models/ShuffleNetv2.py, net size 1)."),
)
"""timm entrypoints of this module's nets; :mod:`kdbench.models` registers them."""
