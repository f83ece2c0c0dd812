"""What a study shows, from the rows of its ``study.csv`` alone: its table (:func:`study_table`) and its plot
(``study.png``, :func:`plot_study`). The workflow's study report and a published study's page
(:mod:`kdbench.report.site`) are made by this code from that file.

The plot:
Top-1 (mean, 95% interval) against store bytes (log x), one line per method, store policy and protocol over V;
every run without a store (the live teacher, a method that needs it online) is a horizontal reference line with
its interval as a band.

Nothing overlaps: the legend is under the axes; each point's label (``V=k``, or the policy of a single store)
is placed beside its point where it covers no other label, point or reference line
(:func:`kdbench.report.plots.place_labels`); x ticks are round sizes (1, 2, 5 per decade), never rotated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from kdbench.report import _format as fmt
from kdbench.report.colors import method_color
from kdbench.report.plots import draw_interval, fit_range, place_labels, save_png

Row = Mapping[str, Any]
#: Marker per store policy kind (full logits, top-k; top-k hollow).
_MARKERS = {"full": "o", "topk": "^"}


LEGEND = (
    "Last-epoch test top-1, mean ± std over seeds with the 95% t-interval; `Δ vs live` is the paired difference to"
    " the live-teacher run of the same method and protocol (by seed). Store bytes: the shard files of the store"
    " the runs read; B/view: the stored teacher outputs per (sample, view). Teacher forwards per run count the"
    " live teacher; a store's are spent once and shared by every run reading it. `protocol`: the keys (besides V)"
    " in which a table's protocol differs from the study's other tables."
)
STUDY_HEADERS = (
    "table", "method", "teacher", "store", "protocol", "V", "E", "store bytes", "B/view", "top-1 (%)", "95% CI",
    "n", "Δ vs live (paired)", "teacher fwd/run", "store build fwd", "train loss",
)  # fmt: skip


def _gap(r: Row) -> str:
    """``Δ vs live``: the paired mean and interval, or the mean and the paired seeds when there is no interval."""
    n, mean, low, high = r.get("gap_n"), r.get("gap_vs_live"), r.get("gap_ci95_low"), r.get("gap_ci95_high")
    if n is None:
        return ""
    if not n:
        return "no paired seed"
    if low is None:
        return f"{fmt.num(mean, 2, sign=True)} (n={n}, no interval)"
    return f"{fmt.num(mean, 2, sign=True)} [{fmt.num(low, 2, True)}, {fmt.num(high, 2, True)}] (n={n})"


def _top1(r: Row) -> str:
    if r.get("top1_mean") is None:
        return ""
    if r.get("top1_std") is None:
        return f"{fmt.num(r['top1_mean'])} (1 seed)"
    return f"{fmt.num(r['top1_mean'])} ± {fmt.num(r['top1_std'])}"


def study_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """The study's table as text: :data:`STUDY_HEADERS` and one row per ``study.csv`` row."""
    body = [
        [str(r["table"]), str(r["method"]), str(r["teacher_source"]), r.get("store_policy") or fmt.DASH,
         r.get("protocol_variant") or "", str(r.get("views") or ""), str(r.get("epochs") or ""),
         fmt.si(r.get("store_bytes"), "B"), str(r.get("payload_bytes_per_view") or ""), _top1(r),
         f"± {fmt.num(r['top1_ci95'])}" if r.get("top1_ci95") is not None else "", str(r.get("seeds") or 0),
         _gap(r), fmt.si(r.get("teacher_forward")), fmt.si(r.get("store_build_forward")),
         fmt.num(r.get("train_loss_last"), 4)]
        for r in rows
    ]  # fmt: skip
    return list(STUDY_HEADERS), body


def _family(row: Row) -> tuple[str, str]:
    return str(row["method_name"]), str(row["params"])


def family_labels(rows: Sequence[Row]) -> dict[tuple[str, str], str]:
    """``(method name, parameters)`` -> the label of its cached rows (``kd`` for ``kd`` and ``kd_live``): a
    reference line has the colour of the method it is the reference of."""
    out: dict[tuple[str, str], str] = {}
    for r in sorted(rows, key=lambda r: r["teacher_source"] != "cache"):
        out.setdefault(_family(r), str(r["method"]))
    return out


def series(rows: Sequence[Row]) -> dict[tuple[str, str, str], list[Row]]:
    """Rows with a store and a result, by (method label, store policy, protocol variant): a line each."""
    out: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.get("store_bytes") and r.get("top1_mean") is not None:
            key = (str(r["method"]), str(r.get("store_policy") or ""), str(r.get("protocol_variant") or ""))
            out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["store_bytes"]) for k, v in out.items()}


def series_label(key: tuple[str, str, str]) -> str:
    method, policy, variant = key
    return f"{method} ({', '.join(filter(None, [policy, variant]))})"


def plot_study(rows: Sequence[Row], name: str, path: Path) -> Path:
    """Draws ``study.png`` from the rows of ``study.csv`` (a figure saying so when no row has a result).

    Returns:
        ``path``.
    """
    lines = series(rows)
    refs = [
        r for r in rows
        if not r.get("store_bytes") and r.get("teacher_source") not in (None, "", "none")
        and r.get("top1_mean") is not None
    ]  # fmt: skip
    if not lines and not refs:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, f"study {name}: no finished run", ha="center")
        return save_png(fig, path)
    families = family_labels(rows)
    fig = Figure(figsize=(8.0, 6.4), layout="constrained")
    ax = fig.add_subplot()
    points = [r for members in lines.values() for r in members]
    ylim = fit_range(
        [r["top1_mean"] for r in points + refs], [r.get("top1_ci95") or 0.0 for r in points + refs], upper=100.0
    )
    handles, labels = [], []
    for key, members in lines.items():
        color, topk = method_color(key[0]), key[1].startswith("top-")
        marker = _MARKERS["topk" if topk else "full"]
        if len(members) > 1:
            ax.plot([r["store_bytes"] for r in members], [r["top1_mean"] for r in members], color=color, lw=1.2,
                    ls="--" if key[2] else "-")
        for r in members:
            draw_interval(ax, r["top1_mean"], r["store_bytes"], r.get("top1_ci95") or 0.0, ylim, color,
                          vertical=True, marker=marker, hollow=topk)
            text = f"V={r['views']}" if len(members) > 1 else ", ".join(filter(None, key[1:])) or f"V={r['views']}"
            labels.append((r["store_bytes"], r["top1_mean"], text, color))
        handles.append(Line2D([], [], color=color, marker=marker, mfc="white" if topk else color,
                              ls=("--" if key[2] else "-") if len(members) > 1 else "", label=series_label(key)))
    rules = []
    for r in refs:
        color = method_color(families[_family(r)])
        ls = "--" if r["teacher_source"] == "live" else ":"
        ax.axhline(r["top1_mean"], color=color, ls=ls, lw=1.2, zorder=0)
        rules.append(r["top1_mean"])
        if r.get("top1_ci95"):
            ax.axhspan(r["top1_ci95_low"], r["top1_ci95_high"], color=color, alpha=0.07, lw=0, zorder=0)
        fwd = fmt.si(r.get("teacher_forward"))
        handles.append(Line2D([], [], color=color, ls=ls, label=f"{r['method']} ({r['teacher_source']},"
                              f" E={r['epochs']}): {r['top1_mean']:.2f}%, {fwd} teacher fwd/run"))
    if points:
        ax.set_xscale("log")
        xs = [r["store_bytes"] for r in points]
        ax.set_xlim(min(xs) / 1.35, max(xs) * 1.35)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda b, _: fmt.si(b, "B")))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(*ylim)
    ax.set_xlabel("teacher-output store (bytes of its shard files, log scale)")
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(
        f"Study {name}: accuracy vs store bytes\nmean over seeds, bars = 95% t-interval (arrow: it goes on)\n"
        "horizontal lines: runs without a store (band: their 95% interval)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="major")
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    drawn = [[(r["store_bytes"], r["top1_mean"]) for r in members] for members in lines.values() if len(members) > 1]
    place_labels(fig, ax, labels, rules, drawn)
    return save_png(fig, path)
