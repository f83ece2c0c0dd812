"""``cnn_micro``: a conv net half as wide as kdbench's ``cnn_xs``, a student of a plugin's own.

Registered in timm's registry by the ``kdbench.models`` entry point (so it needs no ``@register_model``), it is
then a model name like any other: ``students: [cnn_micro]``.
"""

from __future__ import annotations

from kdbench.models import ConvNet


def cnn_micro(pretrained: bool = False, **kwargs) -> ConvNet:
    """VGG-style conv net, widths (4, 8, 16), one conv per stage."""
    if pretrained:
        raise ValueError("cnn_micro has no pretrained weights")
    return ConvNet(kwargs.pop("widths", (4, 8, 16)), (1, 1, 1), **kwargs)
