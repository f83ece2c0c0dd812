"""The contract of a source of encoded image files (``imagefolder``, ``webdataset``): too big for memory.

A fixed-size source (:class:`kdbench.data.sources.Source`) loads its whole dataset into one array. An encoded
source instead lists its samples cheaply and yields them one at a time as the original encoded bytes
(:class:`EncodedSample`), which the shard writer copies into kdbench's shards unchanged. Its two source splits
are ``train`` (our train and val splits are drawn from it) and ``test``; a sample's key is its index in its
source split's own stable order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from kdbench.config import DataConfig
from kdbench.data.codec import ENCODED_EXTS


@dataclass(frozen=True)
class EncodedSample:
    """One sample of an encoded source.

    Attributes:
        key: The sample's index in its source split.
        label: Its class index.
        ext: The image member's extension, normalised (:func:`member_ext`).
        payload: The file's own bytes.
        origin: Where it came from, for messages: a file path, or ``<shard>: sample <key>``.
    """

    key: int
    label: int
    ext: str
    payload: bytes
    origin: str


@dataclass(frozen=True)
class EncodedSource:
    """A registered source of encoded images.

    Attributes:
        sizes: ``sizes(cfg) -> (n_train, n_test)``, the sample counts of the two source splits; cheap (lists
            files or reads tar headers, never decodes), called when the workflow is planned.
        classes: ``classes(cfg)``: the class names, index = label; cheap.
        samples: ``samples(cfg, split, keys)`` yields the samples of source split ``train`` or ``test`` with
            these keys (ascending), in that order.
        fix: How to install or point to the data, for messages.
        uses_root: Whether the source reads ``data.root`` (the ``webdataset`` source reads its shard patterns).
    """

    sizes: Callable[[DataConfig], tuple[int, int]]
    classes: Callable[[DataConfig], tuple[str, ...]]
    samples: Callable[[DataConfig, str, np.ndarray], Iterator[EncodedSample]]
    fix: str
    uses_root: bool = True


def member_ext(ext: str) -> str | None:
    """The shard member extension of an image file's extension or a tar member's suffix (without the dot): lower
    case, ``jpeg`` -> ``jpg``; ``None`` when it is not an image extension kdbench reads (``ENCODED_EXTS``)."""
    ext = ext.lower()
    if ext not in ENCODED_EXTS:
        return None
    return "jpg" if ext == "jpeg" else ext


def sample_key(key: int) -> str:
    """A sample's key as shards spell it: its index, zero-padded to 7 digits (``__key__`` of the tar members)."""
    return f"{int(key):07d}"
