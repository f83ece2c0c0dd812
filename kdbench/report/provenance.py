"""Provenance of a leaderboard: collapse identical values, flag the runs that differ.

Every provenance column of the runs table (``prov.*``, ``pkg.*``, ``plugin.*``, ``store.*``, ``protocol_hash``)
is compared within its scope: environment columns (kdbench version, git commit and the uncommitted files of
a ``+dirty`` checkout, python, packages, the plugins a method or model comes from, device, CPU model and capability, threads) across all runs, the
config hash within a (dataset, protocol, method label) since it covers the method's entry (a final tuned
run's, which covers its selected values, within the tuned runs of its label), the data manifest within a
dataset, the teacher digest and the store manifests within a (dataset, protocol,
teacher), except for runs distilled from their own assistant (``assistant_time_s`` set, TAKD), which are
scoped per run; the protocol hash is listed per table (records of different protocols are never
compared, so it is never flagged). Config-file paths and per-run model digests are kept in the runs table
but not compared. Within a scope the most common value is the reference; a run holding another value is
flagged with the column names in ``provenance_differs``. Empty values (a baseline run has no teacher
digest; older records have no CPU or dirty files) are neither compared nor flagged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, MutableMapping, Sequence

from kdbench.report._format import csv_value

_SCOPES: dict[str, tuple[str, ...]] = {
    "prov.data_manifest_sha256": ("dataset",),
    "prov.config_hash": ("dataset", "protocol_hash", "method"),  # the hash covers the method's entry
    "protocol_hash": ("dataset", "protocol_hash"),  # listed per table; tables never mix protocols
}
_TEACHER_SCOPE = ("dataset", "protocol_hash", "teacher")
# Differ between runs by design: machine-specific paths and per-run digests.
_SKIP = ("prov.config_file", "prov.model_sha256")


def provenance_columns(columns: Sequence[str]) -> list[str]:
    """The columns of the runs table that carry comparable provenance, in table order."""
    return [
        c
        for c in columns
        if (c.startswith(("prov.", "pkg.", "plugin.", "store.")) or c == "protocol_hash") and c not in _SKIP
    ]


def _scope(column: str, row: Mapping[str, Any]) -> tuple[str, ...]:
    """The values of ``row`` that delimit the scope in which ``column`` must agree."""
    if column == "prov.teacher_sha256" or column.startswith("store."):
        keys = _TEACHER_SCOPE
        if row.get("assistant_time_s") is not None:  # distilled from its own assistant (TAKD): per run
            return (*(str(row[k]) for k in keys), f"{row['method']} seed {row['seed']} (assistant)")
    else:
        keys = _SCOPES.get(column, ())
    scope = tuple(str(row[k]) for k in keys)
    if column == "prov.config_hash" and row.get("tuned"):  # a tuned run's config holds its selected values
        scope += ("tuned",)
    return scope


@dataclass
class ProvenanceField:
    """The values one provenance column takes within one scope.

    Attributes:
        column: Runs-table column (e.g. ``pkg.torch``).
        scope: The scope's values (e.g. ``("cifar100", "resnet32x4")``), empty for global columns.
        values: Count of runs per value, most common first.
    """

    column: str
    scope: tuple[str, ...]
    values: list[tuple[Any, int]] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        """Whether runs in the scope disagree."""
        return len(self.values) > 1


def summarize_provenance(
    rows: Sequence[MutableMapping[str, Any]], columns: Sequence[str]
) -> tuple[list[ProvenanceField], dict[str, list[str]]]:
    """Collapses provenance values per scope and flags deviating runs.

    Adds (or overwrites) the ``provenance_differs`` column of every row: the ``;``-joined columns in which
    the run differs from the most common value of its scope (``""`` when none).

    Args:
        rows: Runs-table rows (updated in place).
        columns: The runs-table columns.

    Returns:
        The fields (one per column and scope) and, per flagged run (``record`` column), its deviating columns.
    """
    fields: list[ProvenanceField] = []
    flagged: dict[str, list[str]] = {}
    for column in provenance_columns(columns):
        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:
            if row.get(column) not in (None, ""):
                groups.setdefault(_scope(column, row), []).append(row)
        for scope, members in sorted(groups.items()):
            # Values as runs.csv writes them, so a table rebuilt from runs.csv (text) reads as one built from
            # the records (bools, numbers): `true`, not `True`.
            counts = Counter(csv_value(row[column]) for row in members)
            # Most common first; ties broken by the value's text so the reference is deterministic.
            values = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            fields.append(ProvenanceField(column, scope, values))
            reference = values[0][0]
            for row in members:
                if csv_value(row[column]) != reference:
                    flagged.setdefault(row["record"], []).append(column)
    for row in rows:
        row["provenance_differs"] = ";".join(flagged.get(row["record"], []))
    return fields, flagged
