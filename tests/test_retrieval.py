"""kdbench.retrieval against hand-computed cases and an independent, per-query brute force."""

from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import pytest
import torch

from kdbench import retrieval
from kdbench.retrieval import retrieval_map

OFFICIAL_BATCH = 128
OFFICIAL_LEVELS = np.arange(0, 1.01, 0.1)  # as utils/retrieval_evaluation.py makes them


# ----------------------------------------------------------------------------------------------------
# Brute force: one query at a time, plain numpy / Python, written from the definitions.


def brute_rankings(query: np.ndarray, db: np.ndarray, metric: str) -> list[list[int]]:
    """Database indices of each query, nearest first; equal distances in database order (float64)."""
    query, db = query.astype(np.float64), db.astype(np.float64)
    rankings = []
    for q in query:
        if metric == "euclidean":
            dist = np.sqrt(((db - q) ** 2).sum(1))
        else:
            norms = np.linalg.norm(db, axis=1) * np.linalg.norm(q)
            cos = np.divide(db @ q, norms, out=np.zeros(len(db)), where=norms > 0)  # a zero vector: cos = 0
            dist = 1.0 - cos
        rankings.append(sorted(range(len(db)), key=lambda j: (dist[j], j)))
    return rankings


def brute_official(rankings, query_labels, db_labels, top_k: int) -> tuple[float, float]:
    """InDistill's Database.get_metrics, written per query: batches of 128 queries in order, "interpolation"
    over the batch's rows, nearest-recall rank per level, raw_precision[k - 1]."""
    aps, pks = [], []
    num_q = len(rankings)
    for i, ranking in enumerate(rankings):
        start = i // OFFICIAL_BATCH * OFFICIAL_BATCH
        b = min(OFFICIAL_BATCH, num_q - start)
        rel = np.array([db_labels[j] == query_labels[i] for j in ranking], dtype=np.int64)
        n = int((db_labels == query_labels[i]).sum())
        hits = np.cumsum(rel)
        precision = hits / np.arange(1, len(rel) + 1)
        for j in reversed(range(b - 1)):
            if j + 1 < len(precision):
                precision[j] = max(precision[j], precision[j + 1])
        recall = hits / float(n)
        aps.append(np.mean([precision[np.argmin(np.abs(recall - r))] for r in OFFICIAL_LEVELS]))
        pks.append(precision[top_k - 1])
    return 100 * float(np.mean(aps)), 100 * float(np.mean(pks))


def brute_11point(rankings, query_labels, db_labels, top_k: int) -> tuple[float, float]:
    """Textbook 11-point interpolated AP (max precision at recall >= l/10) and plain precision at k."""
    aps, pks = [], []
    for i, ranking in enumerate(rankings):
        rel = [int(db_labels[j] == query_labels[i]) for j in ranking]
        n = sum(rel)
        hits = list(itertools.accumulate(rel))
        levels = []
        for level in range(11):
            levels.append(max(h / (j + 1) for j, h in enumerate(hits) if 10 * h >= level * n))
        aps.append(sum(levels) / 11)
        pks.append(hits[top_k - 1] / top_k)
    return 100 * float(np.mean(aps)), 100 * float(np.mean(pks))


BRUTE = {"indistill": brute_official, "11point": brute_11point}


def check_against_brute(query, query_labels, db, db_labels, metric, top_ks=(100,), chunk=64):
    """Both protocols at each k against the brute force (to 1e-9 percentage points)."""
    rankings = brute_rankings(query, db, metric)
    for protocol, top_k in itertools.product(retrieval.PROTOCOLS, top_ks):
        want_map, want_pk = BRUTE[protocol](rankings, query_labels, db_labels, top_k)
        got = retrieval_map(torch.from_numpy(query), torch.from_numpy(query_labels), torch.from_numpy(db),
                            torch.from_numpy(db_labels), metric=metric, chunk=chunk, top_k=top_k,
                            protocol=protocol)
        assert got.map == pytest.approx(want_map, abs=1e-9), (protocol, top_k)
        assert got.precision_at_k == pytest.approx(want_pk, abs=1e-9), (protocol, top_k)


def skewed_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Labels of very different class sizes (weights 1..num_classes squared), every class present."""
    weights = np.arange(1, num_classes + 1, dtype=float) ** 2
    labels = rng.choice(num_classes, size=n, p=weights / weights.sum())
    labels[:num_classes] = np.arange(num_classes)
    return labels


def nice_cosine_vectors() -> np.ndarray:
    """4-d vectors whose normalised forms and cosines are exact in floating point (many exact ties): the zero
    vector, +-e_i, all (+-1, +-1, +-1, +-1), and twice each of those."""
    unit = np.concatenate([np.eye(4), -np.eye(4)])
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
    base = np.concatenate([unit, corners])
    return np.concatenate([np.zeros((1, 4)), base, 2 * base])


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases.


def one_d(points, labels) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(points, dtype=torch.float64)[:, None], torch.tensor(labels)


def test_hand_computed_single_query():
    # Query at 0 (label 0); database at 1..6 with labels 0 1 0 1 1 0, so the ranking is the database order:
    #   relevant 1 0 1 0 0 1, n = 3, H = 1 1 2 2 2 3, P = 1 1/2 2/3 1/2 2/5 1/2, R = 1/3 1/3 2/3 2/3 2/3 1.
    # One query: its batch has b = 1 row, so the official "interpolation" loop does nothing.
    # Official rank per level = first argmin |R - r|:
    #   r = 0, .1, .2, .3, .4 -> R = 1/3 at rank 0 -> P = 1                      (5 levels)
    #   r = .5: |1/3 - .5| = 0.16666666666666669 > |2/3 - .5| = 0.16666666666666663 (float64):
    #           rank 2, P = 2/3
    #   r = .6, .7, .8 -> R = 2/3 at rank 2 -> P = 2/3                            (with .5: 4 levels)
    #   r = .9, 1 -> R = 1 at rank 5 -> P = 1/2                                   (2 levels)
    #   AP = (5 * 1 + 4 * 2/3 + 2 * 1/2) / 11 = 26/33.
    # Textbook: level l needs ceil(3 l / 10) hits: 0 (l = 0), 1 (l = 1..3), 2 (l = 4..6), 3 (l = 7..10);
    #   the best precision from there on: 1, 1, 2/3 (ranks 2..5), 1/2 (rank 5):
    #   AP = (1 + 3 * 1 + 3 * 2/3 + 4 * 1/2) / 11 = 8/11.
    q, ql = one_d([0.0], [0])
    d, dl = one_d([1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 1, 0])
    official = retrieval_map(q, ql, d, dl, metric="euclidean", top_k=3)
    assert official.map == pytest.approx(100 * 26 / 33)
    assert official.precision_at_k == pytest.approx(100 * 2 / 3)  # raw P at rank 3 (b = 1)
    textbook = retrieval_map(q, ql, d, dl, metric="euclidean", top_k=3, protocol="11point")
    assert textbook.map == pytest.approx(100 * 8 / 11)
    assert textbook.precision_at_k == pytest.approx(100 * 2 / 3)
    # Cosine on 1-d positive points: every database item is at distance 0, so the order is the database order.
    assert retrieval_map(q + 1, ql, d, dl, metric="cosine", top_k=3).map == pytest.approx(100 * 26 / 33)


def test_hand_computed_batch_quirk():
    # Two queries at 0 (labels A = 0, B = 1); database at 1, 2, 3, 4 with labels B A A B. One batch of b = 2
    # rows, so the official loop replaces P_0 by max(P_0, P_1) and leaves the rest raw.
    # A: relevant 0 1 1 0, n = 2, P = 0 1/2 2/3 1/2 -> 1/2 1/2 2/3 1/2; R = 0 1/2 1 1.
    #    r = 0 .. .2 -> rank 0 (R = 0): 1/2; r = .3 .. .7 -> rank 1 (R = 1/2): 1/2; r = .8 .. 1 -> rank 2:
    #    2/3.
    #    AP = (8 * 1/2 + 3 * 2/3) / 11 = 6/11.
    # B: relevant 1 0 0 1, n = 2, P = 1 1/2 1/3 1/2 -> 1 1/2 1/3 1/2; R = 1/2 1/2 1/2 1.
    #    r = 0 .. .7 -> rank 0: 1; r = .8 .. 1 -> rank 3: 1/2.  AP = (8 + 3/2) / 11 = 19/22.
    # mAP = (6/11 + 19/22) / 2 = 31/44. Official P@1 = mean of the "interpolated" P_0 = (1/2 + 1) / 2 = 3/4
    # (the plain P@1 is 1/2); P@2 = raw P_1 = 1/2 for both.
    # Textbook: A = 2/3 on every level (best precision 2/3 at rank 2); B = (6 * 1 + 5 * 1/2) / 11 = 17/22;
    # mAP = 95/132, P@1 = 1/2.
    q, ql = one_d([0.0, 0.0], [0, 1])
    d, dl = one_d([1, 2, 3, 4], [1, 0, 0, 1])
    assert retrieval_map(q, ql, d, dl, metric="euclidean", top_k=1).map == pytest.approx(100 * 31 / 44)
    assert retrieval_map(q, ql, d, dl, metric="euclidean", top_k=1).precision_at_k == pytest.approx(75.0)
    assert retrieval_map(q, ql, d, dl, metric="euclidean", top_k=2).precision_at_k == pytest.approx(50.0)
    textbook = retrieval_map(q, ql, d, dl, metric="euclidean", top_k=1, protocol="11point")
    assert textbook.map == pytest.approx(100 * 95 / 132)
    assert textbook.precision_at_k == pytest.approx(50.0)


def test_ties_are_broken_by_database_index():
    # Query at 0 (label 0); two database items at distance 1: -1 (label 0) and +1 (label 1).
    # Irrelevant first: relevant 0 1, P = 0 1/2, R = 0 1; r <= .5 -> rank 0 (on the tie at .5 the first rank):
    #   P = 0 (6 levels); r >= .6 -> rank 1: 1/2 (5 levels). AP = 5/22.  Relevant first: AP = 1.
    q, ql = one_d([0.0], [0])
    irrelevant_first = retrieval_map(q, ql, *one_d([1.0, -1.0], [1, 0]), metric="euclidean", top_k=1)
    relevant_first = retrieval_map(q, ql, *one_d([-1.0, 1.0], [0, 1]), metric="euclidean", top_k=1)
    assert irrelevant_first.map == pytest.approx(100 * 5 / 22)
    assert irrelevant_first.precision_at_k == 0.0
    assert relevant_first.map == pytest.approx(100.0)


def test_official_hit_counts_match_numpy_argmin():
    """h* of every level = the official argmin |H / n - r| over the attainable recalls, float64 included."""
    sizes = torch.arange(1, 400)
    got = retrieval._indistill_hits(sizes)
    for n in sizes.tolist():
        recall = np.arange(n + 1) / float(n)
        want = [int(np.argmin(np.abs(recall - r))) for r in OFFICIAL_LEVELS]
        assert got[n - 1].tolist() == want, n


# ----------------------------------------------------------------------------------------------------
# Against the brute force.


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_random_against_brute_force(metric):
    """Continuous data, 300 queries (two full official batches + 44), classes of very different sizes."""
    rng = np.random.default_rng(1)
    db_labels, query_labels = skewed_labels(rng, 400, 6), skewed_labels(rng, 300, 6)
    centers = rng.normal(size=(6, 5))
    db = centers[db_labels] + rng.normal(size=(400, 5))
    query = centers[query_labels] + rng.normal(size=(300, 5))
    check_against_brute(query, query_labels, db, db_labels, metric, top_ks=(1, 100, 150))


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_ties_against_brute_force(metric):
    """Few distinct vectors (exact ties everywhere, zero vectors for cosine), float64 and float32."""
    rng = np.random.default_rng(2)
    if metric == "euclidean":
        pool = np.array(list(itertools.product([-1.0, 0.0, 1.0, 2.0], repeat=3)))
    else:
        pool = nice_cosine_vectors()
    db_labels, query_labels = skewed_labels(rng, 350, 5), skewed_labels(rng, 140, 5)
    db, query = pool[rng.integers(len(pool), size=350)], pool[rng.integers(len(pool), size=140)]
    for dtype in (np.float64, np.float32):
        check_against_brute(query.astype(dtype), query_labels, db.astype(dtype), db_labels, metric, chunk=32)


def test_fewer_queries_than_a_batch_and_small_database():
    """b = Q < 128 and N < 128 (the window of leading ranks is the whole database)."""
    rng = np.random.default_rng(3)
    db_labels, query_labels = skewed_labels(rng, 40, 3), skewed_labels(rng, 7, 3)
    db, query = rng.normal(size=(40, 3)), rng.normal(size=(7, 3))
    check_against_brute(query, query_labels, db, db_labels, "euclidean", top_ks=(1, 40))


@pytest.mark.parametrize("first_rank, num_queries, top_ks", [(110, 1, (128, 140)), (70, 130, (100,))],
                         ids=["across-the-boundary", "inside-the-leading-ranks"])
def test_tie_in_the_leading_ranks(first_rank, num_queries, top_ks):
    """Distinct relevant distances (the counting path's thresholds are clean) but 40 copies of one point at
    ranks ``first_rank`` .. +39, the first 20 by database index relevant. 1 query, k = 128 or 140: the 128
    leading ranks end inside the copies. 130 queries, k = 100: the last two (a batch of 2) take the raw
    precision at rank 100, inside the copies. Either way the copies count in database order, whatever order
    ``topk`` returns them in."""
    rng = np.random.default_rng(7)
    spread = np.sort(rng.uniform(0.01, 10.0, size=2000))
    copy_at = (spread[first_rank - 1] + spread[first_rank]) / 2
    db = rng.permutation(np.concatenate([spread, np.full(40, copy_at)]))[:, None]
    db_labels = rng.integers(0, 2, size=len(db))
    copies = np.flatnonzero(db[:, 0] == copy_at)
    db_labels[copies[:20]], db_labels[copies[20:]] = 0, 1
    check_against_brute(np.zeros((num_queries, 1)), np.zeros(num_queries, int), db, db_labels, "euclidean",
                        top_ks=top_ks)


def test_a_tie_of_two_across_the_window_edge_is_ranked_by_database_index():
    """k = 140 reads the last of the 140 leading ranks; two items at the same distance sit at ranks 139 and 140
    (ranks 0-based), the rest distinct. Which one ``topk`` keeps inside the window is its own affair, so the
    counting path must see the tie and rank that query by the full sort: the official order keeps the one with the
    smaller database index, relevant in one layout and not in the other. Several layouts, so that ``topk`` keeps
    the wrong one in some of them."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        spread = np.arange(1.0, 401.0)
        spread[139:141] = 139.5  # ranks 139 and 140 tie; rank 138 (139.0) is strictly nearer
        order = rng.permutation(len(spread))
        db = spread[order][:, None]
        db_labels = rng.integers(0, 2, size=len(db))
        tied = np.flatnonzero(db[:, 0] == 139.5)
        for relevant_first in (True, False):
            db_labels[tied] = (0, 1) if relevant_first else (1, 0)
            check_against_brute(np.zeros((1, 1)), np.zeros(1, int), db, db_labels.copy(), "euclidean",
                                top_ks=(140,))


def test_the_counting_path_does_not_depend_on_topk_returning_sorted_values(monkeypatch, caplog):
    """``topk(sorted=False)`` returns its values in any order (on CUDA, and on CPU for some sizes): with tie-free
    data every query must still stay on the counting path, which it does only if the head asks for them sorted."""
    real = torch.topk

    def any_order(*args, sorted=True, **kwargs):
        vals, idx = real(*args, sorted=sorted, **kwargs)
        return (vals, idx) if sorted else (vals.flip(-1), idx.flip(-1))

    monkeypatch.setattr(torch, "topk", any_order)
    db, db_labels, query, query_labels = _random_case(8, 600, 150, 6, 5)
    with caplog.at_level(logging.DEBUG, logger="kdbench.retrieval"):
        got = retrieval_map(query, query_labels, db, db_labels, metric="euclidean")
    assert "(0 queries by full sort)" in caplog.records[-1].getMessage()
    monkeypatch.setattr(torch, "topk", real)
    assert got == retrieval_map(query, query_labels, db, db_labels, metric="euclidean")


def test_small_classes_stay_on_the_counting_path(caplog):
    """Classes of 6 to 14 database items: the 0.1 recall level needs h* = 1 hit (its threshold is the nearest
    relevant distance; only h* = 0 has none), and tie-free data ranks every query without a full sort."""
    rng = np.random.default_rng(12)
    db_labels = np.repeat(np.arange(5), [6, 8, 10, 12, 14])
    query_labels = rng.integers(0, 5, size=40)
    db, query = rng.normal(size=(len(db_labels), 4)), rng.normal(size=(40, 4))
    with caplog.at_level(logging.DEBUG, logger="kdbench.retrieval"):
        check_against_brute(query, query_labels, db, db_labels, "euclidean", top_ks=(5,))
    indistill = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrieval indistill/")]
    assert len(indistill) == 1 and "(0 queries by full sort)" in indistill[0], indistill


def test_float32_against_brute_force():
    rng = np.random.default_rng(4)
    db_labels, query_labels = skewed_labels(rng, 500, 4), skewed_labels(rng, 200, 4)
    db, query = rng.normal(size=(500, 8)), rng.normal(size=(200, 8))
    for metric in retrieval.METRICS:
        check_against_brute(query.astype(np.float32), query_labels, db.astype(np.float32), db_labels, metric)


# ----------------------------------------------------------------------------------------------------
# The counting path against the sorting path, chunking, labels, errors.


def _random_case(seed: int, num_db: int, num_q: int, dim: int, num_classes: int):
    """float64 Gaussian embeddings and uniform labels: database, its labels, queries, their labels."""
    g = torch.Generator().manual_seed(seed)
    db = torch.randn(num_db, dim, generator=g, dtype=torch.float64)
    db_labels = torch.randint(0, num_classes, (num_db,), generator=g)
    query = torch.randn(num_q, dim, generator=g, dtype=torch.float64)
    return db, db_labels, query, torch.randint(0, num_classes, (num_q,), generator=g)


def _run_both_paths(monkeypatch, *args, **kwargs):
    monkeypatch.setattr(retrieval, "_FAST_PATH", True)
    fast = retrieval_map(*args, **kwargs)
    monkeypatch.setattr(retrieval, "_FAST_PATH", False)
    return fast, retrieval_map(*args, **kwargs)


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_counting_path_equals_sorting_path(monkeypatch, caplog, metric):
    """Tie-free data stays on the counting path; quantised data (many ties) falls back row by row; both give
    exactly what the full stable sort gives."""
    db, db_labels, query, query_labels = _random_case(5, 3000, 300, 16, 10)
    with caplog.at_level(logging.DEBUG, logger="kdbench.retrieval"):
        fast, slow = _run_both_paths(monkeypatch, query, query_labels, db, db_labels, metric=metric,
                                     chunk=100)
    assert "(0 queries by full sort)" in caplog.records[0].getMessage()
    assert (fast.map, fast.precision_at_k) == (slow.map, slow.precision_at_k)

    caplog.clear()
    coarse_db, coarse_query = (db * 2).round(), (query * 2).round()
    with caplog.at_level(logging.DEBUG, logger="kdbench.retrieval"):
        fast, slow = _run_both_paths(monkeypatch, coarse_query, query_labels, coarse_db, db_labels,
                                     metric=metric, chunk=100)
    assert "(0 queries by full sort)" not in caplog.records[0].getMessage()
    assert (fast.map, fast.precision_at_k) == (slow.map, slow.precision_at_k)


def test_chunk_size_and_label_values_do_not_matter():
    db, db_labels, query, query_labels = _random_case(6, 700, 260, 6, 5)
    reference = retrieval_map(query, query_labels, db, db_labels, metric="cosine")
    for chunk in (1, 7, 1000):
        got = retrieval_map(query, query_labels, db, db_labels, metric="cosine", chunk=chunk)
        assert got.map == pytest.approx(reference.map, abs=1e-10)
        assert got.precision_at_k == pytest.approx(reference.precision_at_k, abs=1e-10)
    relabelled = retrieval_map(query, query_labels * 7 - 3, db, db_labels * 7 - 3, metric="cosine")
    assert relabelled.map == pytest.approx(reference.map, abs=1e-10)
    assert (reference.k, reference.num_queries, reference.num_database) == (100, 260, 700)


def test_errors():
    q, ql = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    d, dl = torch.ones(5, 2), torch.tensor([0, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="no database item: \\[2\\]"):
        retrieval_map(q, ql, d, dl, metric="cosine", top_k=5)
    with pytest.raises(ValueError, match="metric"):
        retrieval_map(q, ql, d, dl, metric="manhattan")
    with pytest.raises(ValueError, match="protocol"):
        retrieval_map(q[:2], ql[:2], d, dl, metric="cosine", top_k=5, protocol="trec")
    with pytest.raises(ValueError, match="top_k"):
        retrieval_map(q[:2], ql[:2], d, dl, metric="cosine", top_k=6)
    with pytest.raises(ValueError, match="finite"):
        retrieval_map(q[:2], ql[:2], d.clone().fill_(float("nan")), dl, metric="cosine", top_k=5)
    with pytest.raises(ValueError, match="labels must be"):
        retrieval_map(q[:2], ql, d, dl, metric="cosine", top_k=5)


# Every check of the arguments, each on its own (one bad argument, the rest good), with its whole message.
_Q, _QL = torch.zeros(3, 2), torch.tensor([0, 1, 0])
_D, _DL = torch.ones(5, 2), torch.tensor([0, 1, 1, 0, 0])


@pytest.mark.parametrize("change, message", [
    ({"query_emb": torch.zeros(3)}, "embeddings must be [Q, D] and [N, D], got (3,) and (5, 2)"),
    ({"db_emb": torch.ones(5, 2, 1)}, "embeddings must be [Q, D] and [N, D], got (3, 2) and (5, 2, 1)"),
    ({"query_emb": torch.zeros(3, 3)}, "embeddings must be [Q, D] and [N, D], got (3, 3) and (5, 2)"),
    ({"query_labels": _QL.double()}, "labels must be integers"),
    ({"db_labels": _DL.float()}, "labels must be integers"),
    ({"query_emb": torch.zeros(0, 2), "query_labels": torch.zeros(0, dtype=torch.int64)},
     "retrieval needs at least one query and one database item"),
    ({"db_emb": torch.zeros(0, 2), "db_labels": torch.zeros(0, dtype=torch.int64)},
     "retrieval needs at least one query and one database item"),
    ({"chunk": 0}, "chunk must be >= 1, got 0"),
    ({"top_k": 0}, "top_k must be in [1, 5], got 0"),
    ({"db_emb": torch.full((5, 2), float("inf"))}, "embeddings must be finite"),
])
def test_each_bad_argument_alone_gets_its_own_message(change, message):
    args = {"query_emb": _Q, "query_labels": _QL, "db_emb": _D, "db_labels": _DL, "metric": "cosine", "top_k": 5,
            **change}
    with pytest.raises(ValueError) as err:
        retrieval_map(args.pop("query_emb"), args.pop("query_labels"), args.pop("db_emb"), args.pop("db_labels"),
                      **args)
    assert str(err.value) == message


def test_one_database_item_is_enough():
    got = retrieval_map(torch.ones(2, 2), torch.tensor([3, 3]), torch.ones(1, 2), torch.tensor([3]),
                        metric="euclidean", top_k=1)
    assert (got.map, got.precision_at_k) == (100.0, 100.0)


@pytest.mark.parametrize("protocol", retrieval.PROTOCOLS)
@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_the_result_names_what_was_measured(metric, protocol):
    got = retrieval_map(_Q, _QL, _D, _DL, metric=metric, top_k=4, protocol=protocol)
    assert (got.metric, got.protocol, got.k, got.num_queries, got.num_database) == (metric, protocol, 4, 3, 5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_labels_of_any_integer_type_give_the_int64_result(dtype):
    """Integer labels are accepted whatever their width (not only int64) and scored alike."""
    rng = np.random.default_rng(5)
    q, d = rng.normal(size=(40, 3)), rng.normal(size=(60, 3))
    ql, dl = skewed_labels(rng, 40, 4), skewed_labels(rng, 60, 4)
    for protocol in retrieval.PROTOCOLS:
        want = retrieval_map(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(d), torch.from_numpy(dl),
                             metric="euclidean", top_k=7, protocol=protocol)
        got = retrieval_map(torch.from_numpy(q), torch.from_numpy(ql).to(dtype), torch.from_numpy(d),
                            torch.from_numpy(dl).to(dtype), metric="euclidean", top_k=7, protocol=protocol)
        assert got == want


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_precision_at_k_at_the_size_of_the_last_official_batch(metric):
    """131 queries: the last official batch holds 3, so k = 3 is interpolated over it and k = 4 is not."""
    rng = np.random.default_rng(11)
    q, d = rng.normal(size=(131, 3)), rng.normal(size=(90, 3))
    check_against_brute(q, skewed_labels(rng, 131, 3), d, skewed_labels(rng, 90, 3), metric, top_ks=(3, 4))


@pytest.mark.parametrize("protocol", retrieval.PROTOCOLS)
def test_the_debug_line_names_the_run_and_counts_every_sorted_query(protocol, caplog):
    """All database items equal: every query ties, so both protocols rank all 3 by a full sort (2 chunks)."""
    caplog.set_level(logging.DEBUG, logger="kdbench.retrieval")
    got = retrieval_map(_Q, _QL, _D, _DL, metric="euclidean", top_k=4, protocol=protocol, chunk=2)
    line = [r.getMessage() for r in caplog.records if r.name == "kdbench.retrieval"][-1]
    assert re.fullmatch(rf"retrieval {protocol}/euclidean: 3 queries x 5 database items in \d+\.\d\d s \(3 queries by "
                        rf"full sort\); mAP {got.map:.3f}, P@4 {got.precision_at_k:.3f}", line), line
