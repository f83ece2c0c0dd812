"""Taps: the named model outputs a method may read.

* ``logits``: ``[B, num_classes]``;
* ``pre_logits``: ``[B, num_features]``, the pooled features before the classifier;
* ``feature[i]``: the map of feature stage ``i`` (timm's ``forward_intermediates`` / ``feature_info``
  order; negative indices count from the end), ``[B, C, H, W]`` (ViT token grids as NCHW).

A method declares its taps before anything runs; the harness computes (or reads from the cache) exactly
those and hands them over in a :class:`TapDict`, which refuses any other key.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn

_FEATURE = re.compile(r"^feature\[(-?\d+)\]$")
BASIC_TAPS = ("logits", "pre_logits")


class UndeclaredTapError(KeyError):
    """A method read a tap it did not declare."""


def feature_tap(index: int) -> str:
    """The tap name of feature stage ``index``."""
    return f"feature[{index}]"


def parse_tap(tap: str) -> tuple[str, int | None]:
    """``"logits"`` -> ``("logits", None)``; ``"feature[2]"`` -> ``("feature", 2)``; else ``ValueError``."""
    if tap in BASIC_TAPS:
        return tap, None
    m = _FEATURE.match(tap)
    if not m:
        raise ValueError(f"unknown tap {tap!r}; valid: logits, pre_logits, feature[i]")
    return "feature", int(m.group(1))


def is_tap(name: str) -> bool:
    """Whether ``name`` is a tap name (:func:`parse_tap` accepts it)."""
    try:
        parse_tap(name)
    except ValueError:
        return False
    return True


def normalize_tap(tap: str, num_stages: int) -> str:
    """Resolves negative feature indices against a model's number of feature stages."""
    kind, i = parse_tap(tap)
    if kind != "feature":
        return tap
    if not -num_stages <= i < num_stages:
        raise ValueError(f"tap {tap!r} is out of range for a model with {num_stages} feature stages")
    return feature_tap(i % num_stages)


class TapDict(Mapping[str, torch.Tensor]):
    """Read-only tap outputs that refuse undeclared taps.

    Args:
        values: The computed taps.
        owner: Who reads them (for the error message), e.g. ``"method 'kd' (teacher)"``.
    """

    def __init__(self, values: Mapping[str, torch.Tensor], owner: str) -> None:
        self._values = dict(values)
        self._owner = owner

    def __getitem__(self, tap: str) -> torch.Tensor:
        try:
            return self._values[tap]
        except KeyError:
            raise UndeclaredTapError(
                f"{self._owner} read tap {tap!r} but declared only {sorted(self._values)}; "
                "add it to the method's teacher_taps/student_taps"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def compute_taps(model: nn.Module, x: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
    """Runs ``model`` once on ``x`` and returns the requested taps (``logits`` is always computed).

    Args:
        model: A timm model with the feature API.
        x: Inputs ``[B, C, H, W]``.
        taps: Tap names (feature indices already normalised or negative).
    """
    taps = set(taps)
    n_stages = len(model.feature_info)
    wanted = {t: parse_tap(t) for t in taps}
    idx = sorted({i % n_stages for kind, i in wanted.values() if kind == "feature"})
    if idx:
        final, feats = model.forward_intermediates(x, indices=idx)
        by_index = dict(zip(idx, feats))
    else:
        final, by_index = model.forward_features(x), {}
    pre = model.forward_head(final, pre_logits=True)
    out = {"logits": model.get_classifier()(pre)}
    for t, (kind, i) in wanted.items():
        if kind == "pre_logits":
            out[t] = pre
        elif kind == "feature":
            out[t] = by_index[i % n_stages]
    return out


def tap_dirname(tap: str) -> str:
    """Directory name of a (normalised) tap's store: ``feature[2]`` -> ``feature_2``."""
    return tap.replace("[", "_").replace("]", "")


def tap_from_dirname(name: str) -> str:
    """Inverse of :func:`tap_dirname`."""
    if name.startswith("feature_"):
        return f"feature[{name[len('feature_'):]}]"
    return name
