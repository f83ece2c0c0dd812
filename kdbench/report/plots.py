"""Leaderboard plots (matplotlib, Agg; no pyplot global state).

* accuracy vs student parameters: one point per cell, 95% CI error bars, one figure per table;
* gain over the baseline: paired mean difference with its 95% CI per cell, one figure per table;
* training curves: test (solid) and validation (dashed) top-1 per epoch, mean over seeds, one panel per
  cell, one figure per group; each panel also shows the baseline's test curve for reference;
* a tuned table's groups (:mod:`kdbench.tuning`): the expected best validation score after k of the K trials
  per method (:func:`kdbench.report.stats.expected_max`), one figure per group.

Each method label keeps one colour in every plot of a report (a tuned cell and its untuned twin share it; the
untuned one is drawn hollow). In a tuned table the accuracy-vs-size plot shows the tuned cells (the headline).
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
from kdbench.report.records import read_epochs
from kdbench.report.stats import expected_max_curve, summarize

_logger = logging.getLogger(__name__)

_DPI = 110
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_BASELINE_COLOR = "0.35"


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """A stable colour per method label (the baseline is grey)."""
    import matplotlib as mpl

    others = sorted(m for m in set(methods) if m != BASELINE)
    palette = mpl.colormaps["tab10" if len(others) <= 9 else "tab20"].colors
    palette = [c for c in palette if c[0] != c[1] or c[1] != c[2]]  # drop the greys (baseline is grey)
    colors: dict[str, Any] = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    colors[BASELINE] = _BASELINE_COLOR
    return colors


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
    _logger.info("wrote %s", path)
    return path


def _colour(cell: LeaderboardCell, colors: Mapping[str, Any]) -> Any:
    return colors.get(BASELINE if cell.method_name == BASELINE else cell.label, _BASELINE_COLOR)


def plot_accuracy_vs_params(table: Table, path: Path, colors: Mapping[str, Any]) -> Path | None:
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
    for c in cells:
        params = c.first("student_params")
        slot = methods.index(c.method) * len(teachers) + teachers.index(c.teacher)
        offset = (slot - (slots - 1) / 2) * 0.25 / max(slots, 1)
        x = params * 10 ** (offset * 0.5) if log_x else params * (1 + offset * 0.5)
        ci = c.top1.ci95 or 0.0
        ax.errorbar(
            x,
            c.top1.mean,
            yerr=ci,
            fmt=_MARKERS[teachers.index(c.teacher) % len(_MARKERS)],
            color=_colour(c, colors),
            capsize=3,
            markersize=6,
            mfc="white" if c.top1.ci95 is None else None,
        )
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
        "mean over seeds, bars = 95% t-interval (hollow = 1 seed)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=_colour_by_label(m, cells, colors), marker="o", ls="", label=m) for m in methods
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


def _colour_by_label(method: str, cells: Sequence[LeaderboardCell], colors: Mapping[str, Any]) -> Any:
    return next(_colour(c, colors) for c in cells if c.method == method)


def plot_gain(table: Table, path: Path, colors: Mapping[str, Any]) -> Path | None:
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
    for i, (_, c) in enumerate(entries):
        y = len(entries) - 1 - i
        s = c.delta.diff
        hollow = "white" if c.variant == UNTUNED_VARIANT else None
        ax.errorbar(s.mean, y, xerr=s.ci95, fmt="o", color=_colour(c, colors), capsize=4, mfc=hollow)
        ax.annotate(
            f"{s.mean:+.2f} (n={s.n})",
            (s.mean, y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    for i in range(1, len(entries)):  # a rule between teacher->student groups
        if entries[i][1].key[:4] != entries[i - 1][1].key[:4]:
            ax.axhline(len(entries) - i - 0.5, color="0.75", lw=0.8)
    ax.axvline(0.0, color="0.3", lw=1, ls="--")
    ax.set_yticks(range(len(entries)), [label for label, _ in reversed(entries)], fontsize=8)
    ax.set_ylim(-0.7, len(entries) - 0.3)
    ax.margins(x=0.15)
    ax.set_xlabel("gain over the student alone (top-1 points, paired by seed)")
    untuned = "\nfilled: tuned, hollow: untuned (each over the student alone of its variant)"
    ax.set_title(
        f"Gain vs baseline — {table.dataset}, protocol {table.protocol_hash}\n"
        "mean paired difference, bars = paired 95% t-interval"
        f"{untuned if any(c.variant for _, c in entries) else ''}\n"
        "(cells with fewer than 2 paired seeds are not shown)",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def mean_curves(
    cell: LeaderboardCell, reader: Callable[[Path], list[dict]] = read_epochs
) -> dict[str, list[tuple[int, float, float | None]]]:
    """Per-epoch mean (and std) over the cell's seeds of ``test_top1`` and ``val_top1``.

    Args:
        cell: The cell; each finished run's ``epochs_file`` is read.
        reader: Reads one epochs file.

    Returns:
        ``{"test_top1": [(epoch, mean, std), ...], "val_top1": [...]}``; empty lists when no epochs file
        of the cell exists.
    """
    per_epoch: dict[str, dict[int, list[float]]] = {"test_top1": {}, "val_top1": {}}
    for run in cell.runs:
        path = Path(run.get("epochs_file") or "")
        if not run.get("epochs_file") or not path.exists():
            _logger.warning("no epochs file for %s (seed %s): no training curve", run["record"], run["seed"])
            continue
        for ep in reader(path):
            for key, values in per_epoch.items():
                if ep.get(key) is not None:
                    values.setdefault(int(ep["epoch"]), []).append(float(ep[key]))
    out = {}
    for key, values in per_epoch.items():
        out[key] = [(e, (s := summarize(v)).mean, s.std) for e, v in sorted(values.items())]
    return out


def plot_curves(group: Group, path: Path, colors: Mapping[str, Any]) -> Path | None:
    """Training curves of a group: one panel per cell with test (solid, ±std band) and val (dashed) top-1.

    Returns:
        ``path``, or ``None`` when no cell of the group has an epochs file.
    """
    curves = {c.method: mean_curves(c) for c in group.cells if c.runs}
    curves = {m: cv for m, cv in curves.items() if cv["test_top1"] or cv["val_top1"]}
    if not curves:
        return None
    cells = [c for c in group.cells if c.method in curves]
    bases: dict[str, Any] = {}  # baseline label -> its curves (each variant has its own baseline)
    for b in {id(b): b for c in cells if (b := group.baseline_for(c)) is not None}.values():
        found = curves.get(b.method) if b in group.cells else None
        if found is None and b.runs:  # borrowed from another teacher's group
            found = mean_curves(b)
        bases[b.method] = found
    ncols = min(3, len(cells))
    nrows = math.ceil(len(cells) / ncols)
    n_epochs = max(len(cv["test_top1"]) for cv in curves.values())
    marker = "o" if n_epochs <= 20 else None  # few epochs: show the measured points
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, cell in zip(axes, cells):
        color = _colour(cell, colors)
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


def plot_expected_val(group: Group, path: Path, colors: Mapping[str, Any]) -> Path | None:
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
        ax.plot(ks, curve, color=_colour(cell, colors), marker=marker, ms=4, lw=1.6, label=cell.label)
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


def write_plots(tables: Sequence[Table], plot_dir: Path) -> dict[str, list[Path]]:
    """Writes every plot of the report.

    Args:
        tables: The leaderboard tables.
        plot_dir: Directory of the PNG files.

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
    colors = method_colors([c.label for t in tables for c in t.cells])
    out: dict[str, list[Path]] = {}
    for t in tables:
        table_plots = [
            plot_accuracy_vs_params(t, plot_dir / f"{t.slug}_accuracy_vs_params.png", colors),
            plot_gain(t, plot_dir / f"{t.slug}_gain_vs_baseline.png", colors),
        ]
        out[t.slug] = [p for p in table_plots if p]
        for g in t.groups:
            name = _safe(f"{t.slug}_{g.key[2]}_{g.key[3]}_curves")
            p = plot_curves(g, plot_dir / f"{name}.png", colors)
            out[f"{t.slug}/{g.key[2]}/{g.key[3]}"] = [p] if p else []
            if g.tuned:
                name = _safe(f"{t.slug}_{g.key[2]}_{g.key[3]}-expected-val")
                p = plot_expected_val(g, plot_dir / f"{name}.png", colors)
                out[f"{t.slug}/{g.key[2]}/{g.key[3]}/expected-val"] = [p] if p else []
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
