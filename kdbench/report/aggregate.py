"""Runs table -> leaderboard cells: statistics over seeds, paired gain over the baseline, ranks.

A *cell* is one (dataset, protocol hash, teacher, student, method label); its seeds are averaged. Cells
are grouped into *groups* (same dataset, protocol hash, teacher, student: one table in the markdown) and
groups into *tables* (same dataset and protocol hash). Records of different protocol hashes are never
compared: they land in different tables.

Headline number: last-epoch test top-1, mean ± sample std over seeds, with the 95% t-interval of the mean
(:mod:`kdbench.report.stats`). The test top-1 at the epoch of best *validation* top-1 is a secondary,
flagged column; nothing is ever selected on test.

:data:`PAIRED_METRICS` are the columns summarised and compared with the baseline in the same way (mean ± std,
t-interval, paired gain over the baseline per seed): the headline, and the retrieval mAPs (cosine, Euclidean)
of a protocol that measures them (``protocol.retrieval_tap``). Ranks use the headline only.

Rank rule (within a group, over the cells with at least two finished seeds):

1. Order the cells by mean top-1, highest first (ties by method label; means equal to
   :data:`MEAN_TIE_DECIMALS` decimals are ties, so that a board built from the records and one rebuilt from
   ``runs.csv``, whose values keep 6 decimals, order them alike).
2. Walk down that order. The first cell opens tier 1. Each next cell joins the current tier unless it is
   *below* some cell already in the tier: the paired difference ``this - that`` over the seeds both
   finished (at least two) has a 95% t-interval lying entirely below 0
   (:attr:`kdbench.report.stats.PairedDelta.below_zero`). Then it opens a new tier, and a note names the
   cell it is below and that paired difference.
3. Every cell of a tier gets rank ``1 + (number of cells in better tiers)`` (competition ranking:
   1, 1, 3, ...).

Two cells with fewer than two seeds in common cannot be separated (they are treated as not different),
and neither can a cell whose paired difference lies entirely *above* 0 although its mean is lower (only
possible when the two share some of their seeds, not all: the evidence disagrees). So no cell is
paired-below another cell of the same rank, and no cell ranks better than a cell with a higher mean; a
worse rank means that, walking down the means, some paired difference excluded 0 (not necessarily against
every cell above it). A cell with a single finished seed pairs with nothing, so it is not ranked (its
note says so) rather than being given a rank no data supports.

Tuned tables (:mod:`kdbench.tuning`): a table (dataset, protocol hash) with at least one final tuned run has
two *variants* of every cell, told apart where rows are grouped (:func:`build_cells`, the only place): the
tuned runs keep the method label and are the headline; the untuned runs (the configured values) become the
cell ``<label> (untuned)`` (:data:`UNTUNED_SUFFIX`). Each variant is a leaderboard of its own inside the
group: its own baseline (``baseline`` vs ``baseline (untuned)``: the student alone is tuned too), its own
paired gains and its own ranks. A tuned cell and its untuned *twin* are linked (:attr:`LeaderboardCell.twin`)
for the tuning delta (tuned minus untuned mean top-1) and :func:`tuning_effect` (how many methods beat the
student alone before and after tuning, which moved most, Kendall's tau between the two orders). Tables
without tuned runs have no variants: every cell's ``variant`` is ``None`` and nothing changes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdbench.report import _format as fmt
from kdbench.report.published import Published, published_result, published_teacher
from kdbench.report.records import TUNED, trial_means
from kdbench.report.stats import Kendall, PairedDelta, Summary, kendall_tau, paired_delta, summarize

_logger = logging.getLogger(__name__)

BASELINE = "baseline"
HEADLINE = "test_top1"
#: Runs-table column -> its name in ``leaderboard.csv``: the metrics with mean ± std and a paired gain over the
#: baseline (the headline first; the others only where runs have them).
PAIRED_METRICS = {HEADLINE: "top1", "map_cosine": "map_cosine", "map_euclidean": "map_euclidean"}
#: The variants of a cell in a tuned table: the final tuned runs (the headline) and the untuned runs.
TUNED_VARIANT = "tuned"
UNTUNED_VARIANT = "untuned"
#: Appended to the label of the untuned cells of a tuned table (their ``method`` in ``leaderboard.csv``).
UNTUNED_SUFFIX = " (untuned)"


@dataclass(eq=False)
class LeaderboardCell:
    """One leaderboard row: a (dataset, protocol, teacher, student, method label) over its seeds.

    Attributes:
        key: ``(dataset, protocol_hash, teacher, student, method)``.
        runs: Finished runs (``status == "ok"``), sorted by seed.
        skipped: Skipped runs.
        stats: Each :data:`PAIRED_METRICS` column over the finished seeds (``top1`` is the headline's).
        best_val_top1: Test top-1 at the best-validation epoch (secondary).
        deltas: Paired gain over the group's baseline of each :data:`PAIRED_METRICS` column (none for the
            baseline itself and when the group has no baseline; ``delta`` is the headline's).
        rank: Rank in the group (``None`` with fewer than two finished seeds), among the cells of its variant.
        notes: Human-readable remarks (skips, missing pairs, differing provenance, ...).
        variant: :data:`TUNED_VARIANT` or :data:`UNTUNED_VARIANT` in a tuned table, ``None`` otherwise.
        twin: The other variant of the same (teacher, student, label), if the group has it.
    """

    key: tuple[str, str, str, str, str]
    runs: list[Mapping[str, Any]] = field(default_factory=list)
    skipped: list[Mapping[str, Any]] = field(default_factory=list)
    stats: dict[str, Summary] = field(default_factory=dict)
    best_val_top1: Summary = field(default_factory=Summary.empty)
    deltas: dict[str, PairedDelta] = field(default_factory=dict)
    rank: int | None = None
    published: Published | None = None
    notes: list[str] = field(default_factory=list)
    variant: str | None = None
    twin: LeaderboardCell | None = None

    @property
    def dataset(self) -> str:
        return self.key[0]

    @property
    def protocol_hash(self) -> str:
        return self.key[1]

    @property
    def teacher(self) -> str:
        return self.key[2]

    @property
    def student(self) -> str:
        return self.key[3]

    @property
    def method(self) -> str:
        return self.key[4]

    @property
    def label(self) -> str:
        """The method label of the config (``method`` without :data:`UNTUNED_SUFFIX`)."""
        return self.first("method") or self.method

    @property
    def tuned(self) -> bool:
        """Whether the cell holds final tuned runs."""
        return self.variant == TUNED_VARIANT

    def tuning(self, name: str) -> Any:
        """A field of a tuned cell's selection (``trials``, ``selected_trial``, ``values``, ... : the runs
        table's ``tuning.<name>``); ``None`` for an untuned cell."""
        return self.first(f"tuning.{name}") if self.tuned else None

    @property
    def selected_values(self) -> dict[str, Any] | None:
        """The values the tuned runs ran with (knob -> value), ``None`` for an untuned cell."""
        values = self.tuning("values")
        return json.loads(values) if isinstance(values, str) else values

    @property
    def trial_means(self) -> list[float]:
        """Every trial's mean validation score, in trial order (trial 0: the configured values); ``[]`` if
        none."""
        return next((m for r in (self.runs if self.tuned else ()) if (m := trial_means(r))), [])

    @property
    def tuning_delta(self) -> float | None:
        """Tuned minus untuned mean test top-1 of the cell (on the tuned cell; ``None`` without both)."""
        if not self.tuned or self.twin is None or self.top1.mean is None or self.twin.top1.mean is None:
            return None
        return self.top1.mean - self.twin.top1.mean

    @property
    def all_runs(self) -> list[Mapping[str, Any]]:
        return sorted([*self.runs, *self.skipped], key=lambda r: r["seed"])

    def first(self, column: str) -> Any:
        """The first non-empty value of ``column`` over the cell's runs (finished ones first)."""
        for row in [*self.runs, *self.skipped]:
            if row.get(column) not in (None, ""):
                return row[column]
        return None

    def mean_of(self, column: str) -> float | None:
        """Mean of ``column`` over the finished seeds (``None`` when no seed has it)."""
        return summarize([r.get(column) for r in self.runs]).mean

    @property
    def method_name(self) -> str:
        return self.first("method_name")

    @property
    def teacher_model(self) -> str:
        return self.first("teacher_model")

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]

    def stat(self, column: str) -> Summary:
        """``column`` over the finished seeds (:data:`PAIRED_METRICS`; empty when no seed has it)."""
        return self.stats.get(column, Summary.empty())

    @property
    def top1(self) -> Summary:
        """Last-epoch test top-1 over seeds (the headline)."""
        return self.stat(HEADLINE)

    @top1.setter
    def top1(self, value: Summary) -> None:
        self.stats[HEADLINE] = value

    @property
    def delta(self) -> PairedDelta | None:
        """The headline's paired gain over the group's baseline."""
        return self.deltas.get(HEADLINE)

    def by_seed(self, column: str) -> dict[int, float]:
        """``column`` of each finished seed that has it (the values the paired comparisons use)."""
        return {r["seed"]: r[column] for r in self.runs if r.get(column) is not None}

    @property
    def top1_by_seed(self) -> dict[int, float]:
        """Last-epoch test top-1 of each finished seed."""
        return self.by_seed(HEADLINE)

    @property
    def status(self) -> str:
        """``ok`` (every seed finished), ``partial`` (some skipped) or ``skipped``."""
        if not self.runs:
            return "skipped"
        return "partial" if self.skipped else "ok"

    @property
    def skip_reason(self) -> str:
        """The distinct skip reasons of the cell's skipped seeds, joined."""
        return "; ".join(dict.fromkeys(r["skip_reason"] for r in self.skipped))

    @property
    def live_teacher(self) -> bool:
        return any(bool(r.get("req.live_teacher")) for r in self.all_runs)

    @property
    def live_teacher_tail(self) -> bool:
        """Whether the method ran part of the teacher (its tail) live on its own inputs (ScaleKD's last stage,
        ``Requirements.live_teacher_tail``): the requirement, or the tail compute in a finished run's audit."""
        return any(
            bool(r.get("req.live_teacher_tail")) or r.get("teacher_tail_forward") is not None
            for r in self.runs
        )

    @property
    def teacher_source(self) -> str:
        """How the teacher's outputs reached the student.

        ``live (required)``: the method needs the teacher module online; ``live``: the teacher ran although
        the method could read a cache (no store was given); ``cache``: only stored outputs were read;
        ``cache + live tail``: stored outputs, and the method ran the teacher's tail live on its own inputs
        (``live + live tail`` when no store was given); ``none``: no teacher signal (the baseline); ``""``
        without a finished run.
        """
        if not self.runs:
            return ""
        if self.live_teacher:
            return "live (required)"
        ran = any((r.get("teacher_forward") or 0) > 0 for r in self.runs)
        if self.live_teacher_tail:
            return f"{'live' if ran else 'cache'} + live tail"
        if ran:
            return "live"
        if self.method_name == BASELINE or not any((r.get("cache_bytes_read") or 0) > 0 for r in self.runs):
            return "none"
        return "cache"

    @property
    def views_note(self) -> str:
        """``"V views / E epochs"`` plus ``", views repeat"`` when E > V; ``""`` when unknown."""
        count, epochs = self.first("views_count"), self.first("views_epochs")
        if count is None or epochs is None:
            return ""
        repeat = self.first("views_repeat")
        repeat = epochs > count if repeat is None else repeat
        return f"{count} views / {epochs} epochs" + (", views repeat" if repeat else "")

    def params_json(self) -> str:
        """The method's hyper-parameters as compact JSON (from the ``param.*`` columns)."""
        params = {
            k[len("param.") :]: v for k, v in (self.runs or self.skipped)[0].items() if k.startswith("param.")
        }
        return json.dumps({k: v for k, v in params.items() if v is not None}, sort_keys=True)


@dataclass(eq=False)
class Group:
    """The cells of one (dataset, protocol hash, teacher, student), in display order.

    Attributes:
        key: ``(dataset, protocol_hash, teacher, student)``.
        cells: Ranked cells first (by rank, then mean), then cells with no finished seed.
        teacher_top1: Teacher's own test top-1 over the group's runs.
        teacher_published: The teacher's published top-1, if known.
        baseline: The baseline cell, if the group has one.
        notes: Group-level remarks.
    """

    key: tuple[str, str, str, str]
    cells: list[LeaderboardCell]
    teacher_top1: Summary
    teacher_published: Published | None
    baseline: LeaderboardCell | None
    notes: list[str] = field(default_factory=list)
    baselines: dict[str | None, LeaderboardCell | None] = field(default_factory=dict)
    variant_notes: dict[str | None, list[str]] = field(default_factory=dict)

    @property
    def tuned(self) -> bool:
        """Whether the group belongs to a tuned table (its cells have variants)."""
        return any(c.variant is not None for c in self.cells)

    def baseline_for(self, cell: LeaderboardCell) -> LeaderboardCell | None:
        """The baseline ``cell``'s gains are over: the one of its own variant."""
        return self.baselines.get(cell.variant) if self.baselines else self.baseline

    def variant_cells(self, variant: str | None) -> list[LeaderboardCell]:
        """The cells of one variant, in display order."""
        return [c for c in self.cells if c.variant == variant]

    @property
    def teacher_model(self) -> str:
        return self.cells[0].teacher_model

    @property
    def title(self) -> str:
        return f"{self.key[2]} ({self.teacher_model}) → {self.key[3]}"


@dataclass
class Table:
    """All groups of one (dataset, protocol hash)."""

    dataset: str
    protocol_hash: str
    groups: list[Group]

    @property
    def cells(self) -> list[LeaderboardCell]:
        return [c for g in self.groups for c in g.cells]

    @property
    def slug(self) -> str:
        """A file-name-safe identifier of the table."""
        return "".join(
            ch if ch.isalnum() or ch in "-_" else "-" for ch in f"{self.dataset}_{self.protocol_hash}"
        )


def build_cells(rows: Sequence[Mapping[str, Any]]) -> list[LeaderboardCell]:
    """Groups runs-table rows into cells and computes each cell's own statistics (no ranks or deltas).

    Args:
        rows: Rows of the runs table.

    Returns:
        The cells, in the order of their keys.
    """
    cells: dict[tuple, LeaderboardCell] = {}
    tuned_tables = {(r["dataset"], r["protocol_hash"]) for r in rows if r.get(TUNED)}
    for row in rows:
        label, variant = row["method"], None
        if (row["dataset"], row["protocol_hash"]) in tuned_tables:  # the one place variants are told apart
            variant = TUNED_VARIANT if row.get(TUNED) else UNTUNED_VARIANT
            label += UNTUNED_SUFFIX if variant == UNTUNED_VARIANT else ""
        key = (row["dataset"], row["protocol_hash"], row["teacher"], row["student"], label)
        cell = cells.setdefault(key, LeaderboardCell(key, variant=variant))
        (cell.runs if row["status"] == "ok" else cell.skipped).append(row)
    for key, cell in cells.items():
        if cell.variant == TUNED_VARIANT and (twin := cells.get((*key[:4], key[4] + UNTUNED_SUFFIX))):
            cell.twin, twin.twin = twin, cell
    for cell in cells.values():
        cell.runs.sort(key=lambda r: r["seed"])
        cell.skipped.sort(key=lambda r: r["seed"])
        cell.stats = {column: summarize([r.get(column) for r in cell.runs]) for column in PAIRED_METRICS}
        cell.best_val_top1 = summarize([r["test_top1_at_best_val"] for r in cell.runs])
        cell.published = published_result(cell.dataset, cell.teacher_model, cell.student, cell.method_name)
        _cell_notes(cell)
    return [cells[k] for k in sorted(cells)]


def _cell_notes(cell: LeaderboardCell) -> None:
    if cell.skipped:
        seeds = ", ".join(str(r["seed"]) for r in cell.skipped)
        cell.notes.append(f"skipped seed(s) {seeds}: {cell.skip_reason}")
    param_sets = {
        json.dumps({k: v for k, v in r.items() if k.startswith("param.")}, sort_keys=True) for r in cell.runs
    }
    if len(param_sets) > 1:
        cell.notes.append("hyper-parameters differ across seeds")
    names = {r["method_name"] for r in cell.all_runs}
    if len(names) > 1:
        cell.notes.append(f"label used by several methods: {', '.join(sorted(names))}")
    if cell.tuned and len({str(r.get("tuning.values")) for r in cell.runs}) > 1:
        cell.notes.append("selected values differ across seeds")
    differing = sorted(
        {c for r in cell.all_runs for c in (r.get("provenance_differs") or "").split(";") if c}
    )
    if differing:
        n = sum(bool(r.get("provenance_differs")) for r in cell.all_runs)
        cell.notes.append(f"provenance differs in {n} run(s): {', '.join(differing)}")


MIN_SEEDS_TO_RANK = 2
# Means that agree to this many decimals (points of top-1) are ties for the order: far finer than any test set's
# accuracy step (100 / 50,000 images = 0.002), far coarser than the float noise of a mean of rounded values.
MEAN_TIE_DECIMALS = 4


def _below(
    cell: LeaderboardCell, tier: Sequence[LeaderboardCell]
) -> tuple[LeaderboardCell, PairedDelta] | None:
    """The first cell of ``tier`` that ``cell`` is paired-below (interval of the difference < 0), if any."""
    for member in tier:
        d = paired_delta(cell.top1_by_seed, member.top1_by_seed, MIN_SEEDS_TO_RANK)
        if d.below_zero:
            return member, d
    return None


def _by_mean(cell: LeaderboardCell) -> tuple[float, str]:
    """Highest mean top-1 first, equal means (to :data:`MEAN_TIE_DECIMALS`) by method label."""
    return -round(cell.top1.mean or 0.0, MEAN_TIE_DECIMALS), cell.method


def rank_cells(cells: Sequence[LeaderboardCell]) -> None:
    """Sets ``rank`` on the cells of one group by the paired tier rule of this module's docstring.

    Args:
        cells: The cells of one group; those with fewer than :data:`MIN_SEEDS_TO_RANK` finished seeds
            keep ``rank = None`` and get a note. A cell opening a tier below the first gets a note naming
            the cell it is below and the paired difference.
    """
    for c in cells:
        if c.top1.n == 1:
            c.notes.append(f"not ranked: 1 seed (a rank needs {MIN_SEEDS_TO_RANK} paired seeds)")
    ordered = sorted((c for c in cells if c.top1.n >= MIN_SEEDS_TO_RANK), key=_by_mean)
    tier: list[LeaderboardCell] = []
    rank = 1
    for position, cell in enumerate(ordered, 1):
        below = _below(cell, tier)
        if below is not None:
            tier, rank = [], position
            cell.notes.append(f"ranked below {below[0].method}: paired Δ {fmt.delta(below[1])}")
        tier.append(cell)
        cell.rank = rank


def _pick_baseline(cells: Sequence[LeaderboardCell], group_notes: list[str]) -> LeaderboardCell | None:
    baselines = [c for c in cells if c.method_name == BASELINE]
    if not baselines:
        return None
    if len(baselines) > 1:
        chosen = next((c for c in baselines if c.label == BASELINE), baselines[0])
        group_notes.append(
            f"several baseline cells ({', '.join(c.method for c in baselines)}); "
            f"deltas are against {chosen.method!r}"
        )
        return chosen
    return baselines[0]


def _teacher_summary(cells: Sequence[LeaderboardCell], group_notes: list[str]) -> Summary:
    # Runs distilled from their own assistant (TAKD) record the assistant's top-1: left out.
    values = [
        r["teacher_test_top1"]
        for c in cells
        for r in c.runs
        if r.get("teacher_test_top1") is not None and r.get("assistant_time_s") is None
    ]
    distinct = sorted(set(values))
    if len(distinct) > 1:
        group_notes.append(
            f"teacher test top-1 differs across runs ({distinct[0]:.2f}-{distinct[-1]:.2f}); "
            "check the teacher digest"
        )
    return summarize(values)


def _variant_order(variant: str | None) -> int:
    return 1 if variant == UNTUNED_VARIANT else 0


def build_group(
    key: tuple[str, str, str, str],
    cells: list[LeaderboardCell],
    fallback: LeaderboardCell | Mapping[str | None, LeaderboardCell] | None = None,
) -> Group:
    """Ranks the cells of a group and computes each cell's paired gain over the group's baseline.

    In a tuned table each variant is handled on its own (its own baseline, gains and ranks);
    ``Group.baseline`` is the headline variant's.

    Args:
        key: ``(dataset, protocol_hash, teacher, student)``.
        cells: The group's cells.
        fallback: A baseline cell of the same dataset, protocol and student under another teacher (per
            variant: a mapping variant -> cell), used (and named in a note) when the group has none: the
            student alone does not depend on the teacher.
    """
    fallbacks = {None: fallback} if isinstance(fallback, LeaderboardCell) else dict(fallback or {})
    variants = sorted({c.variant for c in cells}, key=_variant_order)
    baselines: dict[str | None, LeaderboardCell | None] = {}
    variant_notes: dict[str | None, list[str]] = {}
    for variant in variants:
        members = [c for c in cells if c.variant == variant]
        notes = variant_notes.setdefault(variant, [])
        baseline = _pick_baseline(members, notes)
        if baseline is None and fallbacks.get(variant) is not None:
            baseline = fallbacks[variant]
            notes.append(
                f"no baseline run under teacher {key[2]}; deltas are against the baseline of teacher "
                f"{baseline.teacher} "
                "(same student, protocol and seeds; the student alone does not depend on the teacher)"
            )
        if baseline is None:
            notes.append("no baseline cell (method 'baseline'): no deltas")
        else:
            for cell in members:
                if cell is not baseline:
                    cell.deltas = {
                        column: paired_delta(cell.by_seed(column), baseline.by_seed(column))
                        for column in PAIRED_METRICS
                        if column == HEADLINE or cell.stat(column).n
                    }
        rank_cells(members)
        baselines[variant] = baseline
    cells = sorted(
        cells,
        key=lambda c: (
            _variant_order(c.variant), c.rank is None, c.rank or 0, *_by_mean(c)
        ),
    )
    notes = [f"{v} runs: {n}" if v == UNTUNED_VARIANT else n for v in variants for n in variant_notes[v]]
    teacher = _teacher_summary(cells, notes)
    dataset, teacher_model = key[0], cells[0].teacher_model
    headline = baselines.get(variants[0]) if variants else None
    return Group(key, cells, teacher, published_teacher(dataset, teacher_model), headline, notes, baselines,
                 variant_notes)


def build_tables(rows: Sequence[Mapping[str, Any]]) -> list[Table]:
    """The whole leaderboard from the runs table: tables of groups of ranked cells.

    Args:
        rows: Rows of the runs table (with ``provenance_differs`` already set, if wanted in the notes).

    Returns:
        One :class:`Table` per (dataset, protocol hash), sorted.
    """
    groups: dict[tuple, list[LeaderboardCell]] = {}
    for cell in build_cells(rows):
        groups.setdefault(cell.key[:4], []).append(cell)
    baselines: dict[tuple, list[LeaderboardCell]] = {}
    for key, cells in sorted(groups.items()):
        for c in cells:  # per variant: a tuned cell's gain is over a tuned baseline, an untuned one's untuned
            if c.method_name == BASELINE and c.runs:
                baselines.setdefault((key[0], key[1], key[3], c.variant), []).append(c)
    tables: dict[tuple[str, str], list[Group]] = {}
    for key, cells in sorted(groups.items()):
        variants = sorted({c.variant for c in cells}, key=_variant_order)
        fallback = {v: found[0] for v in variants if (found := baselines.get((key[0], key[1], key[3], v)))}
        tables.setdefault(key[:2], []).append(build_group(key, cells, fallback))
    out = [Table(ds, ph, gs) for (ds, ph), gs in sorted(tables.items())]
    per_dataset = Counter(t.dataset for t in out)
    for ds, n in per_dataset.items():
        if n > 1:
            _logger.warning(
                "dataset %s has records from %d protocols; they are reported in separate tables", ds, n
            )
    return out


def protocols_per_dataset(tables: Sequence[Table]) -> dict[str, list[str]]:
    """Protocol hashes per dataset (more than one means the tables must not be compared)."""
    out: dict[str, list[str]] = {}
    for t in tables:
        out.setdefault(t.dataset, []).append(t.protocol_hash)
    return out


def summary_columns(column: str) -> tuple[str, str, str]:
    """The ``leaderboard.csv`` columns of a :data:`PAIRED_METRICS` column's mean, std and 95% half width."""
    name = PAIRED_METRICS[column]
    return f"{name}_mean", f"{name}_std", f"{name}_ci95"


def delta_columns(column: str) -> tuple[str, str, str, str, str]:
    """The ``leaderboard.csv`` columns of a :data:`PAIRED_METRICS` column's paired gain over the baseline
    (the headline's are unprefixed): mean, 95% interval, paired seeds, note."""
    p = "" if column == HEADLINE else f"{PAIRED_METRICS[column]}_"
    return (
        f"{p}delta_vs_baseline",
        f"{p}delta_ci95_low",
        f"{p}delta_ci95_high",
        f"{p}delta_n",
        f"{p}delta_note",
    )


# The headline statistics of a cell in leaderboard.csv (also what a comparison of two leaderboards reads).
TOP1_COLUMNS = summary_columns(HEADLINE)
DELTA_COLUMNS = delta_columns(HEADLINE)
# Retrieval (empty where the protocol does not measure it): each mAP as top-1, then the top-100 precisions.
RETRIEVAL_COLUMNS = (
    *(
        c
        for column in PAIRED_METRICS
        if column != HEADLINE
        for c in summary_columns(column) + delta_columns(column)
    ),
    "p100_cosine",
    "p100_euclidean",
)

# A tuned table's columns (empty in an untuned table; appended last so older snapshots still line up).
TUNING_COLUMNS = (
    "tuned",
    "trials",
    "selected_trial",
    "selected_values",
    "tuning_time_s",
    "untuned_top1_mean",
    "tuning_delta",
    "val_default",
    "val_selected",
)

LEADERBOARD_COLUMNS = (
    "dataset",
    "protocol_hash",
    "teacher",
    "teacher_model",
    "teacher_test_top1",
    "student",
    "student_params",
    "method",
    "method_name",
    "params",
    "status",
    "seeds",
    "seed_list",
    "n_skipped",
    "skip_reason",
    "rank",
    *TOP1_COLUMNS,
    *DELTA_COLUMNS,
    "best_val_test_top1_mean",
    "best_val_test_top1_std",
    "best_epoch_mean",
    "teacher_agreement",
    "retrieval_tap",
    *RETRIEVAL_COLUMNS,
    "wall_time_s",
    "train_time_s",
    "teacher_forward",
    "teacher_tail_forward",
    "teacher_tail_params",
    "teacher_params",
    "student_forward",
    "cache_bytes_read",
    "extra_params",
    "assistant_time_s",
    "assistant_candidates",
    "live_teacher",
    "live_teacher_tail",
    "teacher_source",
    "views_count",
    "views_epochs",
    "views_note",
    "published_top1",
    "published_source",
    "notes",
    *TUNING_COLUMNS,
)


def cell_row(cell: LeaderboardCell, group: Group) -> dict[str, Any]:
    """The machine-readable leaderboard row of a cell (``leaderboard.csv``, :data:`LEADERBOARD_COLUMNS`).

    ``best_val_test_top1_*`` is the secondary number (test top-1 at the epoch chosen on validation); cost
    columns are means over the finished seeds. ``teacher_forward`` counts full teacher forwards,
    ``teacher_tail_forward`` the samples through a live teacher tail (``teacher_tail_params`` of the teacher's
    ``teacher_params``; empty without a live tail or when the record does not say).
    """
    paired = {k: v for column in PAIRED_METRICS for k, v in _paired_values(cell, group, column).items()}
    return {
        "dataset": cell.dataset,
        "protocol_hash": cell.protocol_hash,
        "teacher": cell.teacher,
        "teacher_model": cell.teacher_model,
        "teacher_test_top1": group.teacher_top1.mean,
        "student": cell.student,
        "student_params": cell.first("student_params"),
        "method": cell.method,
        "method_name": cell.method_name,
        "params": cell.params_json(),
        "status": cell.status,
        "seeds": cell.top1.n,
        "seed_list": " ".join(str(s) for s in cell.seeds),
        "n_skipped": len(cell.skipped),
        "skip_reason": cell.skip_reason,
        "rank": cell.rank,
        **paired,
        "best_val_test_top1_mean": cell.best_val_top1.mean,
        "best_val_test_top1_std": cell.best_val_top1.std,
        "best_epoch_mean": cell.mean_of("best_epoch"),
        "teacher_agreement": cell.mean_of("teacher_agreement"),
        "retrieval_tap": cell.first("retrieval_tap"),
        "p100_cosine": cell.mean_of("p100_cosine"),
        "p100_euclidean": cell.mean_of("p100_euclidean"),
        "wall_time_s": cell.mean_of("wall_time_s"),
        "train_time_s": cell.mean_of("train_time_s"),
        "teacher_forward": cell.mean_of("teacher_forward"),
        "teacher_tail_forward": cell.mean_of("teacher_tail_forward"),
        "teacher_tail_params": cell.first("teacher_tail_params"),
        "teacher_params": cell.first("teacher_params"),
        "student_forward": cell.mean_of("student_forward"),
        "cache_bytes_read": cell.mean_of("cache_bytes_read"),
        "extra_params": cell.first("extra_params"),
        "assistant_time_s": cell.mean_of("assistant_time_s"),
        "assistant_candidates": cell.first("assistant_candidates"),
        "live_teacher": cell.live_teacher,
        "live_teacher_tail": cell.live_teacher_tail,
        "teacher_source": cell.teacher_source,
        "views_count": cell.first("views_count"),
        "views_epochs": cell.first("views_epochs"),
        "views_note": cell.views_note,
        "published_top1": cell.published.top1 if cell.published else None,
        "published_source": cell.published.source if cell.published else "",
        "notes": "; ".join(cell.notes),
        **tuning_values(cell),
    }


def tuning_values(cell: LeaderboardCell) -> dict[str, Any]:
    """The tuning columns of ``leaderboard.csv`` (:data:`TUNING_COLUMNS`).

    ``tuned`` is ``true``/``false`` in a tuned table and empty elsewhere; the others are filled on tuned rows
    only: the K trials, the selected trial (0: the configured values won) and values (compact JSON, knob ->
    value), the tuning cost (the cell's trial wall time summed, as the selection records it), the untuned
    twin's mean test top-1, the tuning delta (tuned minus untuned mean test top-1 of the cell) and the val
    scores (mean over the budget's seeds) of the configured and the selected values.
    """
    return {
        "tuned": None if cell.variant is None else cell.tuned,
        "trials": cell.tuning("trials"),
        "selected_trial": cell.tuning("selected_trial"),
        "selected_values": cell.tuning("values"),
        "tuning_time_s": cell.tuning("tuning_time_s"),
        "untuned_top1_mean": cell.twin.top1.mean if cell.tuned and cell.twin is not None else None,
        "tuning_delta": cell.tuning_delta,
        "val_default": cell.tuning("default_score"),
        "val_selected": cell.tuning("selected_score"),
    }


def _paired_values(cell: LeaderboardCell, group: Group, column: str) -> dict[str, Any]:
    """A :data:`PAIRED_METRICS` column's statistics and paired gain in ``leaderboard.csv``
    (:func:`summary_columns`, :func:`delta_columns`)."""
    s, d = cell.stat(column), cell.deltas.get(column)
    if d is not None:
        note = d.note
    elif column != HEADLINE and not s.n:
        note = ""  # not measured
    else:
        note = "baseline" if cell is group.baseline_for(cell) else "no baseline in group"
    gain = (d.diff.mean, d.diff.low, d.diff.high, len(d.seeds)) if d else (None, None, None, None)
    return dict(zip(summary_columns(column) + delta_columns(column), (s.mean, s.std, s.ci95, *gain, note)))


def leaderboard_rows(tables: Sequence[Table]) -> list[dict[str, Any]]:
    """Every cell of every table as a :func:`cell_row`, in display order."""
    return [cell_row(c, g) for t in tables for g in t.groups for c in g.cells]


# --- what tuning changed -----------------------------------------------------------------------------------


def beats_baseline(cell: LeaderboardCell) -> bool:
    """Whether a method beats the student alone of its own variant: mean paired gain over the baseline > 0
    and its paired 95% t-interval entirely above 0."""
    d = cell.delta
    return d is not None and d.diff.mean is not None and d.diff.mean > 0 and (d.diff.low or 0.0) > 0


@dataclass
class TuningEffect:
    """What tuning changed in one group of a tuned table.

    Attributes:
        beat_untuned, beat_tuned: The methods (labels; the student alone is not one) that beat the student
            alone (:func:`beats_baseline`) before and after tuning.
        methods_untuned, methods_tuned: The methods with a finished run in each variant (the denominators).
        moved: ``(label, tuned - untuned mean test top-1)`` of the cell that moved most (largest absolute
            change; the student alone included), ``None`` without a cell in both variants.
        kendall: Kendall's tau-b between the untuned and the tuned order by mean test top-1, over the labels
            with a finished run in both variants (the student alone included).
    """

    beat_untuned: list[str]
    beat_tuned: list[str]
    methods_untuned: int
    methods_tuned: int
    moved: tuple[str, float] | None
    kendall: Kendall


def tuning_effect(group: Group) -> TuningEffect | None:
    """The :class:`TuningEffect` of a group of a tuned table (``None`` for an untuned table)."""
    if not group.tuned:
        return None
    methods = {
        v: [c for c in group.variant_cells(v) if c.runs and c.method_name != BASELINE]
        for v in (UNTUNED_VARIANT, TUNED_VARIANT)
    }
    beat = {v: sorted(c.label for c in cells if beats_baseline(c)) for v, cells in methods.items()}
    pairs = [c for c in group.variant_cells(TUNED_VARIANT) if c.tuning_delta is not None]
    moved = max(pairs, key=lambda c: (abs(c.tuning_delta), c.label), default=None)
    kendall = kendall_tau({c.label: c.twin.top1.mean for c in pairs}, {c.label: c.top1.mean for c in pairs})
    return TuningEffect(
        beat[UNTUNED_VARIANT],
        beat[TUNED_VARIANT],
        len(methods[UNTUNED_VARIANT]),
        len(methods[TUNED_VARIANT]),
        (moved.label, moved.tuning_delta) if moved else None,
        kendall,
    )
