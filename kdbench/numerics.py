"""The protocol's forward numerics: bfloat16 autocast and the channels-last memory format, in one place.

Every model forward that trains or produces teacher outputs runs through a :class:`Numerics`: the training
step and the evaluation of :mod:`kdbench.train.loop` (students and teachers alike), model directories'
predictions, retrieval embeddings, the cache builder, the store's fidelity check and the live teacher.

* ``precision: bf16``: the model's forward runs under ``torch.autocast(device_type=<the inputs' device>,
  dtype=torch.bfloat16)``, on CUDA and on CPU alike (nothing device-specific is named here). The autocast scope
  is the model's forward only: its floating outputs are cast to float32 as they leave it, so a method's loss,
  its adapter modules, the optimiser and the stored teacher outputs all see float32 (the store's own dtype
  policy, ``cache.logits_dtype``, is applied afterwards, as for fp32). The backward pass runs outside the scope,
  as PyTorch recommends (each op's backward uses its forward's dtype).
* ``channels_last``: the model's parameters and its 4-d inputs in ``torch.channels_last`` (the default, as
  kdbench has always run; tensor cores prefer it), else in the contiguous (NCHW) format. The two formats
  dispatch to different kernels, so they agree up to float rounding, not bit for bit: a protocol fixes one.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from kdbench.config import Protocol
from kdbench.taps import compute_taps


@dataclass(frozen=True)
class Numerics:
    """How a protocol's model forwards compute (see the module docstring).

    Attributes:
        precision: ``fp32`` or ``bf16`` (:data:`kdbench.config.PRECISIONS`).
        channels_last: Models and 4-d inputs in ``torch.channels_last``, else contiguous.
    """

    precision: str
    channels_last: bool

    @classmethod
    def of(cls, protocol: Protocol) -> Numerics:
        """The numerics of ``protocol`` (``protocol.precision``, ``protocol.channels_last``)."""
        return cls(protocol.precision, protocol.channels_last)

    def delta(self) -> dict:
        """The fields that differ from the default protocol's numerics (:data:`DEFAULT`); empty for the default.
        Part of a teacher-output store's identity and path only when not empty, so existing stores keep theirs."""
        return {k: v for k, v in vars(self).items() if v != getattr(DEFAULT, k)}

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def model(self, model: nn.Module) -> nn.Module:
        """Puts ``model``'s 4-d parameters and buffers into the memory format (in place); returns ``model``."""
        return model.to(memory_format=self.memory_format)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format when it is a 4-d image batch ``[B, C, H, W]``, else as it is."""
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The autocast context of a forward on ``device_type`` (a no-op for ``fp32``)."""
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def run(self, forward: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        """``forward(x)`` in these numerics: ``x`` in the memory format, the call under autocast, and its floating
        tensor outputs (a tensor, or a dict of them) cast to float32 (a float32 tensor is returned as is, so the
        ``fp32`` path is unchanged bit for bit)."""
        with self.autocast(x.device.type):
            out = forward(self.inputs(x))
        return {k: _fp32(v) for k, v in out.items()} if isinstance(out, dict) else _fp32(out)

    def taps(self, model: nn.Module, x: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
        """:func:`kdbench.taps.compute_taps` of ``model`` on ``x`` in these numerics (float32 outputs)."""
        return self.run(lambda inputs: compute_taps(model, inputs, taps), x)


def _fp32(t: Any) -> Any:
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


#: The numerics of the default protocol (fp32, channels-last): what a forward without a protocol at hand uses.
DEFAULT = Numerics.of(Protocol())
