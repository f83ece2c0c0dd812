"""Speed of the retrieval metrics (:func:`kdbench.retrieval.retrieval_map`) against the bare ranking cost
measured in the same run.

Measure with ``pytest tests/benchmarks/test_bench_retrieval.py --benchmark-enable`` (under the default
``--benchmark-disable`` each case runs once after a warm-up, as a smoke test).

* (r) reference: one ``torch.cdist`` + ``argsort`` of the whole ``Q x N`` distance matrix (float32), the
  cost of ranking the database for every query with plain torch.
* (r) ``retrieval_map`` on the same embeddings, default chunking: the official InDistill metric (counting
  path) for both metrics, the same forced onto the full-sort path, and the textbook ``11point`` protocol
  (always sorts). Ratio = seconds / reference seconds; below 1 means faster than ranking everything.

Synthetic case: N = 20,000 database and Q = 256 query embeddings of D = 64 (ReLU of 10 Gaussian class
clusters), single-threaded like the rest of the test session.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_bench_store import _median, _record, _timed

from kdbench import retrieval
from kdbench.retrieval import retrieval_map

N_DB, N_Q, DIM, CLASSES = 20_000, 256, 64, 10


@pytest.fixture(scope="module")
def embeddings() -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    centers = 0.6 * torch.randn(CLASSES, DIM, generator=g)
    db_labels = torch.arange(N_DB) % CLASSES
    query_labels = torch.randint(0, CLASSES, (N_Q,), generator=g)
    db = torch.relu(centers[db_labels] + torch.randn(N_DB, DIM, generator=g))
    query = torch.relu(centers[query_labels] + torch.randn(N_Q, DIM, generator=g))
    return SimpleNamespace(query=query, query_labels=query_labels, db=db, db_labels=db_labels)


@pytest.fixture(scope="module")
def ranking_seconds(request, embeddings, bench_table) -> float:
    """Reference: seconds of one cdist + argsort of the Q x N matrix."""
    config = request.config
    enabled = bool(config.getoption("benchmark_enable")) or not config.getoption("benchmark_disable")
    seconds = _median(lambda: torch.cdist(embeddings.query, embeddings.db).argsort(dim=1), 5, enabled)
    _record(bench_table, None, "(r) reference: cdist + argsort", seconds, "s",
            note=f"{N_Q} x {N_DB:,}, D={DIM}")
    return seconds


CASES = [("cosine", "indistill", True), ("euclidean", "indistill", True), ("cosine", "indistill", False),
         ("cosine", "11point", False)]


@pytest.mark.parametrize("metric, protocol, counting", CASES,
                         ids=[f"{m}-{p}-{'count' if c else 'sort'}" for m, p, c in CASES])
def test_r_retrieval_map(benchmark, monkeypatch, embeddings, ranking_seconds, bench_table, metric, protocol,
                         counting):
    monkeypatch.setattr(retrieval, "_FAST_PATH", counting)
    e = embeddings
    seconds = _timed(benchmark, lambda: retrieval_map(e.query, e.query_labels, e.db, e.db_labels,
                                                      metric=metric, protocol=protocol), rounds=5)
    path = "counting" if counting and protocol == "indistill" else "full sort"
    _record(bench_table, benchmark, f"(r) retrieval_map {protocol}/{metric}, {path}", seconds, "s",
            "cdist + argsort", seconds / ranking_seconds, "chunk 128, mAP + P@100")
