"""Leaderboard plots (matplotlib, Agg; no pyplot global state).

* accuracy vs student parameters: one point per cell, 95% CI error bars, one figure per table;
* gain over the baseline: paired mean difference with its 95% CI per cell, one figure per table;
* training curves: test (solid) and validation (dashed) top-1 per epoch, mean over seeds, one panel per
  cell, one figure per group; each panel also shows the baseline's test curve for reference;
* a tuned table's groups (:mod:`kdbench.tuning`): the expected best validation score after k of the K trials
  per method (:func:`kdbench.report.stats.expected_max`), one figure per group.

Each method label has one colour in every plot of every report (:func:`kdbench.report.colors.method_color`; a
tuned cell and its untuned twin share it, the untuned one drawn hollow). In a tuned table the accuracy-vs-size
plot shows the tuned cells (the headline). Axis ranges fit the means: an interval much longer than the others
(a 2-seed t-interval) is drawn up to the axis and ends in an arrow marker (:func:`fit_range`), and top-1 axes
stop at 100 %. Value labels sit beside the axes, clear of every reference line.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from kdbench._util import atomic_path
from kdbench.report import _format as fmt
from kdbench.report.aggregate import BASELINE, TUNED_VARIANT, UNTUNED_VARIANT, Group, LeaderboardCell, Table
from kdbench.report.colors import BASELINE_COLOR, method_color
from kdbench.report.records import read_epochs
from kdbench.report.stats import expected_max_curve, summarize

_logger = logging.getLogger(__name__)

_DPI = 110
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_BASELINE_COLOR = BASELINE_COLOR
# An interval longer than this many times the median half width of its plot is clipped at the axis.
_CLIP_FACTOR = 2.5


def fit_range(
    centers: Sequence[float], halves: Sequence[float], include: Sequence[float] = (), upper: float | None = None
) -> tuple[float, float]:
    """An axis range that fits the points and their typical intervals, not one outlying interval.

    Every point is inside; every interval up to ``_CLIP_FACTOR`` times the median half width (at least 0.5)
    is inside whole; a longer one is clipped (:func:`draw_interval` marks it). ``include`` values (0 for a
    gain) are inside too, and the range stops at ``upper`` (100 for a top-1) when given.

    Returns:
        ``(low, high)`` with a 6% margin.
    """
    cap = max(0.5, _CLIP_FACTOR * float(sorted(halves)[len(halves) // 2])) if halves else 0.5
    lows = [c - min(h, cap) for c, h in zip(centers, halves)] + list(centers) + list(include)
    highs = [c + min(h, cap) for c, h in zip(centers, halves)] + list(centers) + list(include)
    lo, hi = min(lows), max(highs)
    pad = 0.06 * max(hi - lo, 1.0)
    lo, hi = lo - pad, hi + pad
    if upper is not None:
        hi = min(hi, upper + pad / 2)
    return lo, hi


def draw_interval(ax, center: float, pos: float, half: float, lim: tuple[float, float], color: Any,
                  vertical: bool, marker: str = "o", hollow: bool = False) -> bool:
    """A point with its interval, the interval clipped to ``lim`` with an arrow marker at the axis where it
    goes on. ``vertical``: the interval runs along y (the point at x = ``pos``). Returns whether it was
    clipped."""
    lo, hi = center - half, center + half
    shown = (max(lo, lim[0]), min(hi, lim[1]))
    kw = dict(color=color, lw=1.3)
    xy = (lambda a, b: ([pos, pos], [a, b])) if vertical else (lambda a, b: ([a, b], [pos, pos]))
    ax.plot(*xy(*shown), **kw)
    for end, value, edge, arrow in ((lo, shown[0], lim[0], "v" if vertical else "<"),
                                    (hi, shown[1], lim[1], "^" if vertical else ">")):
        if end == value:  # a cap
            ax.plot(*xy(value, value), marker="_" if vertical else "|", ms=7, **kw)
        else:  # it goes on beyond the axis
            ax.plot(*xy(edge, edge), marker=arrow, ms=7, ls="", color=color, clip_on=False, zorder=3)
    point = (pos, center) if vertical else (center, pos)
    ax.plot(*point, marker=marker, ms=6, color=color, mfc="white" if hollow else color, ls="")
    return shown != (lo, hi)


def save_png(fig: Figure, path: Path) -> Path:
    """Writes ``fig`` as a PNG (atomically) and returns ``path``."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
    _logger.info("wrote %s", path)
    return path


_save = save_png
# Where a point's label may go, in order of preference: (dx, dy) in points, horizontal and vertical alignment.
_LABEL_SPOTS = (
    (7, 0, "left", "center"), (-7, 0, "right", "center"), (6, 7, "left", "bottom"), (6, -7, "left", "top"),
    (-6, 7, "right", "bottom"), (-6, -7, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
    (14, 0, "left", "center"), (-14, 0, "right", "center"),
)  # fmt: skip


def place_labels(
    fig: Figure, ax, labels: Sequence[tuple[float, float, str, Any]], rules: Sequence[float] = (),
    lines: Sequence[Sequence[tuple[float, float]]] = (),
) -> None:
    """Writes each ``(x, y, text, colour)`` label beside its point (data coordinates) where it covers no
    other label, no labelled point, no horizontal reference line at one of ``rules`` (y values), no drawn line
    through ``lines`` (their points, data coordinates) and stays inside the axes: the first free spot of
    :data:`_LABEL_SPOTS` (the least covered one when none is free)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()  # the layout is final: display coordinates hold
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_display = ax.transData.transform
    taken = []
    for x, y in {(x, y) for x, y, *_ in labels}:
        px, py = to_display((x, y))
        taken.append((px - 5, py - 5, px + 5, py + 5))
    for y in rules:
        py = to_display((1.0, y))[1]
        taken.append((frame.x0, py - 3, frame.x1, py + 3))
    for line in lines:  # each segment as a chain of small boxes
        pts = [to_display(p) for p in line]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            steps = max(1, int(max(abs(x1 - x0), abs(y1 - y0)) / 3))
            taken += [(x0 + (x1 - x0) * k / steps - 1.5, y0 + (y1 - y0) * k / steps - 1.5,
                       x0 + (x1 - x0) * k / steps + 1.5, y0 + (y1 - y0) * k / steps + 1.5) for k in range(steps + 1)]

    def cover(box) -> float:
        inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
        area = sum(max(0.0, min(box.x1, b[2]) - max(box.x0, b[0])) * max(0.0, min(box.y1, b[3]) - max(box.y0, b[1]))
                   for b in taken)
        return area + (0.0 if inside else 1e6)

    for x, y, text, color in labels:
        note = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=7, color=color,
                           annotation_clip=False)
        note.set_in_layout(False)
        best = None
        for dx, dy, ha, va in _LABEL_SPOTS:
            note.set_position((dx, dy))
            note.set_ha(ha)
            note.set_va(va)
            box = note.get_window_extent(renderer)
            score = cover(box)
            if best is None or score < best[0]:
                best = (score, (dx, dy, ha, va), box)
            if score == 0:
                break
        _, (dx, dy, ha, va), box = best
        note.set_position((dx, dy))
        note.set_ha(ha)
        note.set_va(va)
        taken.append((box.x0, box.y0, box.x1, box.y1))


def _colour(cell: LeaderboardCell) -> str:
    return method_color(BASELINE if cell.method_name == BASELINE else cell.label)


def plot_accuracy_vs_params(table: Table, path: Path) -> Path | None:
    """Last-epoch top-1 (mean, 95% CI bars) against student parameters, one point per cell.

    Points of one student are spread a little sideways (by method) so error bars do not overlap; the
    x ticks name the students. Marker shape = teacher.

    Returns:
        ``path``, or ``None`` when no cell of the table has a finished run.
    """
    cells = [
        c for c in table.cells if c.top1.n and c.first("student_params") and c.variant != UNTUNED_VARIANT
    ]
    if not cells:
        return None
    teachers = sorted({c.teacher for c in cells})
    methods = sorted({c.method for c in cells}, key=lambda m: (m != BASELINE, m))
    students = sorted({(c.first("student_params"), c.student) for c in cells})
    log_x = students[-1][0] / students[0][0] > 3
    width = max(6.4, 1.6 + 1.3 * len(students))
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    ax = fig.add_subplot()
    slots = len(methods) * len(teachers)
    ylim = fit_range([c.top1.mean for c in cells], [c.top1.ci95 or 0.0 for c in cells], upper=100.0)
    for c in cells:
        params = c.first("student_params")
        slot = methods.index(c.method) * len(teachers) + teachers.index(c.teacher)
        offset = (slot - (slots - 1) / 2) * 0.25 / max(slots, 1)
        x = params * 10 ** (offset * 0.5) if log_x else params * (1 + offset * 0.5)
        marker = _MARKERS[teachers.index(c.teacher) % len(_MARKERS)]
        draw_interval(ax, c.top1.mean, x, c.top1.ci95 or 0.0, ylim, _colour(c), vertical=True, marker=marker,
                      hollow=c.top1.ci95 is None)
    ax.set_ylim(*ylim)
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks([p for p, _ in students], [f"{s}\n{fmt.si(p)}" for p, s in students], rotation=0)
    ax.minorticks_off()
    if not log_x:
        lo, hi = students[0][0], students[-1][0]
        pad = max(0.15 * (hi - lo), 0.08 * hi)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("student (parameters)")
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(
        f"Accuracy vs student size — {table.dataset}, protocol {table.protocol_hash}\n"
        "mean over seeds, bars = 95% t-interval\n(hollow = 1 seed; an arrow: the interval goes on)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=_colour_by_label(m, cells), marker="o", ls="", label=m) for m in methods
    ]
    if len(teachers) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="black",
                marker=_MARKERS[i % len(_MARKERS)],
                ls="",
                mfc="none",
                label=f"teacher {t}",
            )
            for i, t in enumerate(teachers)
        ]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def _colour_by_label(method: str, cells: Sequence[LeaderboardCell]) -> Any:
    return next(_colour(c) for c in cells if c.method == method)


def plot_gain(table: Table, path: Path) -> Path | None:
    """Paired gain over the baseline per cell, with its 95% CI.

    Cells with fewer than two seeds paired with the baseline have no interval and are left out (the
    tables say why).

    Returns:
        ``path``, or ``None`` when no cell has a paired gain with an interval.
    """
    entries = [
        (f"{c.teacher}→{c.student}\n{c.method}", c)
        for c in table.cells
        if c.delta is not None and c.delta.diff.ci95 is not None
    ]
    if not entries:
        return None
    fig = Figure(figsize=(7.2, 1.7 + 0.55 * len(entries)), layout="constrained")
    ax = fig.add_subplot()
    diffs = [c.delta.diff for _, c in entries]
    xlim = fit_range([d.mean for d in diffs], [d.ci95 for d in diffs], include=[0.0])
    for i, (_, c) in enumerate(entries):
        y = len(entries) - 1 - i
        s = c.delta.diff
        clipped = draw_interval(ax, s.mean, y, s.ci95, xlim, _colour(c), vertical=False,
                                hollow=c.variant == UNTUNED_VARIANT)
        # The value beside the axes (right), never on the zero line or on a bar.
        text = f"{s.mean:+.2f} (n={s.n})" + (f"\n[{s.low:+.1f}, {s.high:+.1f}]" if clipped else "")
        ax.annotate(text, (1.02, y), xycoords=("axes fraction", "data"), ha="left", va="center", fontsize=8)
    for i in range(1, len(entries)):  # a rule between teacher->student groups
        if entries[i][1].key[:4] != entries[i - 1][1].key[:4]:
            ax.axhline(len(entries) - i - 0.5, color="0.75", lw=0.8)
    ax.axvline(0.0, color="0.3", lw=1, ls="--", zorder=0)
    ax.set_yticks(range(len(entries)), [label for label, _ in reversed(entries)], fontsize=8)
    ax.set_ylim(-0.7, len(entries) - 0.3)
    ax.set_xlim(*xlim)
    ax.set_xlabel("gain over the student alone (top-1 points, paired by seed)")
    untuned = "\nfilled: tuned, hollow: untuned (each over the student alone of its variant)"
    ax.set_title(
        f"Gain vs baseline — {table.dataset}, protocol {table.protocol_hash}\n"
        "mean paired difference (value at the right), bars = paired 95% t-interval (arrow: it goes on)"
        f"{untuned if any(c.variant for _, c in entries) else ''}\n"
        "(cells with fewer than 2 paired seeds are not shown)",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


EpochsReader = Callable[[Mapping[str, Any]], list[dict]]


def epochs_of_run(run: Mapping[str, Any]) -> list[dict]:
    """A run's epochs from the ``epochs_file`` its row names (``[]``, with a warning, when it is absent)."""
    path = Path(run.get("epochs_file") or "")
    if not run.get("epochs_file") or not path.exists():
        _logger.warning("no epochs file for %s (seed %s): no training curve", run["record"], run["seed"])
        return []
    return read_epochs(path)


def mean_curves(
    cell: LeaderboardCell, reader: EpochsReader = epochs_of_run
) -> dict[str, list[tuple[int, float, float | None]]]:
    """Per-epoch mean (and std) over the cell's seeds of ``test_top1`` and ``val_top1``.

    Args:
        cell: The cell; each finished run's epochs are read.
        reader: A run's epochs, from its runs-table row.

    Returns:
        ``{"test_top1": [(epoch, mean, std), ...], "val_top1": [...]}``; empty lists when no run of the cell
        has epochs.
    """
    per_epoch: dict[str, dict[int, list[float]]] = {"test_top1": {}, "val_top1": {}}
    for run in cell.runs:
        for ep in reader(run):
            for key, values in per_epoch.items():
                if ep.get(key) not in (None, ""):
                    values.setdefault(int(ep["epoch"]), []).append(float(ep[key]))
    out = {}
    for key, values in per_epoch.items():
        out[key] = [(e, (s := summarize(v)).mean, s.std) for e, v in sorted(values.items())]
    return out


def plot_curves(group: Group, path: Path, reader: EpochsReader | None = None) -> Path | None:
    """Training curves of a group: one panel per cell with test (solid, ±std band) and val (dashed) top-1.

    Returns:
        ``path``, or ``None`` when no cell of the group has an epochs file.
    """
    reader = reader or epochs_of_run
    curves = {c.method: mean_curves(c, reader) for c in group.cells if c.runs}
    curves = {m: cv for m, cv in curves.items() if cv["test_top1"] or cv["val_top1"]}
    if not curves:
        return None
    cells = [c for c in group.cells if c.method in curves]
    bases: dict[str, Any] = {}  # baseline label -> its curves (each variant has its own baseline)
    for b in {id(b): b for c in cells if (b := group.baseline_for(c)) is not None}.values():
        found = curves.get(b.method) if b in group.cells else None
        if found is None and b.runs:  # borrowed from another teacher's group
            found = mean_curves(b, reader)
        bases[b.method] = found
    ncols = min(3, len(cells))
    nrows = math.ceil(len(cells) / ncols)
    n_epochs = max(len(cv["test_top1"]) for cv in curves.values())
    marker = "o" if n_epochs <= 20 else None  # few epochs: show the measured points
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, cell in zip(axes, cells):
        color = _colour(cell)
        cv = curves[cell.method]
        baseline = group.baseline_for(cell)
        base = bases.get(baseline.method) if baseline else None
        if base and cell is not baseline and base["test_top1"]:
            e, m, _ = zip(*base["test_top1"])
            ax.plot(e, m, color=_BASELINE_COLOR, lw=1, ls=":")
        if cv["test_top1"]:
            e, m, s = zip(*cv["test_top1"])
            ax.plot(e, m, color=color, lw=1.8, marker=marker, ms=3)
            if any(x is not None for x in s):
                sd = [x or 0.0 for x in s]
                ax.fill_between(
                    e,
                    [a - b for a, b in zip(m, sd)],
                    [a + b for a, b in zip(m, sd)],
                    color=color,
                    alpha=0.18,
                    lw=0,
                )
        if cv["val_top1"]:
            e, m, _ = zip(*cv["val_top1"])
            ax.plot(e, m, color=color, lw=1.3, ls="--", marker=marker, ms=3, mfc="white")
        ax.set_title(f"{cell.method} (n={cell.top1.n})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(cells) :]:
        ax.set_visible(False)
    # The lowest visible panel of each column carries the epoch axis (its neighbour below may be hidden).
    for ax in axes[max(0, len(cells) - ncols) : len(cells)]:
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("epoch")
    for ax in axes[::ncols]:
        ax.set_ylabel("top-1 (%)")
    handles = [
        Line2D([], [], color="black", lw=1.8, label="test (mean ± std over seeds)"),
        Line2D([], [], color="black", lw=1.3, ls="--", label="validation (mean)"),
    ]
    shown = [m for m, b in bases.items() if b]
    if shown:
        label = f"{shown[0]} test" if len(shown) == 1 else "test of the baseline of the same variant"
        handles.append(Line2D([], [], color=_BASELINE_COLOR, lw=1, ls=":", label=label))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Training curves — {group.title}  ({group.key[0]}, protocol {group.key[1]})", fontsize=10)
    return _save(fig, path)


def plot_expected_val(group: Group, path: Path) -> Path | None:
    """The expected best validation score after k of the K trials (k = 1..K), one line per tuned cell.

    Each cell's K trial scores (the mean over the tuning budget's seeds, trial 0 the configured values) go
    through the unbiased estimator of :func:`kdbench.report.stats.expected_max` (sampling without
    replacement): k = 1 is their mean, k = K their maximum (the selected trial's score).

    Returns:
        ``path``, or ``None`` when no tuned cell of the group records its trial scores.
    """
    cells = [c for c in group.variant_cells(TUNED_VARIANT) if c.trial_means]
    if not cells:
        return None
    metric = next((c.tuning("metric") for c in cells if c.tuning("metric")), "val score")
    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    max_k = 1
    for i, cell in enumerate(sorted(cells, key=lambda c: (c.method_name != BASELINE, c.label))):
        curve = expected_max_curve(cell.trial_means)
        ks = range(1, len(curve) + 1)
        max_k = max(max_k, len(curve))
        marker = _MARKERS[i % len(_MARKERS)] if len(curve) <= 30 else None
        ax.plot(ks, curve, color=_colour(cell), marker=marker, ms=4, lw=1.6, label=cell.label)
    ax.set_xlim(0.8, max_k + 0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("k, number of trials")
    ax.set_ylabel(f"expected best {metric} (%)")
    ax.set_title(
        f"Expected best validation score after k trials — {group.title}\n"
        f"({group.key[0]}, protocol {group.key[1]}; unbiased estimator over the K observed trials,"
        " Dodge et al. 2019)\n"
        "trial 0 = the configured values, counted like the others",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def write_plots(tables: Sequence[Table], plot_dir: Path, epochs: EpochsReader | None = None) -> dict[str, list[Path]]:
    """Writes every plot of the report.

    Args:
        tables: The leaderboard tables.
        plot_dir: Directory of the PNG files.
        epochs: A run's epochs (:func:`epochs_of_run`, the file its row names, by default).

    Returns:
        Paths per table slug and group (``"<slug>"`` for table plots, ``"<slug>/<teacher>/<student>"`` for
        curves, ``"<slug>/<teacher>/<student>/expected-val"`` for a tuned group's expected validation score
        after k trials: ``<slug>_<teacher>_<student>-expected-val.png``); a plot without data is left out.
        PNG files already in ``plot_dir`` are removed first, so the directory holds exactly this report's
        plots.
    """
    stale = sorted(plot_dir.glob("*.png"))
    if stale:  # plots of an earlier report of this directory would survive next to the new ones
        _logger.info("removing %d plot(s) of an earlier report in %s", len(stale), plot_dir)
        for p in stale:
            p.unlink()
    out: dict[str, list[Path]] = {}
    for t in tables:
        table_plots = [
            plot_accuracy_vs_params(t, plot_dir / f"{t.slug}_accuracy_vs_params.png"),
            plot_gain(t, plot_dir / f"{t.slug}_gain_vs_baseline.png"),
        ]
        out[t.slug] = [p for p in table_plots if p]
        for g in t.groups:
            name = _safe(f"{t.slug}_{g.key[2]}_{g.key[3]}_curves")
            p = plot_curves(g, plot_dir / f"{name}.png", epochs)
            out[f"{t.slug}/{g.key[2]}/{g.key[3]}"] = [p] if p else []
            if g.tuned:
                name = _safe(f"{t.slug}_{g.key[2]}_{g.key[3]}-expected-val")
                p = plot_expected_val(g, plot_dir / f"{name}.png")
                out[f"{t.slug}/{g.key[2]}/{g.key[3]}/expected-val"] = [p] if p else []
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
