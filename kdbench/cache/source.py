"""Where a student's teacher outputs come from: the cache (default) or the live teacher module.

Both serve :class:`kdbench.train.loop.TeacherSource`: the outputs of a stored view ``v`` (the student's own
view, or another one for ``teacher_view: other``) or of :data:`~kdbench.data.views.CLEAN_VIEW` (the
un-augmented image, ``teacher_view: clean``; live teacher only, no store holds it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from kdbench.cache.store import ShardedTeacherStore, TeacherStore
from kdbench.data.views import CLEAN_VIEW, ViewRenderer
from kdbench.errors import StoreError
from kdbench.numerics import DEFAULT, Numerics


class CachedTeacher:
    """Teacher outputs read from stores (one per tap; in memory, or read shard by shard on the streaming
    path); the teacher never runs."""

    forward_count = 0

    def __init__(self, stores: dict[str, TeacherStore | ShardedTeacherStore]) -> None:
        self.stores = stores

    def outputs(self, view: int, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        if view == CLEAN_VIEW:
            raise StoreError(
                "the teacher's outputs on the un-augmented images (teacher_view: clean) are not in any store;"
                " a method that declares teacher_view 'clean' must declare Requirements(live_teacher=True)"
            )
        idx = torch.from_numpy(rows)
        return {tap: store.fetch(view % store.views, idx).to(device) for tap, store in self.stores.items()}

    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.stores.values())


class LiveTeacher:
    """The teacher module run on the views it is asked for (frozen, eval mode, no grad).

    Args:
        model: The teacher.
        taps: Taps to compute.
        renderer: The split's view renderer; ``None`` on the streaming path, where the stream renders the
            teacher's inputs with the batch and ``fit`` passes them as ``inputs``.
        image_size: The teacher's input resolution (:attr:`input_size`).
        numerics: The forward numerics of the table's protocol, the cache builder's (:mod:`kdbench.numerics`):
            the live teacher serves what the cache would, float32 outputs under ``bf16`` too.
    """

    def __init__(self, model: nn.Module, taps: frozenset[str], renderer: ViewRenderer | None, image_size: int,
                 numerics: Numerics = DEFAULT) -> None:
        self.model, self.taps, self.renderer, self.image_size = model.eval(), taps, renderer, image_size
        self.numerics = numerics
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.forward_count = 0

    @property
    def input_size(self) -> int:
        """The resolution of the inputs this source runs the teacher on (a stream renders them at it)."""
        return self.image_size

    @torch.no_grad()
    def outputs(
        self, view: int, rows: np.ndarray, device: torch.device, inputs: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The taps on view ``view`` of ``rows``: on ``inputs`` when given (the streamed batch's rendering of
        that view at :attr:`input_size`), else rendered here."""
        if inputs is not None:
            x = inputs.to(device)
        elif self.renderer is None:
            raise ValueError("this live teacher has no renderer (streaming path): pass the batch's inputs")
        else:
            x, _ = self.renderer.render(view, rows, self.image_size, device)
        self.forward_count += len(rows)
        return self.numerics.taps(self.model, x, self.taps)

    def bytes_read(self) -> int:
        return 0
