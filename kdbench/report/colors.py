"""One colour per method label, the same on every page and plot of every table.

A colour is a function of the label alone (never of which other labels a plot shows): the registered methods
have a fixed colour each (the student alone is grey), and any other label (an ablation such as
``scalekd_no_tpp``, a live-teacher twin such as ``kd_live``) gets one from a second palette by a stable hash of
its name (SHA-256, not Python's salted ``hash``). A tuned cell and its untuned twin share the label's colour
(plots draw the untuned one hollow).
"""

from __future__ import annotations

import hashlib

from kdbench.report.aggregate import BASELINE, UNTUNED_SUFFIX

#: The student alone.
BASELINE_COLOR = "#595959"

# Fixed colours of the registered methods: distinct from each other and from the grey of the baseline.
_FIXED = {
    BASELINE: BASELINE_COLOR,
    "kd": "#1f77b4",
    "dkd": "#ff7f0e",
    "dist": "#2ca02c",
    "funmatch": "#d62728",
    "fitnet": "#9467bd",
    "at": "#8c564b",
    "rkd": "#e377c2",
    "pkt": "#bcbd22",
    "crd": "#17becf",
    "takd": "#393b79",
    "amd": "#8c6d31",
    "scalekd": "#7b4173",
    "indistill": "#637939",
}
# Every other label: a colour of this palette, by a stable hash of the label (none is one of the fixed ones).
_HASHED = (
    "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8", "#e7969c", "#de9ed6", "#ad494a", "#5254a3", "#b5cf6b",
    "#e7ba52", "#3182bd", "#31a354",
)  # fmt: skip


def method_color(label: str) -> str:
    """The colour (``#rrggbb``) of a method label; ``"<label> (untuned)"`` has its label's colour."""
    label = label.removesuffix(UNTUNED_SUFFIX)
    if label in _FIXED:
        return _FIXED[label]
    digest = hashlib.sha256(label.encode("utf-8")).digest()
    return _HASHED[int.from_bytes(digest[:4], "big") % len(_HASHED)]
