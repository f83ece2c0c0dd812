"""The human-readable leaderboard: captions, headers and text cells shared by markdown and HTML.

Markdown and HTML render exactly the same :class:`DisplayTable` per group, so the two can never disagree.
A group of a tuned table (:mod:`kdbench.tuning`) shows two: the tuned cells (the headline; their tuning, the
untuned result beside, the tuning delta and the tuning time), then the untuned cells (the configured values,
gains over the untuned student alone); its table opens with a "Tuning" paragraph (:func:`tuning_paragraph`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdbench import __version__
from kdbench.report import _format as fmt
from kdbench.report.aggregate import (
    BASELINE,
    HEADLINE,
    PAIRED_METRICS,
    TUNED_VARIANT,
    UNTUNED_VARIANT,
    Group,
    LeaderboardCell,
    Table,
    protocols_per_dataset,
    tuning_effect,
)
from kdbench.report.audit import stable
from kdbench.report.provenance import ProvenanceField
from kdbench.report.published import Published
from kdbench.report.records import DIRTY_FILES, split_dirty_files
from kdbench.report.stats import Kendall

TEACHER_FWD = "Teacher fwd (images)"

_LEGEND = (
    (
        "**Top-1 (last epoch)** is the headline: test top-1 (%) of the last epoch, mean ± sample std "
        "(ddof 1) over seeds."
    ),
    (
        "**95% CI** is the half width of the Student-t interval of the mean, t(0.975, n−1)·std/√n (t from a "
        "table for df ≤ 30, 1.960 beyond)."
    ),
    (
        "**Δ vs baseline** is the mean over seeds of the paired difference (method − student alone, same "
        "seed) with its paired 95% t-interval over the seeds both ran; it needs at least 2 such seeds."
    ),
    (
        "**Rank** (within a teacher→student table, over cells with at least 2 seeds): cells are ordered by "
        "mean; walking down, a cell joins the current tier unless its paired difference with some cell "
        "already in the tier (per-seed difference over the seeds both ran, at least 2) has a 95% t-interval "
        "entirely below 0; then it starts a new tier and its note names that cell and the difference. Two "
        "cells with fewer than 2 seeds in common count as not separable. A tier shares the rank "
        "1 + (cells in better tiers), so no cell is paired-below another cell of its rank, and no cell ranks "
        "better than one with a higher mean. A cell with a single seed is not ranked."
    ),
    (
        "**Top-1 @ best-val epoch†** is secondary: the test top-1 at the epoch with the best *validation* "
        "top-1 (model selection never uses test)."
    ),
    (
        "**Agreement**: % of test images where student and teacher argmax agree. Cost columns are means per "
        "run. **Teacher**: how the teacher's outputs reached the student: `cache` = read from the "
        "teacher-output store; `live` = the teacher ran during training, `live (required)` when the method "
        f"needs the teacher module online. **{TEACHER_FWD}**: training images the teacher forwarded during "
        "the student's training, summed over epochs (0 when its outputs came from the store; the teacher's "
        "own training, the store build and evaluation are not counted)."
    ),
)
# Headers of the paired metrics beside the headline (each shown, with its Δ, when a run of the group has it).
METRIC_HEADERS = {"map_cosine": "mAP (cosine)", "map_euclidean": "mAP (Euclidean)"}
_LEGEND_RETRIEVAL = (
    "**mAP (cosine)**, **mAP (Euclidean)**: retrieval mean average precision (%, 11 recall levels, InDistill's "
    "official protocol) of the student's embedding at the protocol's `retrieval_tap` (a feature map globally "
    "average-pooled): the test images query the training images, both whole and un-augmented, ranked by cosine "
    "or Euclidean distance; relevant = same class. Mean ± sample std over seeds; its **Δ** is the paired gain "
    "over the baseline with its 95% t-interval, as for top-1. Top-1 stays the headline and decides the rank."
)
_LEGEND_PUBLISHED = (
    "**Published** numbers (teacher in the caption, methods in the *Published* column) come from their "
    "authors' own protocols and reporting rules; each is marked [n] and its source is footnote [n] under "
    "its table: context, not a target."
)


_LEGEND_TAIL = (
    "**Teacher** `cache + live tail`: the teacher's outputs come from the store, but the method also runs the "
    "teacher's last stage (its *tail*, frozen) live on the student's features (ScaleKD's teacher parameter "
    f"perception). **{TEACHER_FWD}** then also shows the samples through the tail per run (`… tail [n]`; each "
    "pass counts), and footnote [n] gives the tail's parameters and, when the record has the teacher's size, "
    "their share of the teacher's: a rough proxy for the tail's share of a full teacher forward's compute."
)


_LEGEND_TUNED = (
    "**Tuned tables**: every method, the student alone included, got the same K trials on the validation "
    "split (trial 0 = the configured values); the selected values then ran every seed on test. Those rows "
    "are the headline (**Tuning**: `tuned, K trials` and the selected values, `configured values` when trial "
    "0 won; gains over the tuned student alone; ranks among tuned rows). **Untuned top-1** is the same cell "
    "with the configured values, **Tuning Δ** tuned minus untuned mean top-1, **Tuning time** the cell's "
    "trial wall time summed (on top of its wall time). Rows `<label> (untuned)`, in the second table of each "
    "group, are the configured values, with gains over the untuned student alone."
)


def legend(tables: Sequence[Table]) -> list[str]:
    """The "How to read these tables" items; those on retrieval, published numbers, live teacher tails and
    tuning only when a table shows them."""
    groups = [g for t in tables for g in t.groups]
    shows_published = any(g.teacher_published or any(c.published for c in g.cells) for g in groups)
    shows_retrieval = any(_paired_columns(g) for g in groups)
    shows_tail = any(c.live_teacher_tail for g in groups for c in g.cells)
    shows_tuning = any(g.tuned for g in groups)
    return [
        *_LEGEND,
        *[_LEGEND_RETRIEVAL] * shows_retrieval,
        *[_LEGEND_PUBLISHED] * shows_published,
        *[_LEGEND_TAIL] * shows_tail,
        *[_LEGEND_TUNED] * shows_tuning,
    ]


def _paired_columns(group: Group, cells: Sequence[LeaderboardCell] | None = None) -> list[str]:
    """The paired metrics beside the headline that some run of ``group`` (of its ``cells``) has (retrieval
    mAP)."""
    cells = group.cells if cells is None else cells
    return [m for m in PAIRED_METRICS if m != HEADLINE and any(c.stat(m).n for c in cells)]


def _delta(cell: LeaderboardCell, group: Group, column: str) -> str:
    """The paired gain of ``column`` over the baseline as text (``(baseline)`` for the baseline itself)."""
    if cell is group.baseline_for(cell):
        return "(baseline)"
    return fmt.delta(cell.deltas.get(column)) if cell.stat(column).n else ""


@dataclass
class DisplayTable:
    """One group as text: a caption, a header row, text rows and footnotes.

    Attributes:
        title: Heading (``teacher (model) → student``).
        caption: One-paragraph caption (teacher top-1, student size, views).
        headers: Column titles.
        rows: One list of cell texts per leaderboard cell.
        footnotes: The notes on cells (marked ``[n]`` beside the method), sources of published numbers, and
            group-level notes.
    """

    title: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    footnotes: list[str] = field(default_factory=list)


def _method_label(cell: LeaderboardCell) -> str:
    name = cell.method_name
    return cell.method if name in (None, cell.label) else f"{cell.method} ({name})"


def _seeds(cell: LeaderboardCell) -> str:
    return f"{cell.top1.n}" + (f" (+{len(cell.skipped)} skipped)" if cell.skipped else "")


def _footnote(text: str, footnotes: list[str]) -> str:
    """Appends footnote ``text`` to the group's ``footnotes`` and returns its marker ``"[n]"``."""
    footnotes.append(text)
    return f"[{len(footnotes)}]"


def _published(pub: Published, what: str, footnotes: list[str]) -> str:
    """``"73.33 [n]"``; appends footnote ``n`` (what the number is and its source) to ``footnotes``."""
    marker = _footnote(f"Published {what}: {fmt.num(pub.top1)} — {pub.source}", footnotes)
    return f"{fmt.num(pub.top1)} {marker}"


def tail_note(cell: LeaderboardCell) -> str:
    """What a live teacher tail cost, in words: ``"teacher tail: 1.2M samples through 25k of the teacher's 400k
    params (6%) per run ..."``; the tail's parameters alone when the record lacks the teacher's. ``""`` for a
    cell without a live tail."""
    if not cell.live_teacher_tail:
        return ""
    samples, tail, teacher = (
        cell.mean_of("teacher_tail_forward"),
        cell.first("teacher_tail_params"),
        cell.first("teacher_params"),
    )
    if samples is None:
        return (
            "teacher tail ran live; its compute was not recorded (the record has no provenance.method_audit)"
        )
    n = len(cell.by_seed("teacher_tail_forward"))
    seeds = f"mean over {n} seeds" if n > 1 else "1 seed"
    text = f"teacher tail: {fmt.si(samples)} samples"
    if tail is None:
        return f"{text} per run ({seeds})"
    if not teacher:
        return (
            f"{text} through its {fmt.si(tail)} params per run ({seeds}; the teacher's size is not recorded)"
        )
    share = tail / teacher
    pct = f"{share:.0%}" if share >= 0.01 else f"{share:.1%}"
    return (
        f"{text} through {fmt.si(tail)} of the teacher's {fmt.si(teacher)} params ({pct}) per run ({seeds});"
        f" by parameter share about {fmt.si(samples * share)} full teacher forwards"
    )


def _teacher_forward(cell: LeaderboardCell, footnotes: list[str]) -> str:
    """The teacher-forward cell: full teacher forwards, plus ``"<n> tail [k]"`` with footnote ``k``
    (:func:`tail_note`) when the method ran the teacher's tail live."""
    full = fmt.si(cell.mean_of("teacher_forward"))
    if not cell.live_teacher_tail:
        return full
    samples = cell.mean_of("teacher_tail_forward")
    tail = "tail" if samples is None else f"{fmt.si(samples)} tail"
    text = f"{full} + {tail}" if cell.mean_of("teacher_forward") else tail
    return f"{text} {_footnote(f'{cell.method} — {tail_note(cell)}', footnotes)}"


def _caption(group: Group, views: set[str], footnotes: list[str]) -> str:
    teacher = f"Teacher {group.key[2]} ({group.teacher_model}): "
    t = group.teacher_top1
    if t.mean is None:
        teacher += "test top-1 not recorded"
    else:
        spread = " (range over runs; see notes)" if t.std else ""
        teacher += f"test top-1 {fmt.num(t.mean)}%{spread}"
    if group.teacher_published:
        what = f"teacher {group.teacher_model}"
        teacher += f", published {_published(group.teacher_published, what, footnotes)}"
    student_params = next((c.first("student_params") for c in group.cells if c.first("student_params")), None)
    student = f"Student {group.key[3]}" + (f": {fmt.si(student_params)} parameters" if student_params else "")
    parts = [teacher, student]
    if len(views) == 1 and next(iter(views)):
        parts.append(f"Views: {next(iter(views))}")
    return ". ".join(parts) + "."


_KNOB_NAMES = {"lr": "lr", "weight_decay": "wd"}


def short_value(value: object) -> str:
    """A tuned value in short form: 3 significant digits (integral from 1000), ``3.12e-4`` below 1e-3 and from
    1e5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    a = abs(value)
    if a and (a < 1e-3 or a >= 1e5):
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.0f}" if a >= 1e3 else f"{value:.3g}"


def short_values(values: dict[str, object]) -> str:
    """``"lr 0.0712, wd 3.12e-4, tau 2.35"``: the protocol's knobs first (``lr``, ``wd``), then the method's,
    as it names them."""
    order = [k for k in _KNOB_NAMES if k in values] + sorted(k for k in values if k not in _KNOB_NAMES)
    names = {k: _KNOB_NAMES.get(k, k.removeprefix("method.")) for k in order}
    return ", ".join(f"{names[k]} {short_value(values[k])}" for k in order)


def tuning_text(cell: LeaderboardCell) -> str:
    """A tuned cell's Tuning column: ``"tuned, 8 trials: lr 0.0712, tau 2.35"`` (``configured values`` when
    trial 0 won); ``""`` for an untuned cell."""
    if not cell.tuned or cell.tuning("trials") is None:
        return ""
    if cell.tuning("selected_trial") == 0:
        chosen = "configured values"
    else:
        chosen = short_values(cell.selected_values or {})
    return f"tuned, {cell.tuning('trials')} trials: {chosen or 'no tuned knobs'}"


def group_display(group: Group, variant: str | None = None) -> DisplayTable:
    """The text table of one group (of one variant of a tuned table's group: the headline's by default).

    The tuned variant adds the Tuning, Untuned top-1, Tuning Δ and Tuning time columns.
    """
    variant = variant if variant is not None or not group.tuned else TUNED_VARIANT
    cells = group.variant_cells(variant) if group.tuned else group.cells
    tuned = variant == TUNED_VARIANT
    views = {c.views_note for c in cells if c.views_note}
    retrieval = _paired_columns(group, cells)
    show_pub = any(c.published for c in cells)
    headers = ["Rank", "Method", *["Tuning"] * tuned, "Seeds", "Top-1 (last epoch)", "95% CI"]
    headers += ["Δ vs baseline [95% CI]"]
    headers += ["Untuned top-1", "Tuning Δ"] * tuned
    headers += ["Top-1 @ best-val epoch†", "Agreement"]
    for m in retrieval:
        headers += [METRIC_HEADERS.get(m, m), f"Δ {METRIC_HEADERS.get(m, m)} [95% CI]"]
    headers += ["Published"] * show_pub
    headers += ["Wall time", *["Tuning time"] * tuned]
    headers += [TEACHER_FWD, "Cache read", "Extra params", "Teacher"]
    footnotes: list[str] = []
    caption = _caption(group, views, footnotes)
    if variant == UNTUNED_VARIANT:
        caption = (
            "Untuned: the configured (paper) values, without tuning; Δ over the untuned student alone, ranks"
            " among these rows. " + caption
        )
    taps = sorted({str(c.first("retrieval_tap")) for c in cells if c.first("retrieval_tap")})
    if retrieval and taps:
        caption += f" Retrieval embedding: {', '.join(taps)}."
    rows = []
    for cell in cells:
        notes = list(cell.notes)
        if len(views) > 1 and cell.views_note:
            notes.append(cell.views_note)
        if cell.mean_of("assistant_time_s") is not None:  # the run's own assistant (TAKD, AMD): its cost too
            searched = cell.first("assistant_candidates")
            notes.append(f"+ {fmt.seconds(cell.mean_of('assistant_time_s'))} for its assistant"
                         + (f" (search of {searched} candidates + fine-tuning)" if searched else ""))
        share = cell.first("assistant_pick_share")
        if share is not None and not stable(share):
            notes.append(f"the searched assistant's pick is not stable: {100 * share:.0f}% of re-selections within the"
                         " joint accuracies' evaluation noise keep it (see the search audit)")
        if cell.top1.n:
            top1 = fmt.mean_std(cell.top1)
            ci = f"±{fmt.num(cell.top1.ci95)}" if cell.top1.ci95 is not None else "n/a (1 seed)"
        else:
            top1, ci = f"skipped: {cell.skip_reason}", ""
        method = _method_label(cell)
        if notes:  # a long note would make a column of its own one word wide: it is a footnote
            method += " " + _footnote(f"{cell.method}: {'; '.join(notes)}", footnotes)
        row = [str(cell.rank) if cell.rank is not None else fmt.DASH, method]
        row += [tuning_text(cell)] * tuned
        row += [_seeds(cell), top1, ci, _delta(cell, group, HEADLINE)]
        if tuned:
            untuned = fmt.mean_std(cell.twin.top1) if cell.twin else ""
            row += [untuned, fmt.num(cell.tuning_delta, 2, sign=True)]
        row += [fmt.mean_std(cell.best_val_top1), fmt.num(cell.mean_of("teacher_agreement"), 1)]
        for m in retrieval:
            row += [fmt.mean_std(cell.stat(m)), _delta(cell, group, m)]
        if show_pub:
            row.append(_published(cell.published, cell.label, footnotes) if cell.published else "")
        row.append(fmt.seconds(cell.mean_of("wall_time_s")))
        row += [fmt.seconds(cell.tuning("tuning_time_s"))] * tuned
        row += [
            _teacher_forward(cell, footnotes),
            fmt.si(cell.mean_of("cache_bytes_read"), "B"),
            fmt.si(cell.first("extra_params")),
            fmt.DASH if cell.teacher_source == "none" else cell.teacher_source,
        ]
        rows.append(row)
    notes = group.notes if not group.tuned else _variant_notes(group, variant)
    footnotes = [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)] + notes
    title = group.title + (" — untuned (configured values)" if variant == UNTUNED_VARIANT else "")
    return DisplayTable(title, caption, headers, rows, footnotes)


def _variant_notes(group: Group, variant: str | None) -> list[str]:
    """The group notes a variant's table shows: its own, and under the headline the group-wide ones (the
    teacher's) and the labels with no tuned run."""
    own = group.variant_notes.get(variant, [])
    if variant != TUNED_VARIANT:
        return list(own)
    variant_wide = {n for v in group.variant_notes.values() for n in v}
    shared = [
        n for n in group.notes if n not in variant_wide and not n.startswith(f"{UNTUNED_VARIANT} runs: ")
    ]
    tuned_labels = {c.label for c in group.variant_cells(TUNED_VARIANT)}
    untuned_only = [c.label for c in group.variant_cells(UNTUNED_VARIANT) if c.label not in tuned_labels]
    missing = [f"no tuned run of {', '.join(untuned_only)}: see the untuned table"] if untuned_only else []
    return [*own, *shared, *missing]


def group_displays(group: Group) -> list[DisplayTable]:
    """The text tables of a group: one, or the tuned and the untuned variant's of a tuned table's group."""
    if not group.tuned:
        return [group_display(group)]
    return [group_display(group, v) for v in (TUNED_VARIANT, UNTUNED_VARIANT) if group.variant_cells(v)]


def _kendall_text(k: Kendall) -> str:
    if k.tau is None:
        return f"not defined (n = {k.n}: it needs at least 2 methods in both orders, not all tied)"
    p = "n/a" if k.p is None else f"{k.p:.2g}"
    return f"{k.tau:.2f} (p = {p}, n = {k.n})"


def _budget_text(cells: Sequence[LeaderboardCell]) -> str:
    """The tuning budget of a table's tuned cells, one clause per distinct budget."""
    budgets = dict.fromkeys(
        (c.tuning("trials"), c.tuning("sampler"), c.tuning("budget_epochs"), c.tuning("budget_seeds"),
         c.tuning("budget_train_limit"), c.tuning("metric"), c.tuning("rule"))
        for c in cells if c.tuned and c.tuning("trials") is not None
    )
    out = []
    for trials, sampler, epochs, seeds, images, metric, rule in budgets:
        seeds_text = f"seed {seeds}" if seeds is not None and " " not in str(seeds) else f"seeds {seeds}"
        rule_text = ("best mean val score over the budget's seeds, ties to the configured values"
                     if rule == "best_mean" else str(rule))
        epochs_text = "the protocol's epochs" if epochs is None else f"{epochs} epoch{'s' * (epochs != 1)}"
        out.append(
            f"K = {trials} trials ({sampler} sampler, trial 0 = the configured values), each {epochs_text}"
            f"{'' if images in (None, '') else f' on {int(images)} training images'} x {seeds_text}, scored on"
            f" {metric}; selection: {rule_text}"
        )
    return "; ".join(out)


def _names(labels: Sequence[str]) -> str:
    return f" ({', '.join(labels)})" if labels else ""


def tuning_paragraph(table: Table) -> list[str]:
    """The "Tuning" paragraph of a tuned table (``[]`` for an untuned one): the budget and the criterion, then
    per group what tuning changed (:func:`kdbench.report.aggregate.tuning_effect`)."""
    groups = [g for g in table.groups if g.tuned]
    if not groups:
        return []
    lines = [
        (
            "Every method, the student alone included, got the same tuning budget:"
            f" {_budget_text(table.cells)}. The tuned rows ran every seed of the table with the selected values,"
            " on test. A method *beats the student alone* when its mean paired gain over the student alone of the"
            " same variant (tuned over tuned, untuned over untuned) is > 0 and its paired 95% t-interval excludes"
            " 0. Kendall's tau"
            " (tau-b, scipy.stats.kendalltau, two-sided p) compares the untuned and the tuned order of the"
            " methods (the student alone included) by mean test top-1."
        )
    ]
    for g in groups:
        effect = tuning_effect(g)
        before = f"{len(effect.beat_untuned)} of {effect.methods_untuned}"
        after = f"{len(effect.beat_tuned)} of {effect.methods_tuned}"
        text = (f"{g.key[2]} → {g.key[3]}: {before} methods beat the student alone before tuning"
                f"{_names(effect.beat_untuned)}, {after} after{_names(effect.beat_tuned)}.")
        if effect.moved and effect.moved[1] == 0:
            text += " Tuning changed no mean test top-1."
        elif effect.moved:
            label, delta = effect.moved
            cell = next(c for c in g.variant_cells(TUNED_VARIANT) if c.label == label)
            who = "the student alone" if cell.method_name == BASELINE else label
            text += (f" Moved most: {who}, {fmt.num(delta, 2, sign=True)} points (untuned"
                     f" {fmt.num(cell.twin.top1.mean)} → tuned {fmt.num(cell.top1.mean)}).")
        text += f" Kendall's tau between the untuned and the tuned order: {_kendall_text(effect.kendall)}."
        lines.append(text)
    return lines


def protocol_warnings(tables: Sequence[Table]) -> list[str]:
    """One sentence per dataset whose records come from more than one protocol."""
    out = []
    for dataset, hashes in protocols_per_dataset(tables).items():
        if len(hashes) > 1:
            out.append(
                f"Dataset {dataset} has records from {len(hashes)} different protocols "
                f"({', '.join(hashes)}); each protocol gets its own table and numbers from different tables "
                "must not be compared."
            )
    return out


EXPECTED_VAL_CAPTION = (
    "Expected best validation score after k of the K trials, per method (Dodge et al. 2019, expected"
    " validation performance): the unbiased estimator for k trials drawn without replacement from the K"
    " observed trial scores (each the mean over the budget's seeds). k = 1 is the mean trial, k = K the best"
    " one. Trial 0 is the configured values and is counted like the others."
)

PROVENANCE_HEADERS = ["Item", "Scope", "Value", "Runs"]
_DIGEST_CHARS = 16


def _label(column: str) -> str:
    if column.startswith("pkg."):
        return f"package {column[4:]}"
    if column.startswith("plugin."):
        return f"plugin {column[7:]}"
    if column.startswith("store."):
        return f"store manifest {column[6:]}"
    return column.removeprefix("prov.")


def _short(value: object) -> str:
    text = str(value)
    is_digest = len(text) > 2 * _DIGEST_CHARS and all(ch in "0123456789abcdef" for ch in text.lower())
    return text[:_DIGEST_CHARS] + "…" if is_digest else text


def provenance_display(fields: Sequence[ProvenanceField]) -> list[list[str]]:
    """Rows of the provenance footer (:data:`PROVENANCE_HEADERS`): one per item and scope, identical values
    collapsed into one, differing values listed with their run counts and flagged ``DIFFERS``.

    Long hex digests are shortened to 16 characters (the full values are in ``runs.csv``).
    """
    rows = []
    for f in fields:
        total = sum(n for _, n in f.values)
        if f.differs:
            value = "DIFFERS: " + "; ".join(f"{_short(v)} ({n} run{'s' * (n != 1)})" for v, n in f.values)
        else:
            value = _short(f.values[0][0])
        rows.append([_label(f.column), " / ".join(f.scope) or "all runs", value, str(total)])
    return rows


def flagged_display(flagged: dict[str, list[str]]) -> list[str]:
    """One line per run whose provenance differs from the majority of its scope."""
    return [f"{record}: {', '.join(_label(c) for c in cols)}" for record, cols in sorted(flagged.items())]


def dirty_warning(fields: Sequence[ProvenanceField]) -> str:
    """The warning on runs made from a checkout with uncommitted changes (``""`` when there are none).

    Names the modified or untracked files the records list (``prov.dirty_files``); records written before
    that key existed only say that files were modified.
    """
    dirty = sum(
        n for f in fields if f.column == "prov.git_commit" for v, n in f.values if str(v).endswith("dirty")
    )
    if not dirty:
        return ""
    files = sorted(
        {p for f in fields if f.column == DIRTY_FILES for v, _ in f.values for p in split_dirty_files(v)}
    )
    listed = f" Uncommitted files: {', '.join(files)}." if files else " The modified files were not recorded."
    return (
        f"{dirty} run(s) were made from a kdbench checkout with uncommitted changes (git commit '+dirty'): "
        f"their code cannot be recovered from the commit alone.{listed}"
    )


@dataclass
class FigureView:
    """A plot shown under a text table: its file, alt text and an optional caption."""

    path: Path
    alt: str
    caption: str = ""


@dataclass
class TableView:
    """One (dataset, protocol) table as text, with its plots.

    Attributes:
        heading: ``"<dataset> — protocol <hash>"``.
        groups: Each text table of each group (two per group of a tuned table) and the figures under it (the
            group's training curves; a tuned group's expected-validation plot).
        plots: The table's own plots (accuracy vs size, gain vs baseline).
        tuning: The "Tuning" paragraph of a tuned table (:func:`tuning_paragraph`), ``[]`` otherwise.
    """

    heading: str
    groups: list[tuple[DisplayTable, list[FigureView]]]
    plots: list[Path]
    tuning: list[str] = field(default_factory=list)


@dataclass
class ReportView:
    """Everything the markdown and HTML renderers show.

    Attributes:
        title: Report title.
        summary: One sentence on what the report was built from.
        legend: The "How to read these tables" items (:func:`legend`).
        warnings: Sentences that must stand out (several protocols per dataset, uncommitted changes,
            differing provenance).
        tables: One :class:`TableView` per (dataset, protocol).
        provenance: Rows of the provenance footer (:data:`PROVENANCE_HEADERS`).
        flagged: Runs whose provenance differs, one line each.
    """

    title: str
    summary: str
    legend: list[str]
    warnings: list[str]
    tables: list[TableView]
    provenance: list[list[str]]
    flagged: list[str]


def report_view(
    title: str,
    tables: Sequence[Table],
    plots: dict[str, list[Path]],
    fields: Sequence[ProvenanceField],
    flagged: dict[str, list[str]],
    n_runs: int,
) -> ReportView:
    """Assembles the :class:`ReportView` of a leaderboard.

    Args:
        title: Report title.
        tables: The leaderboard tables.
        plots: Plot paths as returned by :func:`kdbench.report.plots.write_plots`.
        fields: Provenance fields (:func:`kdbench.report.provenance.summarize_provenance`).
        flagged: Runs whose provenance differs, with their columns.
        n_runs: Number of run records read.
    """
    n_skipped = sum(len(c.skipped) for t in tables for c in t.cells)
    summary = (
        f"Built by kdbench {__version__} from {n_runs} run records ({n_skipped} skipped) in {len(tables)} "
        f"table(s), {sum(len(t.groups) for t in tables)} teacher→student group(s)."
    )
    warnings = protocol_warnings(tables)
    dirty = dirty_warning(fields)
    if dirty:
        warnings.append(dirty)
    if flagged:
        warnings.append(
            f"{len(flagged)} run(s) have provenance that differs from the other runs of their scope; "
            "see the provenance section."
        )
    views = []
    for t in tables:
        groups = []
        for g in t.groups:
            # Under a tuned group's headline table its expected-validation plot; under its last table the
            # training curves (of every cell of the group).
            displays = [(d, []) for d in group_displays(g)]
            if g.variant_cells(TUNED_VARIANT):
                displays[0][1].extend(
                    FigureView(p, f"expected best validation score {g.title}", EXPECTED_VAL_CAPTION)
                    for p in plots.get(f"{t.slug}/{g.key[2]}/{g.key[3]}/expected-val", [])
                )
            displays[-1][1].extend(
                FigureView(p, f"training curves {displays[0][0].title}")
                for p in plots.get(f"{t.slug}/{g.key[2]}/{g.key[3]}", [])[:1]
            )
            groups += displays
        views.append(TableView(f"{t.dataset} — protocol {t.protocol_hash}", groups, plots.get(t.slug, []),
                               tuning_paragraph(t)))
    return ReportView(
        title, summary, legend(tables), warnings, views, provenance_display(fields), flagged_display(flagged)
    )
