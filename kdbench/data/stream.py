"""Streaming a split from its webdataset shards: batches of rendered views, never the split in memory.

The in-memory path (:func:`kdbench.data.shards.load_split`) holds a whole split as one ``uint8 [N, C, H, W]``
tensor, which needs fixed-size images and RAM for all of them. The streaming path reads one shard at a time:

* **When.** ``data.stream`` (:class:`~kdbench.config.DataConfig`): ``auto`` streams exactly when the images
  differ in size (the manifest's ``native_size`` is null); ``true`` streams fixed-size data too (the tests and
  benchmarks compare the two paths that way); ``false`` never streams (refused on variable-size data).
* **Training order.** Epoch ``e`` visits the shards in a permutation seeded by ``(seed, e)``; the shards are
  dealt to the ``data.workers`` loader workers in turn (worker ``w`` of ``W`` takes shards ``w, w + W, …`` of
  that permutation); a worker reads its shards one after the other and visits each shard's samples in the
  order of a bounded shuffle buffer (``data.shuffle_buffer`` samples; webdataset's rule) seeded by
  ``(seed, e, shard)``. Each worker cuts its stream into batches of ``protocol.batch_size``, rendered in the
  worker; the main process takes the workers' batches in turn (the ``DataLoader``'s order) and merges the
  workers' last, partial batches, so an epoch has ``ceil(N / batch_size)`` steps, only the last one short, as
  in memory. Everything is a function of ``(seed, epoch, workers, shuffle_buffer)``: two runs give identical
  batches, and any worker count gives every sample exactly once per epoch (the order depends on the worker
  count, which is why ``data.workers`` is part of the data config). ``workers: 0`` reads in the main process
  and gives the order of ``workers: 1``.
* **Memory.** A worker holds its current shard's *encoded* bytes (read, checked and then decoded one image
  at a time, a mixup partner on demand) and the batch it is rendering; RAM does not grow with the dataset.
* **Integrity.** Each shard's sha256 is computed while it is read and compared with the manifest, and its
  sample count too (a tar cut at a member boundary reads as a valid, shorter archive): any difference is a
  :class:`~kdbench.errors.DataShardError` naming the shard and the fix, never a silently short epoch.
* **Views.** Rendered by :class:`~kdbench.data.views.ShardRenderer` with the counter-based parameters of
  :mod:`kdbench.data.views`, from the sample's key and row (``position = first row of its shard + index in
  the shard``; mixup partners come from the same shard); the cache builder renders a streamed shard with the
  same renderer, so the student replays exactly the tensors the teacher's cache was built from.
* **Evaluation** (val, test, the retrieval database) streams a split in its order: batch ``k`` is rendered
  by worker ``k mod W``, and the ``DataLoader`` returns them in order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdbench.config import DataConfig, ViewRecipe
from kdbench.data.codec import ImageDecodeError, decode_image
from kdbench.data.shards import Split, iter_shard_samples, load_split, read_manifest
from kdbench.data.views import CLEAN_VIEW, BoundShardRenderer, ShardRenderer
from kdbench.errors import ConfigError, DatasetError, DataShardError, KdbenchError

_logger = logging.getLogger(__name__)

STREAM_MODES = ("auto", True, False)
"""The values of ``data.stream``."""
_MASK64 = (1 << 64) - 1


def variable_size(manifest: dict) -> bool:
    """Whether a data directory's images differ in size (the manifest's ``native_size`` is null; manifests
    without the key hold fixed-size images)."""
    return "native_size" in manifest and manifest["native_size"] is None


def streams(cfg: DataConfig, manifest: dict, data_dir: str | Path) -> bool:
    """Whether jobs read the data in ``data_dir`` (its manifest: ``manifest``) by streaming (``data.stream``).

    Raises:
        ConfigError: ``data.stream`` is false but the images differ in size.
    """
    if cfg.stream not in STREAM_MODES:
        raise ConfigError(f"key 'data.stream' is {cfg.stream!r}; valid: auto, true, false")
    var = variable_size(manifest)
    if cfg.stream == "auto":
        return var
    if not cfg.stream and var:
        raise ConfigError(
            f"key 'data.stream' is false, but the images in {data_dir} differ in size"
            f" ({Path(data_dir) / 'manifest.json'}: 'native_size' is null) and only the streaming path renders them."
            " Fix: set 'data.stream' to auto or true"
        )
    return bool(cfg.stream)


def open_split(
    data_dir: str | Path, split: str, cfg: DataConfig, shards: list[int] | None = None, verify: bool = True
) -> Split | StreamedSplit:
    """A split as the job reads it: streamed (:class:`StreamedSplit`) when :func:`streams` says so, else loaded
    into memory (:func:`~kdbench.data.shards.load_split`). ``shards`` keeps only those (rows then count from the
    first of them)."""
    manifest = read_manifest(data_dir)
    if streams(cfg, manifest, data_dir):
        return StreamedSplit.open(data_dir, split, cfg, shards, verify, manifest)
    return load_split(data_dir, split, verify=verify, shards=shards)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split as the manifest lists it.

    Attributes:
        path: The tar file.
        count: Samples in it.
        sha256: Its checksum.
        first: Row of its first sample in the (possibly restricted) split.
    """

    path: Path
    count: int
    sha256: str
    first: int


class _HashingReader:
    """A read-only file wrapper that hashes every byte read (the tar reader reads sequentially)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        return data

    def hexdigest_of_rest(self) -> str:
        """Reads the rest of the file (tar padding) and returns the sha256 of the whole."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


class LoadedShard:
    """One data shard's samples held as their encoded bytes; images are decoded on demand
    (:class:`~kdbench.data.views.ShardImages`).

    Attributes:
        entry: The shard.
        first: Row of its first sample.
        ids: ``int64 [n]`` keys, in file order.
        labels: ``int64 [n]``.
    """

    def __init__(self, entry: ShardEntry, ids, labels, exts, payloads, channels: int | None, fix: str) -> None:
        self.entry, self.first = entry, entry.first
        self.ids, self.labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        self._exts, self._payloads, self._channels, self._fix = exts, payloads, channels, fix
        self._hw: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> torch.Tensor:
        """``uint8 [C, h, w]`` of sample ``i``, decoded now."""
        try:
            arr = decode_image(self._payloads[i], self._exts[i], self._channels)
        except ImageDecodeError as e:
            key = f"{int(self.ids[i]):07d}"
            raise DataShardError(f"data shard {self.entry.path}: sample {key}: {e}; {self._fix}") from e
        self._hw[i] = (arr.shape[1], arr.shape[2])
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def hw(self, i: int) -> tuple[int, int]:
        if i not in self._hw:
            self.image(i)
        return self._hw[i]


def read_shard(entry: ShardEntry, channels: int | None, fix: str, verify: bool = True) -> LoadedShard:
    """Reads one shard's encoded samples, checking its sha256 (computed while reading; ``verify``) and its
    sample count against the manifest.

    Raises:
        DatasetError: the file is missing.
        DataShardError: the checksum or the count differs, or the archive is truncated or malformed.
    """
    if not entry.path.exists():
        raise DatasetError(f"data shard missing: {entry.path}; {fix}")
    ids, labels, exts, payloads = [], [], [], []
    with open(entry.path, "rb") as f:
        reader = _HashingReader(f) if verify else f
        for key, ext, payload, label in iter_shard_samples(reader, entry.path, fix):
            ids.append(int(key))
            exts.append(ext)
            payloads.append(payload)
            labels.append(label)
        digest = reader.hexdigest_of_rest() if verify else None
    if verify and digest != entry.sha256:
        raise DataShardError(
            f"data shard {entry.path} does not match its checksum in {entry.path.parent / 'manifest.json'}: the file"
            f" is corrupt, truncated or was changed. {fix}"
        )
    if len(ids) != entry.count:
        raise DataShardError(
            f"data shard {entry.path} holds {len(ids)} samples, the manifest says {entry.count}: the file is"
            f" truncated or was changed. {fix}"
        )
    _logger.debug("read %s: %d samples, %d bytes", entry.path, len(ids), sum(map(len, payloads)))
    return LoadedShard(entry, ids, labels, exts, payloads, channels, fix)


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer`` items (in the manner of webdataset's ``shuffle``)
    emits items ``0 … n-1`` read in order: once full, each new item takes the place of a uniformly drawn one,
    which is emitted; the rest is emitted in random order at the end. ``buffer >= n`` is a uniform
    permutation. Only indices are shuffled: the images stay encoded in the shard until rendered."""
    buffer = max(1, buffer)
    if buffer >= n:
        return rng.permutation(n)
    draws = rng.random(n)
    pool, out = list(range(buffer)), []
    for i in range(buffer, n):
        k = int(draws[i] * buffer)
        out.append(pool[k])
        pool[k] = i
    rest = np.asarray(pool)
    return np.concatenate([np.asarray(out, dtype=np.int64), rest[rng.permutation(len(rest))]])


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k & _MASK64 for k in keys])


def epoch_shards(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order in which epoch ``epoch`` visits the shards."""
    return _rng(seed, epoch, 0x5EED).permutation(num_shards)


def worker_order(counts: list[int], seed: int, epoch: int, worker: int, workers: int,
                 shuffle_buffer: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(shard, sample order in the shard)`` of the shards worker ``worker`` of ``workers`` reads in epoch
    ``epoch`` (``counts``: samples per shard): its share of the seeded shard order, each shard's samples in
    the order of the shuffle buffer seeded by ``(seed, epoch, shard)``."""
    for s in epoch_shards(len(counts), seed, epoch)[worker::workers]:
        yield int(s), buffer_order(counts[s], shuffle_buffer, _rng(seed, epoch, int(s)))


def loader_workers(workers: int, tasks: int) -> int:
    """``DataLoader`` workers used for ``tasks`` units of work (shards, batches): never more than the tasks."""
    return min(workers, tasks)


def epoch_rows(split: StreamedSplit, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
    """The rows of every batch of a training epoch, in the order :meth:`StreamedSplit.train_batches` delivers
    them, computed from the manifest alone (no image is read): for audits, and for benchmarks of what reads in
    step with the stream (the teacher-output store)."""
    counts, firsts = [s.count for s in split.shards], [s.first for s in split.shards]
    workers = max(1, loader_workers(split.workers, len(counts)))
    per_worker = []
    for w in range(workers):
        shards = worker_order(counts, seed, epoch, w, workers, split.shuffle_buffer)
        rows = np.concatenate([firsts[s] + order for s, order in shards] or [np.zeros(0, np.int64)])
        per_worker.append([{"rows": torch.from_numpy(rows[i : i + batch_size])}
                           for i in range(0, len(rows), batch_size)])
    dealt = []
    for k in range(max(map(len, per_worker))):  # the DataLoader's turn order, skipping exhausted workers
        dealt += [batches[k] for batches in per_worker if k < len(batches)]
    return [b["rows"].numpy() for b in _rebatch(dealt, batch_size)]


def seeded_loader(dataset: IterableDataset, workers: int, seed: int) -> DataLoader:
    """The one ``DataLoader`` of kdbench: ``workers`` processes (0: the main process), one item per ``next``, and
    a ``generator`` seeded with ``seed``.

    The loader draws its workers' base seed from that generator instead of the global torch RNG, so (a) worker
    ``w`` seeds ``random``, ``numpy`` and ``torch`` (PyTorch does that in every worker, which is why no
    ``worker_init_fn`` is needed) with a function of ``(seed, w)``, on every device and in every run, and (b)
    creating a loader leaves the main process's RNG (dropout, a method's sampling) as it was. kdbench's streams
    draw no random numbers in a worker (their order and views are counter-based), so this only guards code that
    would.
    """
    generator = torch.Generator().manual_seed(seed & (2**63 - 1))
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                      generator=generator)


def _worker() -> tuple[int, int]:
    """``(worker id, workers)`` of the calling ``DataLoader`` worker; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class StreamedSplit:
    """A split read from its shards as it is used (the streaming counterpart of
    :class:`~kdbench.data.shards.Split`; use :meth:`open`).

    ``labels`` and ``ids`` are read on first use by a scan of the tar headers and label members (no image is
    read); everything else streams.

    Attributes:
        data_dir: The data directory.
        name: ``train``, ``val`` or ``test``.
        shards: The split's shards (restricted ones count rows from the first of them).
        shard_size: Samples per shard.
        channels: Channels the images are decoded to.
        variable: The images differ in size.
        workers: ``DataLoader`` workers (0: the main process).
        shuffle_buffer: Samples in the in-shard shuffle buffer.
        verify: Check every shard's sha256 as it is read.
    """

    def __init__(self, data_dir: Path, name: str, shards: tuple[ShardEntry, ...], shard_size: int, channels: int,
                 variable: bool, workers: int, shuffle_buffer: int, verify: bool) -> None:
        self.data_dir, self.name, self.shards, self.shard_size = data_dir, name, shards, shard_size
        self.channels, self.variable, self.workers, self.shuffle_buffer = channels, variable, workers, shuffle_buffer
        self.verify = verify
        self._scan: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def open(cls, data_dir: str | Path, split: str, cfg: DataConfig, shards: list[int] | None = None,
             verify: bool = True, manifest: dict | None = None) -> StreamedSplit:
        """The split ``split`` of ``data_dir`` (``shards``: only those), read as ``cfg`` says (workers, buffer)."""
        data_dir = Path(data_dir)
        manifest = manifest if manifest is not None else read_manifest(data_dir)
        listed = manifest["splits"][split]["shards"]
        entries, first = [], 0
        for s in listed if shards is None else [listed[i] for i in shards]:
            entries.append(ShardEntry(data_dir / s["file"], int(s["count"]), s["sha256"], first))
            first += int(s["count"])
        return cls(data_dir, split, tuple(entries), int(manifest["shard_size"]), int(manifest["channels"]),
                   variable_size(manifest), cfg.workers, cfg.shuffle_buffer, verify)

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def fix(self) -> str:
        return f"Fix: delete {self.data_dir} and rerun the workflow"

    def read(self, index: int) -> LoadedShard:
        """Shard ``index`` of the split, read and checked (:func:`read_shard`)."""
        return read_shard(self.shards[index], self.channels, self.fix, self.verify)

    def _scan_headers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scan is None:
            ids, labels = [], []
            for entry in self.shards:
                shard_ids, shard_labels = _scan_labels(entry, self.fix)
                ids += shard_ids
                labels += shard_labels
            self._scan = torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)
        return self._scan

    @property
    def labels(self) -> torch.Tensor:
        """``int64 [N]`` labels in split order."""
        return self._scan_headers()[1]

    @property
    def ids(self) -> torch.Tensor:
        """``int64 [N]`` sample keys in split order."""
        return self._scan_headers()[0]

    def renderer(self, recipe: ViewRecipe, mean, std) -> ShardRenderer:
        """The :class:`~kdbench.data.views.ShardRenderer` of this split."""
        return ShardRenderer(recipe, self.shard_size, len(self), mean, std, self.variable)

    def bound_renderer(self, recipe: ViewRecipe, mean, std) -> BoundShardRenderer:
        """The renderer of a one-shard split with :class:`~kdbench.data.views.ViewRenderer`'s interface (rows =
        indices in the shard): what the cache builder renders a streamed shard with."""
        if len(self.shards) != 1:
            raise ValueError(f"a bound renderer renders one shard; the {self.name} split here has {len(self.shards)}"
                             " (open it with shards=[i])")
        return self.renderer(recipe, mean, std).bind(self.read(0))

    def _loader(self, dataset: IterableDataset, count: int, seed: int) -> DataLoader:
        return seeded_loader(dataset, loader_workers(self.workers, count), seed)

    def train_batches(
        self, recipe: ViewRecipe, mean, std, seed: int, epoch: int, view: int, out_size: int, batch_size: int,
        teacher_view: int | None = None, teacher_size: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one training epoch (see the module docstring), on the CPU.

        Args:
            recipe: The view recipe.
            mean, std: Normalisation.
            seed: Seed of the order.
            epoch: The epoch (seeds the order).
            view: The view the student sees.
            out_size: The student's input size.
            batch_size: Samples per batch (the last batch of the epoch may be short).
            teacher_view: Also render this view (or :data:`~kdbench.data.views.CLEAN_VIEW`) for a live teacher.
            teacher_size: The live teacher's input size.

        Yields:
            ``rows`` (``int64 [n]``), ``x`` (``float32 [n, C, S, S]``), ``labels``, ``partner_labels``, ``lam``,
            the view parameters ``box``, ``flip``, ``partner``, and with ``teacher_view`` ``teacher_x``.
        """
        stream = _TrainStream(self, self.renderer(recipe, mean, std), seed, epoch, view, out_size, batch_size,
                              teacher_view, teacher_size)
        loader_seed = int(_rng(seed, epoch, 0x10AD).integers(2**63))  # the workers' seeds, per (seed, epoch)
        yield from _rebatch(_raising(self._loader(stream, len(self.shards), loader_seed)), batch_size)

    def eval_inputs(self, mean, std, out_size: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The split in order, rendered as evaluation renders it (:data:`~kdbench.data.views.CLEAN_VIEW`), in
        batches of ``batch_size``: ``float32 [n, C, S, S]`` on the CPU."""
        stream = _EvalStream(self, self.renderer(ViewRecipe(), mean, std), out_size, batch_size)
        loader = self._loader(stream, math.ceil(len(self) / batch_size), 0)  # evaluation is the same for every seed
        for k, batch in enumerate(_raising(loader)):
            if int(batch["k"]) != k:  # the DataLoader returns its workers' batches in turn: never happens
                raise RuntimeError(f"{self.name}: evaluation batch {int(batch['k'])} arrived as batch {k}")
            yield batch["x"]


def _scan_labels(entry: ShardEntry, fix: str) -> tuple[list[int], list[int]]:
    """Keys and labels of a shard from its headers and ``.cls`` members only (tarfile seeks over the images)."""
    ids, labels = [], []
    try:
        with tarfile.open(entry.path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext == "cls":
                    ids.append(int(key))
                    labels.append(int(tar.extractfile(member).read()))
    except FileNotFoundError:
        raise DatasetError(f"data shard missing: {entry.path}; {fix}") from None
    except (tarfile.TarError, ValueError, OSError) as e:
        raise DataShardError(f"data shard {entry.path} is truncated or malformed ({e}); {fix}") from e
    if len(ids) != entry.count:
        raise DataShardError(f"data shard {entry.path} holds {len(ids)} samples, the manifest says {entry.count}:"
                             f" the file is truncated or was changed. {fix}")
    return ids, labels


def _reporting_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, but a user error (a damaged shard: :class:`~kdbench.errors.KdbenchError`) ends the stream
    as an ``{"error": exception}`` item instead of raising in the worker: :func:`_raising` raises it in the
    main process with its own message (the ``DataLoader`` would wrap it in a worker traceback), and the
    worker ends its iteration normally, so the loader shuts down at once."""
    try:
        yield from batches
    except KdbenchError as e:
        yield {"error": e}


def _raising(batches: Iterable[dict]) -> Iterator[dict]:
    """``batches``, raising the error an item carries (see :func:`_reporting_errors`)."""
    for batch in batches:
        if "error" in batch:
            raise batch["error"]
        yield batch


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _split_rows(batch: dict[str, torch.Tensor], n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return {k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}


def _rebatch(batches: Iterable[dict[str, torch.Tensor]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches as they come; the short ones (each worker's last) merged into full batches, and what is
    left as the last batch."""
    carry: list[dict[str, torch.Tensor]] = []
    held = 0
    for batch in batches:
        n = len(batch["rows"])
        if n == batch_size:
            yield batch
            continue
        carry.append(batch)
        held += n
        if held >= batch_size:
            full, rest = _split_rows(_concat(carry), batch_size)
            yield full
            held -= batch_size
            carry = [rest] if held else []
    if held:
        yield _concat(carry)


class _TrainStream(IterableDataset):
    """One epoch of training batches of a worker's shards (see :meth:`StreamedSplit.train_batches`)."""

    def __init__(self, split: StreamedSplit, renderer: ShardRenderer, seed: int, epoch: int, view: int,
                 out_size: int, batch_size: int, teacher_view: int | None, teacher_size: int | None) -> None:
        self.split, self.renderer, self.seed, self.epoch, self.view = split, renderer, seed, epoch, view
        self.out_size, self.batch_size = out_size, batch_size
        self.teacher_view, self.teacher_size = teacher_view, teacher_size

    def _render(self, shard: LoadedShard, idx: np.ndarray) -> dict[str, torch.Tensor]:
        x, p = self.renderer.render(self.view, shard, idx, self.out_size)
        labels = shard.labels[idx]
        partner_labels = np.where(p.partner >= 0, shard.labels[np.maximum(p.partner - shard.first, 0)], labels)
        out = {
            "rows": torch.from_numpy(shard.first + idx),
            "x": x,
            "labels": torch.from_numpy(labels),
            "partner_labels": torch.from_numpy(partner_labels),
            "lam": torch.from_numpy(p.lam),
            "box": torch.from_numpy(p.box),
            "flip": torch.from_numpy(p.flip),
            "partner": torch.from_numpy(p.partner),
        }
        if self.teacher_view is not None:
            same = self.teacher_view == self.view and self.teacher_size == self.out_size
            out["teacher_x"] = x if same else self.renderer.render(self.teacher_view, shard, idx, self.teacher_size)[0]
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield from _reporting_errors(self._batches())

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        counts = [s.count for s in self.split.shards]
        parts: list[dict[str, torch.Tensor]] = []
        held = 0
        for s, samples in worker_order(counts, self.seed, self.epoch, worker, workers, self.split.shuffle_buffer):
            shard = self.split.read(s)
            start = 0
            while start < len(samples):
                take = samples[start : start + self.batch_size - held]
                start += len(take)
                parts.append(self._render(shard, take))
                held += len(take)
                if held == self.batch_size:
                    yield _concat(parts)
                    parts, held = [], 0
            del shard  # its bytes go before the next shard's are read
        if parts:
            yield _concat(parts)


class _EvalStream(IterableDataset):
    """A split's evaluation batches in order; batch ``k`` is rendered by worker ``k mod W``."""

    def __init__(self, split: StreamedSplit, renderer: ShardRenderer, out_size: int, batch_size: int) -> None:
        self.split, self.renderer, self.out_size, self.batch_size = split, renderer, out_size, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield from _reporting_errors(self._batches())

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        n, firsts = len(self.split), np.array([s.first for s in self.split.shards])
        current: LoadedShard | None = None
        for k in range(worker, math.ceil(n / self.batch_size), workers):
            rows = np.arange(k * self.batch_size, min(n, (k + 1) * self.batch_size))
            owner = np.searchsorted(firsts, rows, side="right") - 1
            parts = []
            for s in np.unique(owner):
                if current is None or current.entry is not self.split.shards[s]:
                    current = None  # drop the previous shard before reading the next
                    current = self.split.read(int(s))
                idx = rows[owner == s] - current.first
                parts.append(self.renderer.render(CLEAN_VIEW, current, idx, self.out_size)[0])
            yield {"k": torch.tensor(k), "x": torch.cat(parts) if len(parts) > 1 else parts[0]}
