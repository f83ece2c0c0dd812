"""Speed of the streaming path (:mod:`kdbench.data.stream`), each against a reference measured in the same run.

Measure with ``pytest tests/benchmarks/test_bench_stream.py --benchmark-enable``; under the default
``--benchmark-disable`` each case runs once (a smoke test; the summary table is marked SMOKE). Ratios, never
absolute seconds, are what to compare across machines.

* (a) data pipeline throughput on the same generated JPEGs (128-384 px a side, grey and RGB, non-square) with
  the same transform (random-resized crop to 128 x 128, scale 0.35-1, ratio 3/4-4/3, horizontal flip,
  normalisation), batch 64: kdbench's stream (webdataset shards, :meth:`StreamedSplit.train_batches`) against
  ``torchvision.datasets.ImageFolder`` + ``DataLoader(shuffle=True)``, both with 2 workers (wall clock, one
  epoch; target >= 1.0), and both in the main process on CPU time (robust to other load on the machine).
* (b) a KD training step with cached logits on the streaming path (the batch's rows as the stream delivers
  them, outputs served by :class:`ShardedTeacherStore` shard by shard) against the student-alone step on the
  same streamed batches: cnn_xs, 3x32x32, C = 100, batch 128; data loading is identical for both and left out
  (target <= 1.05).
* (c) teacher-output reads on the streaming path: top-10 logits at C = 1000 (rebuilt into full logits),
  N = 50,000 in 10 store shards, one epoch of streamed rows (batches of 256, 2 workers' order), a fresh
  :class:`ShardedTeacherStore` per epoch (its slice reads included), in samples/s (target >= 100k), against the
  same reads from the store loaded whole into memory.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms as T
from _helpers_store import synthetic_store
from _helpers_stream import encoded_images, write_image_folder, write_variable_data
from test_bench_store import _median, _record, _timed, realistic_logits
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from kdbench.cache.store import ShardedTeacherStore, TeacherStore, store_identity
from kdbench.config import CachePolicy, DataConfig, ViewRecipe
from kdbench.data.stream import ShardEntry, StreamedSplit, epoch_rows
from kdbench.meta import DataInfo
from kdbench.methods.base import StepContext, Targets, create_method
from kdbench.models import create_model, model_info
from kdbench.taps import TapDict, compute_taps

CPU = torch.device("cpu")
PIPE_N, PIPE_S, PIPE_BATCH, WORKERS = 768, 128, 64, 2
PIPE_RECIPE = ViewRecipe(count=1, scale=(0.35, 1.0), ratio=(0.75, 1.3333333), flip=True)
MEAN, STD = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def enabled(request) -> bool:
    cfg = request.config
    return bool(cfg.getoption("benchmark_enable")) or not cfg.getoption("benchmark_disable")


# --- (a) data pipeline ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> SimpleNamespace:
    """The same encoded JPEGs as webdataset shards (kdbench's data directory) and as an ImageFolder tree."""
    root = tmp_path_factory.mktemp("bench_stream")
    sizes = (128, 384)
    data_dir = write_variable_data(root / "wds", {"train": PIPE_N}, 192, PIPE_S, 3, sizes=sizes, exts=("jpg",))
    folder = write_image_folder(root / "folder", encoded_images(PIPE_N, 0, sizes, ("jpg",)))
    return SimpleNamespace(data_dir=data_dir, folder=folder)


def _kdbench_epoch(data_dir: Path, workers: int) -> None:
    split = StreamedSplit.open(data_dir, "train", DataConfig(workers=workers, shuffle_buffer=1000))
    n = sum(len(b["rows"]) for b in split.train_batches(PIPE_RECIPE, MEAN, STD, 0, 0, 0, PIPE_S, PIPE_BATCH))
    assert n == PIPE_N


def _torchvision_epoch(folder: Path, workers: int) -> None:
    transform = T.Compose([
        T.RandomResizedCrop(PIPE_S, scale=PIPE_RECIPE.scale, ratio=PIPE_RECIPE.ratio), T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(MEAN, STD),
    ])
    loader = DataLoader(ImageFolder(str(folder), transform=transform), batch_size=PIPE_BATCH, shuffle=True,
                        num_workers=workers)
    n = sum(len(y) for _, y in loader)
    assert n == PIPE_N


def _cpu_seconds(fn, rounds: int) -> float:
    """Median CPU seconds of this process per call (main-process loading: immune to other jobs' load)."""
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def test_a_pipeline_throughput_against_imagefolder(benchmark, jpegs, enabled, bench_table):
    torch.set_num_threads(1)
    rounds = 3 if enabled else 1
    reference = _median(lambda: _torchvision_epoch(jpegs.folder, WORKERS), rounds, enabled)
    seconds = _timed(benchmark, lambda: _kdbench_epoch(jpegs.data_dir, WORKERS), rounds=rounds)
    again = _median(lambda: _torchvision_epoch(jpegs.folder, WORKERS), rounds, enabled)  # before and after
    reference = statistics.median([reference, again])
    ratio = reference / seconds
    _record(bench_table, benchmark, f"(a) stream, {WORKERS} workers", PIPE_N / seconds, "samples/s",
            "ImageFolder+DataLoader", ratio,
            f"throughput ratio (target >= 1.0); JPEG 128-384 px -> {PIPE_S}, wall clock")
    cpu_ref = _cpu_seconds(lambda: _torchvision_epoch(jpegs.folder, 0), rounds)
    cpu = _cpu_seconds(lambda: _kdbench_epoch(jpegs.data_dir, 0), rounds)
    _record(bench_table, None, "(a) stream, main process", PIPE_N / cpu, "samples/CPU-s", "ImageFolder+DataLoader",
            cpu_ref / cpu, "throughput ratio on CPU time, workers 0")
    if enabled:
        assert cpu_ref / cpu >= 1.0, f"stream decodes+renders at {cpu_ref / cpu:.2f}x ImageFolder's CPU throughput"


# --- (b) KD step on the streaming path ------------------------------------------------------------------------

STEP_N, STEP_C, STEP_BATCH, STEP_SHARD = 4096, 100, 128, 1024


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> SimpleNamespace:
    """One epoch of streamed batches of 4096 small variable-size images (2 workers), and a fp16 logits store
    (C = 100) of the same rows, opened shard by shard."""
    root = tmp_path_factory.mktemp("bench_step")
    data_dir = write_variable_data(root / "wds", {"train": STEP_N}, STEP_SHARD, 32, 3, sizes=(24, 48),
                                   num_classes=STEP_C, exts=("jpg",))
    split = StreamedSplit.open(data_dir, "train", DataConfig(workers=WORKERS))
    batches = [(b["rows"].numpy(), b["x"], Targets(b["labels"], b["partner_labels"], b["lam"]))
               for b in split.train_batches(ViewRecipe(count=1), MEAN, STD, 0, 0, 0, 32, STEP_BATCH)]
    policy = CachePolicy()
    synthetic_store(root / "logits", realistic_logits(STEP_N, STEP_C)[None], policy, shard_size=STEP_SHARD)
    identity = store_identity("synthetic", "logits", ViewRecipe(count=1), policy, 28)
    return SimpleNamespace(batches=batches, store_dir=root / "logits", identity=identity)


def _step(streamed, method_name: str, with_store: bool):
    """One training step on the stream's batches in their order (cycling over the epoch); with the store, a
    fresh :class:`ShardedTeacherStore` (6 slices kept, as a 2-worker job keeps) serves the teacher's logits."""
    data = DataInfo(num_classes=STEP_C, in_chans=3, image_size=32, num_train=STEP_N, mean=MEAN, std=STD)
    torch.manual_seed(0)
    student = create_model("cnn_xs", STEP_C, 3, 32).to(memory_format=torch.channels_last).train()
    s_info = model_info(student, "cnn_xs", 3, 32)
    method = create_method(method_name, {}, teacher=s_info if with_store else None, student=s_info, data=data)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.01, momentum=0.9)
    store = None
    if with_store:
        store = ShardedTeacherStore.open(streamed.store_dir, streamed.identity, cache_shards=2 * WORKERS + 2)
    s_taps = method.student_taps(method.cfg)
    ctx = StepContext(0, 1, 0, len(streamed.batches), 0)
    batches = itertools.cycle(streamed.batches)

    def step() -> None:
        rows, x, targets = next(batches)
        t_out = {"logits": store.fetch(0, torch.from_numpy(rows))} if store is not None else {}
        s_out = compute_taps(student, x.contiguous(memory_format=torch.channels_last), s_taps)
        out = method.loss(TapDict(s_out, "student"), TapDict(t_out, "teacher"), targets, ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def test_b_kd_step_on_the_stream(benchmark, streamed, enabled, bench_table):
    """The ratio comes from the two steps timed in turn (the KD step, then the student-alone step, over three
    epochs of batches), so that other load on the machine weighs on both alike."""
    torch.set_num_threads(1)
    steps = {"kd": _step(streamed, "kd", True), "baseline": _step(streamed, "baseline", False)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(3 * len(streamed.batches) if enabled else 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(times["kd"]) / statistics.median(times["baseline"])
    seconds = _timed(benchmark, _step(streamed, "kd", True), rounds=len(streamed.batches))
    _record(bench_table, benchmark, "(b) KD step, streamed rows + sharded store", seconds * 1e3, "ms/step",
            "student-alone step on the stream", ratio,
            "time ratio (target <= 1.05); cnn_xs 3x32x32, C=100 fp16, batch 128")
    if enabled:
        assert ratio <= 1.05, f"KD step {ratio:.3f}x the student-alone step"


# --- (c) store reads on the streaming path ---------------------------------------------------------------------

READ_N, READ_C, READ_SHARD, READ_BATCH = 50_000, 1000, 5_000, 256


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bench_reads")
    policy = CachePolicy(topk=10)
    synthetic_store(root / "logits", realistic_logits(READ_N, READ_C)[None], policy, shard_size=READ_SHARD)
    identity = store_identity("synthetic", "logits", ViewRecipe(count=1), policy, 28)
    entries = tuple(ShardEntry(root / f"train-{i:05d}.tar", READ_SHARD, "", i * READ_SHARD)
                    for i in range(READ_N // READ_SHARD))
    split = StreamedSplit(root, "train", entries, READ_SHARD, 3, True, WORKERS, 1000, verify=False)
    rows = [torch.from_numpy(r) for r in epoch_rows(split, 0, 0, READ_BATCH)]  # the stream's order, no image read
    return SimpleNamespace(store_dir=root / "logits", identity=identity, rows=rows)


def test_c_topk_reads_on_the_stream(benchmark, topk_store, enabled, bench_table):
    def epoch(store) -> None:
        for r in topk_store.rows:
            store.fetch(0, r)

    whole = TeacherStore.open(topk_store.store_dir, topk_store.identity, verify=False)
    reference = _median(lambda: epoch(whole), 3, enabled)
    seconds = _timed(benchmark, lambda: epoch(ShardedTeacherStore.open(topk_store.store_dir, topk_store.identity,
                                                                       verify=False, cache_shards=2 * WORKERS + 2)),
                     rounds=3)
    rate = READ_N / seconds
    _record(bench_table, benchmark, "(c) top-10 reads, C=1000, sharded store", rate, "samples/s",
            "store loaded whole", rate * reference / READ_N,
            f"target >= 100k/s; N={READ_N:,} in {READ_N // READ_SHARD} shards, batch {READ_BATCH}, full logits rebuilt")
    if enabled:
        assert rate >= 100_000, f"top-10 reads on the stream: {rate:,.0f} samples/s < 100k"
