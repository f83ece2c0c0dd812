"""Speed and size of the teacher-output store, each against a reference measured in the same run.

Measure with ``pytest tests/benchmarks --benchmark-enable``. Under the project's default
``--benchmark-disable`` every benchmark calls its function once after one warm-up call (a smoke test of a few
seconds in all); the summary table is then marked SMOKE and its numbers are single calls.

* (a) a KD training step that reads cached teacher logits from a :class:`TeacherStore`, against the
  student-alone step (``baseline``): cnn_xs, 1x28x28, batch 128. A step is the body of
  :func:`kdbench.train.loop.fit`: render the batch's views, teacher outputs, student forward, loss, backward,
  SGD step.
* (b) the same KD step with the cnn_m teacher online (:class:`LiveTeacher`), against the same reference.
* (c) cache-build throughput (:func:`kdbench.cache.build.encode_view`: render + teacher forward + encode) against
  the teacher's pure eval forward on the same, pre-rendered batches.
* (d) batched store reads (:meth:`TeacherStore.fetch`, 256 random rows, sorted as ``fit`` sorts them) in
  samples/s, against the online teacher's eval forward (batch 256) in samples/s; target >= 100k samples/s.
* (e) stored bytes per (sample, view) of each logits policy at C = 10, 100, 1000, computed with
  :func:`~kdbench.cache.store.bytes_per_view` (record + view parameters + key) and measured on disk, against
  fp32 logits; the fidelity of the top-k policy on realistic logits (KL at tau = 1 and the KD temperature 4);
  at C = 1000 a top-k record must fit in TinyViT's 404 B.
"""

from __future__ import annotations

import itertools
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from _helpers_store import synthetic_store

from kdbench.cache.build import encode_view
from kdbench.cache.source import CachedTeacher, LiveTeacher
from kdbench.cache.store import bytes_per_view, encode_tap, record_bytes, view_param_bytes
from kdbench.config import CachePolicy, ViewRecipe
from kdbench.data.views import ViewRenderer
from kdbench.meta import DataInfo
from kdbench.methods.base import StepContext, Targets, create_method
from kdbench.models import create_model, model_info
from kdbench.taps import TapDict, compute_taps

N_TRAIN, BATCH, VIEWS = 4096, 128, 4
CPU = torch.device("cpu")
RECIPE = ViewRecipe(count=VIEWS, seed=0, scale=(0.6, 1.0))
DATA = DataInfo(num_classes=10, in_chans=1, image_size=28, num_train=N_TRAIN, mean=(0.286,), std=(0.353,))
TINYVIT_RECORD_BYTES = 404  # TinyViT's sparse logits record: top-100 fp16 values + int16 indices + a 4-byte seed



@pytest.fixture(scope="module")
def enabled(request) -> bool:
    cfg = request.config
    return bool(cfg.getoption("benchmark_enable")) or not cfg.getoption("benchmark_disable")


def realistic_logits(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Synthetic logits shaped like a trained classifier's: a Gaussian background (std 1.5), ~1% "similar"
    classes raised by 2-5, the predicted class raised by 7-13. Mean top-1 probability 0.97 / 0.92 / 0.72 and
    entropy 0.10 / 0.43 / 1.79 nats at C = 10 / 100 / 1000 (an ImageNet ResNet-50 is at about 0.7-0.75)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, num_classes, generator=g) * 1.5
    m = max(1, num_classes // 100)
    similar = torch.randint(0, num_classes, (n, m), generator=g)
    z.scatter_add_(1, similar, 2 + 3 * torch.rand(n, m, generator=g))
    top = torch.randint(0, num_classes, (n, 1), generator=g)
    z.scatter_add_(1, top, 7 + 6 * torch.rand(n, 1, generator=g))
    return z


def _timed(benchmark, fn: Callable[[], object], rounds: int, iterations: int = 1) -> float:
    """Benchmarks ``fn`` and returns its median seconds per call (one timed call when benchmarks are off)."""
    fn()  # warm-up (lazy initialisation of kernels)
    if benchmark.disabled:
        t0 = time.perf_counter()
        benchmark(fn)
        return time.perf_counter() - t0
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return benchmark.stats.stats.median


def _median(fn: Callable[[], object], rounds: int, enabled: bool) -> float:
    """A reference, timed like :func:`_timed` but outside pytest-benchmark (median seconds per call)."""
    fn()
    times = []
    for _ in range(rounds if enabled else 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _record(table: list[dict], benchmark, name: str, value: float, unit: str, reference: str | None = None,
            ratio: float | None = None, note: str = "", **extra) -> None:
    row = {"name": name, "value": value, "unit": unit, "reference": reference, "ratio": ratio, "note": note}
    table.append(row)
    if benchmark is not None:
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "name"}, **extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Random images and labels, the cnn_m teacher (random weights, eval), and a fp16 logits store of V views."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_TRAIN, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N_TRAIN,), generator=g)
    renderer = ViewRenderer(RECIPE, images, torch.arange(N_TRAIN), 1024, DATA.mean, DATA.std)
    torch.manual_seed(0)
    teacher = create_model("cnn_m", 10, 1, 28).to(memory_format=torch.channels_last).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    logits = realistic_logits(VIEWS * N_TRAIN, 10).view(VIEWS, N_TRAIN, 10)
    store = synthetic_store(tmp_path_factory.mktemp("bench") / "logits", logits, CachePolicy(), shard_size=1024)
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(N_TRAIN, BATCH, replace=False)) for _ in range(16)]
    return SimpleNamespace(renderer=renderer, labels=labels, teacher=teacher, store=store, batches=batches,
                           t_info=model_info(teacher, "cnn_m", 1, 28))


def _train_step(env, method_name: str, source) -> Callable[[], None]:
    """One training step of ``fit`` for a fresh cnn_xs student, cycling over fixed batches of view 0."""
    torch.manual_seed(0)
    student = create_model("cnn_xs", 10, 1, 28).to(memory_format=torch.channels_last).train()
    s_info = model_info(student, "cnn_xs", 1, 28)
    method = create_method(method_name, {}, teacher=env.t_info if source else None, student=s_info, data=DATA)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.01, momentum=0.9)
    s_taps, t_taps = method.student_taps(method.cfg), method.teacher_taps(method.cfg)
    ctx = StepContext(0, 1, 0, len(env.batches), 0)
    batches = itertools.cycle(env.batches)

    def step() -> None:
        rows = next(batches)
        x, params = env.renderer.render(0, rows, 28)
        y = env.labels[rows]
        t_out = source.outputs(0, rows, CPU) if t_taps else {}
        s_out = compute_taps(student, x.contiguous(memory_format=torch.channels_last), s_taps)
        out = method.loss(TapDict(s_out, "student"), TapDict(t_out, "teacher"),
                          Targets(y, y, torch.from_numpy(params.lam)), ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


@pytest.fixture(scope="module")
def student_step(env, enabled, bench_table) -> float:
    """Reference of (a) and (b): seconds per student-alone (baseline) step."""
    seconds = _median(_train_step(env, "baseline", None), 30, enabled)
    _record(bench_table, None, "(a,b) reference: student-alone step", seconds * 1e3, "ms/step", note="cnn_xs, batch 128")
    return seconds


@pytest.fixture(scope="module")
def teacher_rate(env, enabled, bench_table) -> float:
    """Reference of (d): samples/s of the cnn_m teacher's eval forward at batch 256 (inputs pre-rendered)."""
    x = env.renderer.render(0, np.arange(256), 28)[0].contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode():
            env.teacher(x)

    rate = 256 / _median(forward, 20, enabled)
    _record(bench_table, None, "(d) reference: online teacher forward", rate, "samples/s", note="cnn_m eval, batch 256")
    return rate


def test_a_kd_step_with_cached_logits(benchmark, env, student_step, bench_table):
    seconds = _timed(benchmark, _train_step(env, "kd", CachedTeacher({"logits": env.store})), rounds=30)
    _record(bench_table, benchmark, "(a) KD step, cached logits", seconds * 1e3, "ms/step", "student-alone step",
            seconds / student_step, "fp16 store in RAM")


def test_b_kd_step_with_online_teacher(benchmark, env, student_step, bench_table):
    live = LiveTeacher(env.teacher, frozenset({"logits"}), env.renderer, 28)
    seconds = _timed(benchmark, _train_step(env, "kd", live), rounds=15)
    _record(bench_table, benchmark, "(b) KD step, online cnn_m teacher", seconds * 1e3, "ms/step",
            "student-alone step", seconds / student_step, "LiveTeacher: render + cnn_m forward per step")


def test_c_cache_build_throughput(benchmark, env, enabled, bench_table):
    rows = np.arange(512)
    xs = [env.renderer.render(0, rows[i : i + 256], 28)[0].contiguous(memory_format=torch.channels_last)
          for i in range(0, len(rows), 256)]

    def forward() -> None:
        with torch.inference_mode():
            for x in xs:
                env.teacher(x)

    reference = _median(forward, 5, enabled)
    seconds = _timed(benchmark, lambda: encode_view(env.teacher, env.renderer, "logits", CachePolicy(), 0, rows, 256,
                                                    28), rounds=5)
    _record(bench_table, benchmark, "(c) cache build: render+teacher+encode", len(rows) / seconds, "views/s",
            "teacher eval forward alone", seconds / reference, "time ratio; cnn_m, batch 256")


FETCH_CASES = [
    ("fp16 logits", 100, {}, 50_000),
    ("fp32 logits", 100, {"logits_dtype": "float32"}, 50_000),
    ("fp16 logits", 1000, {}, 10_000),
    ("top-10 (rebuilt)", 1000, {"topk": 10}, 10_000),
]


@pytest.mark.parametrize("name, num_classes, policy, n", FETCH_CASES, ids=[f"{c[0]}-C{c[1]}" for c in FETCH_CASES])
def test_d_store_fetch(benchmark, tmp_path, teacher_rate, enabled, bench_table, name, num_classes, policy, n):
    store = synthetic_store(tmp_path, realistic_logits(n, num_classes)[None], CachePolicy(**policy))
    rng = np.random.default_rng(0)
    batches = itertools.cycle([torch.from_numpy(np.sort(rng.choice(n, 256, replace=False))) for _ in range(64)])
    seconds = _timed(benchmark, lambda: store.fetch(0, next(batches)), rounds=50, iterations=20)
    rate = 256 / seconds
    _record(bench_table, benchmark, f"(d) fetch {name}, C={num_classes}", rate, "samples/s", "online teacher forward",
            rate / teacher_rate, f"N={n:,}, batch 256")
    if enabled:
        assert rate >= 100_000, f"fetch of {name} at C={num_classes}: {rate:,.0f} samples/s < 100k"


SIZE_POLICIES = [("fp32 logits", {"logits_dtype": "float32"}), ("fp16 logits", {}), ("top-10", {"topk": 10}),
                 ("top-50", {"topk": 50})]
SIZE_CASES = [(c, name, pol) for c in (10, 100, 1000) for name, pol in SIZE_POLICIES if pol.get("topk", 0) < c]


@pytest.mark.parametrize("num_classes, name, policy", SIZE_CASES, ids=[f"C{c}-{n}" for c, n, _ in SIZE_CASES])
def test_e_bytes_per_view_and_fidelity(benchmark, tmp_path, bench_table, num_classes, name, policy):
    pol = CachePolicy(**policy)
    views, n = 2, 2048
    logits = realistic_logits(views * n, num_classes, seed=num_classes).view(views, n, num_classes)
    store = synthetic_store(tmp_path, logits, pol, shard_size=1024)
    computed = bytes_per_view((num_classes,), pol, "logits", views)
    on_disk = sum(s["bytes"] for s in store.manifest["shards"]) / (n * views)
    assert store.bytes_per_record() == record_bytes((num_classes,), pol, "logits")
    fp32 = bytes_per_view((num_classes,), CachePolicy(logits_dtype="float32"), "logits", views)

    served = torch.cat([store.fetch(v, torch.arange(n)) for v in range(views)])
    full = logits.reshape(-1, num_classes)
    kl = {}
    for tau in (1.0, 4.0):
        p, q = (full / tau).log_softmax(1), (served / tau).log_softmax(1)
        kl[tau] = float((p.exp() * (p - q)).sum(1).mean())
    agree = float((served.argmax(1) == full.argmax(1)).float().mean())
    seconds = _timed(benchmark, lambda: encode_tap("logits", full[:256], pol), rounds=20)
    _record(bench_table, benchmark, f"(e) {name}, C={num_classes}", computed, "B/(sample,view)", "fp32 logits",
            computed / fp32, f"on disk {on_disk:.0f} B; KL tau=1 {kl[1.0]:.2g}, tau=4 {kl[4.0]:.2g}; top-1 {agree:.1%}",
            bytes_on_disk=on_disk, kl_tau1=kl[1.0], kl_tau4=kl[4.0], top1_agreement=agree,
            encode_us_per_256=seconds * 1e6)
    assert on_disk <= computed * 1.1 + 16  # HDF5 overhead: a few KB per shard file
    if pol.topk:
        worst = bytes_per_view((num_classes,), pol, "logits", views=1)  # the key is not shared when V = 1
        if num_classes == 1000:
            assert worst <= TINYVIT_RECORD_BYTES, f"{name} at C=1000: {worst} B > {TINYVIT_RECORD_BYTES} B"
        assert agree > 0.99
    else:
        assert kl[1.0] < 1e-5 and agree > 0.99


def test_e_largest_topk_within_tinyvits_record(bench_table):
    """The largest k whose record (+ view parameters + key, V = 1) fits in 404 B at C = 1000."""
    fits = [k for k in range(1, 1000) if bytes_per_view((1000,), CachePolicy(topk=k), "logits", 1) <= TINYVIT_RECORD_BYTES]
    k = max(fits)
    _record(bench_table, None, "(e) largest top-k in 404 B, C=1000", k, "k", note=f"view params {view_param_bytes()} B"
            f" + key 8 B + {record_bytes((1000,), CachePolicy(topk=k), 'logits')} B record")
    assert k >= 50
