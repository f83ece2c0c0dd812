"""Field-complete tests: identities, keys and consistency checks tested by enumerating their fields (so a field
added without a test, or left out of a check, fails here), and tabulated constants asserted whole against an
independent computation."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from _helpers_store import tiny_raw, write_fmnist_idx

from kdbench.cache.store import IDENTITY_KEYS, POLICY_NOT_STORED, store_identity
from kdbench.config import CachePolicy, ViewRecipe, parse_config
from kdbench.data.prepare import group_count, merge, write_group
from kdbench.errors import DataShardError
from kdbench.report.stats import t_critical_95


def _other(value: Any) -> Any:
    """A different value of the same kind (for any field of the dataclasses and JSON parts below)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.01
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return tuple(_other(v) for v in value)
    if isinstance(value, list):
        return [*value, value[-1] if value else 0]
    if isinstance(value, dict):
        return {**value, "_other": 1}
    if value is None:
        return 2
    raise TypeError(f"no other value for {value!r}")


# --- the statistics table ---------------------------------------------------------------------------------------


def _t_quantile_975(df: int) -> float:
    """t(0.975, df) from the Student-t density alone: Simpson's rule for the CDF on [0, x], bisection for x."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def mass(x: float, n: int = 4000) -> float:  # integral of the density over [0, x]
        h = x / n
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 20.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if mass(mid) < 0.475 else (low, mid)
    return (low + high) / 2


def test_every_tabulated_t_value_is_the_students_t_quantile_to_three_decimals():
    for df in range(1, 31):
        assert t_critical_95(df) == pytest.approx(_t_quantile_975(df), abs=6e-4), df
    assert t_critical_95(31) == t_critical_95(1000) == pytest.approx(1.95996, abs=6e-4)


# --- a store's identity -----------------------------------------------------------------------------------------


IDENTITY = ("0" * 64, "logits", ViewRecipe(), CachePolicy(), 28)


def test_every_cache_policy_field_is_in_a_stores_identity_unless_listed_with_its_reason():
    names = {f.name for f in dataclasses.fields(CachePolicy)}
    assert set(POLICY_NOT_STORED) <= names and all(POLICY_NOT_STORED.values())
    base = store_identity(*IDENTITY)
    assert set(base) == set(IDENTITY_KEYS) - {"teacher_numerics"}
    for name in sorted(names - set(POLICY_NOT_STORED)):
        policy = dataclasses.replace(CachePolicy(), **{name: _other(getattr(CachePolicy(), name))})
        assert store_identity(*IDENTITY[:3], policy, IDENTITY[4])["policy"] != base["policy"], name
    for name in POLICY_NOT_STORED:
        policy = dataclasses.replace(CachePolicy(), **{name: _other(getattr(CachePolicy(), name))})
        assert store_identity(*IDENTITY[:3], policy, IDENTITY[4]) == base, name


def test_every_view_recipe_field_changes_a_stores_identity():
    base = store_identity(*IDENTITY)
    for f in dataclasses.fields(ViewRecipe):
        recipe = dataclasses.replace(ViewRecipe(), **{f.name: _other(getattr(ViewRecipe(), f.name))})
        assert store_identity(IDENTITY[0], IDENTITY[1], recipe, *IDENTITY[3:]) != base, f.name
    for i, value in enumerate(IDENTITY):
        if i in (2, 3):
            continue
        args = list(IDENTITY)
        args[i] = _other(value)
        assert store_identity(*args) != base, i


# --- the data merge ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Any, Path, list[dict]]:
    root = tmp_path_factory.mktemp("merge")
    raw = tiny_raw(write_fmnist_idx(root / "raw"))
    raw["data"] = {**raw["data"], "shard_size": 64, "shards_per_job": 1}
    cfg = parse_config(raw, source="<merge>")
    out = root / "data"
    assert group_count(cfg.data) >= 2
    return cfg, out, [write_group(cfg.data, out, g) for g in range(group_count(cfg.data))]


def test_every_field_of_a_data_part_is_checked_by_the_merge(parts):
    cfg, out, good = parts
    assert merge(cfg.data, out, good)["splits"]
    fields = sorted(set(good[1]) - {"shards"})
    assert {"encoding", "native_size", "channels", "class_names", "data_config", "group"} <= set(fields)
    for name in fields:
        changed = copy.deepcopy(good)
        changed[1][name] = _other(changed[1][name])
        with pytest.raises(DataShardError, match=rf"its [^)]*\b{name}\b[^)]* differ"):
            merge(cfg.data, out, changed)
