"""Private machinery shared by kdbench's conv nets (:mod:`kdbench.models`, :mod:`kdbench.cifar_nets`).

* :class:`StagedNet`: a stem, feature stages and an optional neck, with timm's feature-extraction API;
* :func:`conv_bn`: the conv-BN(-ReLU) unit every one of these nets is built from;
* :func:`ignore_kwargs`, :func:`no_pretrained`: what every kdbench entrypoint does with timm's arguments.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class StagedNet(nn.Module):
    """A stem followed by stages (and an optional neck); provides timm's feature-extraction API.

    Subclasses set ``self.stem`` and ``self.stages`` (each stage one ``nn.Module``), ``self.num_features``
    and ``self.feature_info`` (one dict per stage: ``num_chs``, ``reduction``, ``module``), and may set
    ``self.neck``: a module run after the last stage and before the pooling (e.g. MobileNetV2's 1x1 conv to
    1280 channels), whose output is the final map of :meth:`forward_intermediates` but no feature stage.
    """

    num_classes: int
    num_features: int
    stem: nn.Module
    stages: nn.ModuleList
    head: nn.Linear

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        neck = self._modules.get("neck")
        return x if neck is None else neck(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._neck(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-feature API.

        Args:
            x: Images ``[B, C, H, W]``.
            indices: Stage indices to return (negative counts from the end), or the last ``n`` if an int.
            norm, output_fmt: Accepted for timm compatibility (maps are always NCHW, never normed).
            stop_early: Stop after the last requested stage.
            intermediates_only: Return only the list of intermediates.

        Returns:
            ``(final_features [B, C, h, w], [stage maps])`` or only the list; the final map is the neck's.
        """
        n = len(self.stages)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        out: list[torch.Tensor] = []
        x = self.stem(x)
        last = max(take) if (stop_early or intermediates_only) and take else n - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                out.append(x)
        if intermediates_only:
            return out
        for stage in self.stages[last + 1 :]:
            x = stage(x)
        return self._neck(x), out


def conv_bn(
    cin: int,
    cout: int,
    kernel_size: int = 3,
    stride: int = 1,
    *,
    groups: int = 1,
    bias: bool = False,
    relu: bool = True,
) -> nn.Sequential:
    """A ``kernel_size`` conv ("same" padding), BatchNorm and, if ``relu``, a ReLU: ``[B, cin, H, W]`` ->
    ``[B, cout, H / stride, W / stride]``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def ignore_kwargs(kwargs: dict) -> None:
    """Drops what timm passes to every entrypoint; raises ``TypeError`` on anything else.

    ``img_size`` is accepted by every kdbench model (ViTs use it; conv nets ignore it).
    """
    kwargs.pop("img_size", None)
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        kwargs.pop(k, None)
    if kwargs:
        raise TypeError(f"unexpected model arguments: {sorted(kwargs)}")


def no_pretrained(pretrained: bool, name: str) -> None:
    """Refuses ``pretrained=True``: kdbench's models have no hub weights."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; give a local checkpoint file instead")
