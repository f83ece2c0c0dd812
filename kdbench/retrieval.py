"""Retrieval mAP and top-k precision as InDistill's official evaluation computes them.

Protocol (Sarridis et al., "InDistill"; official code ``gsarridis/InDistill``,
``utils/retrieval_evaluation.py``, ``results.py``): the database is the embeddings of the training split, the
queries those of the test split; a database item is relevant to a query when it has the query's label. Every
query ranks the *whole* database by distance (cosine distance ``1 - cos`` or Euclidean; both are reported, as
"mAP (c)" and "mAP (e)"). With ``H_j`` the relevant items among the first ``j + 1`` ranked, ``n`` the database
items of the query's class, ``P_j = H_j / (j + 1)`` and ``R_j = H_j / n``:

``protocol="indistill"`` (default) is the official metric to the letter:

* recall levels ``r = 0, 0.1, ..., 1.0`` (as ``numpy.arange(0, 1.01, 0.1)`` makes them, e.g.
  ``0.30000000000000004``); the rank used for level ``r`` is the *first rank whose recall is closest* to ``r``
  (``argmin |R_j - r|``, computed in float64 as the official code does): the rank of the ``h*``-th relevant
  item, ``h*`` the hit count nearest to ``r * n`` (ties to the smaller), or rank 0 when ``h* = 0``. When
  ``r * n`` is an integer this is the rank at which the level is first reached; otherwise it may be the rank
  just *before* it (recall slightly below ``r``);
* the precision taken there is "interpolated" only inside the query's evaluation batch: the official loop
  ``for i in reversed(range(len(precision) - 1))`` runs over the *rows* (queries, batches of 128 in test-set
  order, the last one holding the remainder ``Q mod 128``) instead of the columns, so ``P_j`` is replaced by
  ``max(P_j, ..., P_{b-1})`` for ``j < b - 1`` (``b`` = that batch's size) and left raw beyond. In practice
  only level 0 (always rank 0: the maximum precision within the first 128 ranks) is interpolated;
* AP = mean of the 11 values; mAP = mean over queries, in percent;
* top-k precision is the official ``raw_precision[k - 1]``: the mean over queries of the same batch-limited
  "interpolated" precision at rank ``k``, i.e. ``max(P_{k-1}, ..., P_{b-1})`` (for ``k = 100`` and a full
  batch, the best precision at ranks 100..128), the plain fraction of relevant items among the ``k`` nearest
  for the queries of the last batch when it is smaller than ``k``.

The dependence on the query order is the official code's: pass the queries in the test split's order.

``protocol="11point"`` is the textbook 11-point interpolated AP: the level ``r`` is reached at the first rank
with recall ``>= r`` (exact rational comparison), the interpolated precision there is the maximum precision at
any rank with recall ``>= r``, and top-k precision is the plain fraction of relevant items among the ``k``
nearest. Neither protocol bounds the other query by query: the official nearest-recall rank can sit before
the level with a higher precision, while the textbook maximum looks at all deeper ranks.

Deviations from the official code (by design):

* Ties in distance are broken by database index (a stable sort: of two equidistant items the one earlier in
  the database ranks first). The official code gets its ranking from scikit-learn's brute-force
  ``NearestNeighbors.kneighbors`` with ``n_neighbors = N``, whose order among exactly equal distances is that
  of an unstable sort (unspecified). Results differ only where exactly equal distances straddle relevant and
  irrelevant items.
* Distances are computed in float64 (whatever the input dtype) and ranked as computed: cosine by
  ``-<q/|q|, x/|x|>`` (the order of ``1 - cos`` without its rounding; a zero vector has similarity 0, i.e.
  distance 1, as in scikit-learn), Euclidean by ``|x|^2 - 2 <q, x>`` (the order of ``|q - x|``). scikit-learn
  works at the features' precision (float32 for the official features) and clips ``1 - cos`` to ``[0, 2]``,
  so distances closer than that precision can tie there (in unspecified order); they are ordered here.
* A query whose label has no database item raises :class:`ValueError` (the official code raises ``KeyError``);
  fewer than 128 queries work (the official code fails with a ``TypeError``).

Computation: exact, in chunks of ``chunk`` queries, so that ``chunk x N_db`` distances (float64) and a few
integer/boolean tensors of that shape are in memory at once (measured: about ``chunk * N_db * 30`` bytes on
the counting path, 40 for ``11point``, 55 on the full-sort path); there is no loop over queries. The official
protocol does not sort the database for every query: it only needs the rank of the ``h*``-th relevant item
for the 11 levels and the first ``max(128, k)`` ranks. The ``h*``-th smallest relevant distance comes from
sorting the query's relevant distances (``n`` of them, not ``N``); its rank is the number of database items
nearer than it, counted for all levels at once by one ``searchsorted`` pass and a per-row histogram; the
first ranks come from ``topk``. A query for which one of these thresholds is shared by another item (an exact
tie) is redone with a full stable sort of its row, so the tie rule above holds on both paths. The ``11point``
protocol always sorts (it needs every relevant item's rank).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean")
PROTOCOLS = ("indistill", "11point")
INDISTILL_QUERY_BATCH = 128  # the official ``Database.evaluate(..., batch_size=128)``
NUM_LEVELS = 11

# Set to False to send every query through the full-sort path (used by the tests to compare both paths).
_FAST_PATH = True


@dataclass(frozen=True)
class RetrievalResult:
    """Retrieval scores of a set of queries against a database.

    Attributes:
        map: Mean over queries of the 11-point AP, in percent.
        precision_at_k: Mean over queries of the precision at rank ``k``, in percent (see the module docstring
            for the official definition).
        k: The rank of ``precision_at_k``.
        metric: ``cosine`` or ``euclidean``.
        protocol: ``indistill`` or ``11point``.
        num_queries: Queries evaluated.
        num_database: Database items.
    """

    map: float
    precision_at_k: float
    k: int
    metric: str
    protocol: str
    num_queries: int
    num_database: int


def retrieval_map(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    db_emb: torch.Tensor,
    db_labels: torch.Tensor,
    *,
    metric: str,
    chunk: int = 128,
    top_k: int = 100,
    protocol: str = "indistill",
) -> RetrievalResult:
    """Retrieval mAP (11 recall levels) and top-k precision of ``query_emb`` against ``db_emb``.

    Runs on the device of ``db_emb`` (the queries are moved there), in float64.

    Args:
        query_emb: ``[Q, D]`` query embeddings (the test split, in its order for ``protocol="indistill"``).
        query_labels: ``[Q]`` integer labels of the queries.
        db_emb: ``[N, D]`` database embeddings (the training split).
        db_labels: ``[N]`` integer labels of the database.
        metric: ``cosine`` (cosine distance) or ``euclidean``.
        chunk: Queries per chunk; memory is about ``chunk * N * 30`` to ``chunk * N * 55`` bytes.
        top_k: The rank ``k`` of the reported precision, ``1 <= k <= N``.
        protocol: ``indistill`` (the official metric, quirks included) or ``11point`` (textbook).

    Returns:
        The :class:`RetrievalResult`, scores in percent.

    Raises:
        ValueError: On a bad shape, metric, protocol, ``chunk`` or ``top_k``, non-finite embeddings, or a
            query label with no database item.
    """
    _check_arguments(query_emb, query_labels, db_emb, db_labels, metric, chunk, top_k, protocol)
    t0 = time.perf_counter()
    num_q, num_db = len(query_emb), len(db_emb)
    device = db_emb.device
    query = query_emb.to(device=device, dtype=torch.float64)
    db = db_emb.to(dtype=torch.float64)
    if not (torch.isfinite(query).all() and torch.isfinite(db).all()):
        raise ValueError("embeddings must be finite")

    classes, db_cls = torch.unique(db_labels.to(device=device, dtype=torch.int64), return_inverse=True)
    q_lab = query_labels.to(device=device, dtype=torch.int64)
    q_cls = torch.searchsorted(classes, q_lab).clamp(max=len(classes) - 1)
    missing = classes[q_cls] != q_lab
    if missing.any():
        raise ValueError(f"query labels with no database item: {sorted(set(q_lab[missing].tolist()))}")
    class_size = torch.bincount(db_cls, minlength=len(classes))
    hits = (_indistill_hits if protocol == "indistill" else _interpolated_hits)(class_size.cpu()).to(device)

    # The official evaluation batch of each query (only its size matters); queries are then grouped by class
    # so that a chunk gathers its relevant items from few classes.
    position = torch.arange(num_q, device=device)
    full = num_q - num_q % INDISTILL_QUERY_BATCH
    batch = torch.where(position < full, INDISTILL_QUERY_BATCH, num_q - full)
    order = torch.sort(q_cls, stable=True).indices
    window = min(num_db, max(top_k, min(num_q, INDISTILL_QUERY_BATCH)))
    scorer = _Scorer(db, db_cls, metric, class_size, window)

    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    pk_sum = torch.zeros((), dtype=torch.float64, device=device)
    sorted_rows = 0
    for start in range(0, num_q, chunk):
        rows = order[start : start + chunk]
        dist = scorer.distances(query[rows])
        cls, m = q_cls[rows], hits[q_cls[rows]]
        if protocol == "11point":
            ap, pk = _interpolated_scores(scorer.sorted_relevance(dist, cls), m, top_k)
            sorted_rows += len(rows)
        else:
            if _FAST_PATH:
                pos, head, ok = scorer.fast_ranks(dist, cls, m)
                bad = (~ok).nonzero().squeeze(1)
            else:
                pos, head, bad = None, None, torch.arange(len(rows), device=device)
            if len(bad):  # exact ties on the counting path: rank these rows by a full stable sort
                sorted_pos, sorted_head = scorer.sorted_ranks(dist[bad], cls[bad], m[bad])
                if pos is None:
                    pos, head = sorted_pos, sorted_head
                else:
                    pos[bad], head[bad] = sorted_pos, sorted_head
                sorted_rows += len(bad)
            ap, pk = _indistill_scores(pos, m, head, batch[rows], top_k)
        ap_sum += ap.sum()
        pk_sum += pk.sum()
    result = RetrievalResult(100.0 * float(ap_sum) / num_q, 100.0 * float(pk_sum) / num_q, top_k, metric,
                             protocol, num_q, num_db)
    _logger.debug("retrieval %s/%s: %d queries x %d database items in %.2f s (%d queries by full sort); "
                  "mAP %.3f, P@%d %.3f", protocol, metric, num_q, num_db, time.perf_counter() - t0,
                  sorted_rows, result.map, top_k, result.precision_at_k)
    return result


def _check_arguments(query_emb: torch.Tensor, query_labels: torch.Tensor, db_emb: torch.Tensor,
                     db_labels: torch.Tensor, metric: str, chunk: int, top_k: int, protocol: str) -> None:
    """Raises :class:`ValueError` on arguments :func:`retrieval_map` does not accept (see there)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if query_emb.ndim != 2 or db_emb.ndim != 2 or query_emb.shape[1] != db_emb.shape[1]:
        raise ValueError(f"embeddings must be [Q, D] and [N, D], got {tuple(query_emb.shape)} and "
                         f"{tuple(db_emb.shape)}")
    num_q, num_db = query_emb.shape[0], db_emb.shape[0]
    if query_labels.shape != (num_q,) or db_labels.shape != (num_db,):
        raise ValueError(f"labels must be [Q] = [{num_q}] and [N] = [{num_db}], got "
                         f"{tuple(query_labels.shape)} and {tuple(db_labels.shape)}")
    if query_labels.is_floating_point() or db_labels.is_floating_point():
        raise ValueError("labels must be integers")
    if num_q == 0 or num_db == 0:
        raise ValueError("retrieval needs at least one query and one database item")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not 1 <= top_k <= num_db:
        raise ValueError(f"top_k must be in [1, {num_db}], got {top_k}")


def _indistill_hits(class_size: torch.Tensor) -> torch.Tensor:
    """The official hit count ``h*`` of each recall level: ``argmin_h |h / n - r|`` over ``h = 0..n``
    (float64, first minimum, i.e. the smaller ``h`` on a tie), ``r`` as ``numpy.arange(0, 1.01, 0.1)`` has it.

    Args:
        class_size: ``[C]`` database items per class (all ``>= 1``).

    Returns:
        ``[C, 11]`` int64.
    """
    levels = torch.arange(NUM_LEVELS, dtype=torch.float64) * 0.1
    n = class_size.to(torch.int64)[:, None, None]
    base = torch.floor(levels[None, :] * n[:, :, 0]).to(torch.int64)
    cand = torch.minimum((base[:, :, None] + torch.arange(-1, 3)).clamp(min=0), n)  # nondecreasing along -1
    err = (cand.to(torch.float64) / n.to(torch.float64) - levels[None, :, None]).abs()
    return cand.gather(2, err.argmin(2, keepdim=True)).squeeze(2)


def _interpolated_hits(class_size: torch.Tensor) -> torch.Tensor:
    """The least hit count with recall ``>= r`` for ``r = l / 10``: ``ceil(l * n / 10)`` in exact integers.

    Args:
        class_size: ``[C]`` database items per class.

    Returns:
        ``[C, 11]`` int64.
    """
    n = class_size.to(torch.int64)[:, None]
    return (torch.arange(NUM_LEVELS)[None, :] * n + 9) // 10


class _Scorer:
    """Distances from query chunks to a fixed database, and the ranks the metrics need.

    Args:
        db: ``[N, D]`` database embeddings.
        db_cls: ``[N]`` class index of each database item (``0..C-1``).
        metric: ``cosine`` or ``euclidean``.
        class_size: ``[C]`` database items per class.
        window: The number of leading ranks the official scores need (``max(128, k)``, at most ``N``).
    """

    def __init__(self, db: torch.Tensor, db_cls: torch.Tensor, metric: str, class_size: torch.Tensor,
                 window: int) -> None:
        self.metric = metric
        self.db_cls = db_cls
        self.window = window
        self.db = F.normalize(db, dim=1) if metric == "cosine" else db
        self.bias = (db * db).sum(1)[None, :] if metric == "euclidean" else None
        # Members of each class in database order, padded to the largest class with item 0 (masked out).
        members = torch.sort(db_cls, stable=True).indices
        largest = int(class_size.max())
        offsets = torch.cumsum(class_size, 0) - class_size
        slot = torch.arange(largest, device=db.device)
        self.pad = slot[None, :] >= class_size[:, None]
        self.members = torch.where(self.pad, 0, members[(offsets[:, None] + slot).clamp(max=len(db_cls) - 1)])

    def distances(self, query: torch.Tensor) -> torch.Tensor:
        """Ranking keys (smaller = nearer), ``[q, N]``: ``-cos`` or ``|x|^2 - 2 <q, x>``."""
        if self.metric == "cosine":
            return torch.mm(F.normalize(query, dim=1), self.db.T).neg_()
        return torch.addmm(self.bias, query, self.db.T, alpha=-2.0)

    def sorted_relevance(self, dist: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Relevance along the stable ranking, ``[q, N]`` bool."""
        order = torch.sort(dist, dim=1, stable=True).indices
        return self.db_cls[order] == cls[:, None]

    def sorted_ranks(self, dist: torch.Tensor, cls: torch.Tensor, m: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks by a full stable sort; the reference path (and the fallback on ties).

        Args:
            dist: ``[q, N]`` ranking keys.
            cls: ``[q]`` class of each query.
            m: ``[q, L]`` hit counts.

        Returns:
            ``pos`` ``[q, L]`` (0-based rank of the ``m``-th relevant item, 0 where ``m = 0``) and ``head``
            ``[q, window]`` (``H_j`` over the first ranks).
        """
        hits = self.sorted_relevance(dist, cls).cumsum(1, dtype=torch.int32)
        return torch.searchsorted(hits, m.to(hits.dtype)).to(torch.int64), hits[:, : self.window]

    def fast_ranks(self, dist: torch.Tensor, cls: torch.Tensor, m: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same ranks as :meth:`sorted_ranks` without sorting the rows, and ``ok`` ``[q]``: False for a
        row where a tie makes the counting ambiguous (its ``pos`` / ``head`` are then meaningless).

        The ``m``-th relevant item has the ``m``-th smallest relevant distance ``t``; when no other item is at
        distance ``t`` its rank is the number of items nearer than ``t``. All the ``t`` and their successors
        ``nextafter(t, inf)`` go into one sorted boundary list per row, each item is bucketed by one
        ``searchsorted``, and a per-row histogram of the buckets gives ``#{d < t}`` and ``#{d <= t}``.
        """
        rows = len(m)
        rel = dist.gather(1, self.members.index_select(0, cls)).masked_fill_(self.pad.index_select(0, cls),
                                                                            float("inf"))
        rel = torch.sort(rel, dim=1).values
        thr = rel.gather(1, (m - 1).clamp(min=0)).masked_fill_(m == 0, float("-inf"))
        after = torch.nextafter(thr, torch.full_like(thr, float("inf")))
        bounds = torch.sort(torch.cat([thr, after], 1), dim=1).values
        bucket = torch.searchsorted(bounds, dist, right=True, out_int32=True)  # #{bounds <= d}
        width = bounds.shape[1] + 1
        bucket += torch.arange(0, rows * width, width, dtype=torch.int32, device=dist.device)[:, None]
        below = torch.bincount(bucket.view(-1), minlength=rows * width).view(rows, width).cumsum(1)
        # #{d < x} = below[i] for the first i with bounds[i] = x; #{d <= t} = #{d < nextafter(t)}.
        less = below.gather(1, torch.searchsorted(bounds, thr))
        equal = below.gather(1, torch.searchsorted(bounds, after)) - less
        ok = ((equal == 1) | (m == 0)).all(1)
        head, ok_head = self._head(dist, cls)
        return less, head, ok & ok_head

    def _head(self, dist: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``H_j`` over the first ``window`` ranks by ``topk``, ties inside ordered by database index; ``ok``
        is False where an item outside the window ties with the last one inside."""
        size = self.window
        take = min(size + 1, dist.shape[1])
        vals, idx = torch.topk(dist, take, dim=1, largest=False, sorted=True)
        ok = vals[:, size - 1] < vals[:, size] if take > size else torch.ones(len(dist), dtype=torch.bool,
                                                                                 device=dist.device)
        idx, perm = torch.sort(idx[:, :size], dim=1)
        idx = idx.gather(1, torch.sort(vals[:, :size].gather(1, perm), dim=1, stable=True).indices)
        return (self.db_cls[idx] == cls[:, None]).cumsum(1, dtype=torch.int32), ok


def _indistill_scores(pos: torch.Tensor, m: torch.Tensor, head: torch.Tensor, batch: torch.Tensor, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Official AP and top-k precision of each query (fractions, float64).

    Args:
        pos: ``[q, 11]`` rank of the ``h*``-th relevant item of each level (0 where ``h* = 0``).
        m: ``[q, 11]`` the ``h*`` of each level.
        head: ``[q, W]`` ``H_j`` over the first ``W >= min(max(b), N)`` ranks, ``W >= top_k``.
        batch: ``[q]`` size ``b`` of the official evaluation batch of each query.
        top_k: The rank of the precision.

    Returns:
        ``ap`` ``[q]`` and ``precision`` ``[q]``.
    """
    width = head.shape[1]
    cols = torch.arange(width, device=head.device)
    precision = head.to(torch.float64) / (cols + 1)
    # The official "interpolation": max(P_j, ..., P_{b-1}) for j < b - 1 (rows of the batch, not columns).
    inside = cols[None, :] < batch[:, None]
    best = precision.masked_fill(~inside, -1.0).flip(1).cummax(1).values.flip(1)
    level = torch.where(pos < batch[:, None], best.gather(1, pos.clamp(max=width - 1)),
                        m.to(torch.float64) / (pos + 1))
    at_k = torch.where(top_k - 1 < batch, best[:, top_k - 1], precision[:, top_k - 1])
    return level.mean(1), at_k


def _interpolated_scores(relevant: torch.Tensor, m: torch.Tensor, top_k: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook 11-point interpolated AP and plain top-k precision of each query (fractions, float64).

    Precision peaks at relevant items, so the best precision at recall ``>= m / n`` is the best of
    ``i / (rank of the i-th relevant item + 1)`` over ``i >= max(m, 1)``: a suffix maximum over the ``n`` hits
    of a row instead of its ``N`` ranks.

    Args:
        relevant: ``[q, N]`` relevance along the ranking.
        m: ``[q, 11]`` least hit count of each level (the last one is ``n``, all the relevant items).
        top_k: The rank of the precision.

    Returns:
        ``ap`` ``[q]`` and ``precision`` ``[q]``.
    """
    row, rank = relevant.nonzero(as_tuple=True)  # row-major: each row's hits in rank order
    count = m[:, -1]
    hit = torch.arange(len(rank), device=rank.device) - (count.cumsum(0) - count)[row]  # 0-based hit index
    best = torch.zeros(len(relevant), int(count.max()), dtype=torch.float64, device=relevant.device)
    best[row, hit] = (hit + 1).to(torch.float64) / (rank + 1)
    best = best.flip(1).cummax(1).values.flip(1)  # the best precision at this hit or deeper
    ap = best.gather(1, (m - 1).clamp(min=0)).mean(1)
    return ap, relevant[:, :top_k].sum(1).to(torch.float64) / top_k
