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

from kdbench.cache.store import IDENTITY_KEYS, POLICY_NOT_STORED, check_identity, store_identity
from kdbench.config import (
    DATA_READ_KEYS,
    CachePolicy,
    DataConfig,
    MethodEntry,
    Protocol,
    TeacherConfig,
    ViewRecipe,
    parse_config,
)
from kdbench.data.prepare import group_count, merge, write_group
from kdbench.errors import DataShardError, StoreError
from kdbench.plan import DistillJob, Plan, Table
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


# --- a store's identity, as the reader checks it -----------------------------------------------------------------


def test_the_reader_refuses_a_manifest_that_differs_in_any_identity_field_naming_it():
    expect = store_identity(*IDENTITY, numerics={"precision": "bf16"})
    assert set(expect) == set(IDENTITY_KEYS)  # every identity field, the optional one included
    check_identity("<store>", dict(expect), expect)  # the same identity passes
    for key in IDENTITY_KEYS:
        manifest = {**expect, key: _other(expect[key])}
        with pytest.raises(StoreError, match=rf"field '{key}' is "):
            check_identity("<store>", manifest, expect)
        missing = {k: v for k, v in expect.items() if k != key}  # a manifest written without the field
        with pytest.raises(StoreError, match=rf"field '{key}' is None"):
            check_identity("<store>", missing, expect)
    # An optional field the store has but the run does not expect (a bf16 store read by an fp32 run).
    plain = store_identity(*IDENTITY)
    with pytest.raises(StoreError, match=r"field 'teacher_numerics' is \{'precision': 'bf16'\} but this run expects None"):
        check_identity("<store>", expect, plain)


# --- the plan's keys and hashes ----------------------------------------------------------------------------------

# Valid other values for the fields whose _other() the config would refuse (the keys are computed from the
# dataclasses, so only the methods that build models or read data need valid values).
_VALID_OTHER = {
    "precision": "bf16", "optimizer": "adamw", "schedule": "step", "student_lr": {"cnn_xs": 0.2},
    "retrieval_tap": "pre_logits", "logits_dtype": "float32", "feature_dtype": "float32", "stream": True,
    "source": "cifar100", "milestones": (2,),
}
# DataConfig fields that name no data directory, and why (every other field is in the data key).
DATA_NOT_IN_DATA_KEY = {
    "shards_per_job": "how the data jobs are split, not what they write",
    "stream": "how jobs read the shards (in the job and teacher keys instead)",
    "workers": "how jobs read the shards (in the job and teacher keys instead)",
    "shuffle_buffer": "how jobs read the shards (in the job and teacher keys instead)",
}
# Protocol fields in a teacher-output store's key (the teacher's forward over the views); the others train students.
PROTOCOL_IN_STORE_KEY = {"views", "eval_batch_size", "precision", "channels_last"}
# TeacherConfig fields not in a teacher's key: checks of the teacher, not what defines it.
TEACHER_NOT_IN_KEY = {"expected_top1": "a check of a loaded teacher's accuracy",
                      "top1_tolerance": "a check of a loaded teacher's accuracy"}


def _changed(obj: Any, name: str) -> Any:
    value = getattr(obj, name)
    if name in _VALID_OTHER and _VALID_OTHER[name] != value:
        new = _VALID_OTHER[name]
    elif dataclasses.is_dataclass(value):  # a nested dataclass: change its first field
        first = dataclasses.fields(value)[0].name
        new = _changed(value, first)
    else:
        new = _other(value)
    return dataclasses.replace(obj, **{name: new})


def _plan_keys(cfg, stores: bool = True) -> dict[str, Any]:
    """The keys the plan derives for a config's teacher ``t``, data, ``kd`` job and its stores, the ``takd``
    assistant (with the stores it is distilled from) and the teacher-less ``baseline`` job."""
    plan = Plan.__new__(Plan)  # the key methods read the tables only; no data is prepared or checked
    plan.tables, plan.teachers, plan.stores, plan.data = {cfg.name: Table(cfg, "<field-complete>")}, {}, {}, {}
    job = DistillJob(cfg.name, "t", "cnn_xs", "kd", 0)
    keys = {"data": plan.data_key(cfg.name), "teacher": plan.teacher_key(cfg.name, "t").key, "job": plan.job_hash(job),
            "assistant": plan.assistant_key(cfg.name, "t", "takd").key,
            "baseline_job": plan.job_hash(DistillJob(cfg.name, "t", "cnn_xs", "baseline", 0))}
    if stores:
        keys["store"] = sorted(sk.dir for sk in plan.job_stores(job).values())
        keys["assistant_store"] = sorted(sk.dir for sk in plan.assistant_stores(cfg.name, "t", "takd").values())
    return keys


@pytest.fixture(scope="module")
def key_cfg(tmp_path_factory):
    root = write_fmnist_idx(tmp_path_factory.mktemp("keys") / "raw")
    methods = {"baseline": {}, "kd": {}, "takd": {"assistant": "cnn_xs"}}
    return parse_config(tiny_raw(root, methods=methods), source="<keys>")


def test_equal_configs_give_equal_plan_keys(key_cfg):
    again = copy.deepcopy(key_cfg)
    assert _plan_keys(again) == _plan_keys(key_cfg)
    assert len(_plan_keys(key_cfg)["store"]) == 1


def test_every_data_field_is_in_the_data_key_unless_listed_and_in_every_jobs_hash(key_cfg):
    base = _plan_keys(key_cfg, stores=False)
    for f in dataclasses.fields(DataConfig):
        cfg = dataclasses.replace(key_cfg, data=_changed(key_cfg.data, f.name))
        keys = _plan_keys(cfg, stores=False)
        assert (keys["data"] != base["data"]) == (f.name not in DATA_NOT_IN_DATA_KEY), f.name
        # The teacher learns on this data (a loaded one would not): it is retrained when the data changes.
        for key in ("teacher", "job", "assistant", "baseline_job"):
            assert (keys[key] != base[key]) == (f.name != "shards_per_job"), (key, f.name)


def test_every_protocol_field_is_in_a_jobs_hash_and_the_stores_ones_in_its_key(key_cfg):
    base = _plan_keys(key_cfg)
    assert PROTOCOL_IN_STORE_KEY <= {f.name for f in dataclasses.fields(Protocol)}
    for f in dataclasses.fields(Protocol):
        cfg = dataclasses.replace(key_cfg, protocol=_changed(key_cfg.protocol, f.name))
        keys = _plan_keys(cfg)
        assert keys["job"] != base["job"] and keys["baseline_job"] != base["baseline_job"], f.name
        assert keys["assistant"] != base["assistant"], f.name  # the assistant trains under the table's protocol
        for key in ("store", "assistant_store"):
            assert (keys[key] != base[key]) == (f.name in PROTOCOL_IN_STORE_KEY), (key, f.name)
        assert keys["teacher"] == base["teacher"] and keys["data"] == base["data"], f.name  # the table's protocol


def test_every_view_recipe_and_cache_policy_field_changes_the_store_and_the_job(key_cfg):
    base = _plan_keys(key_cfg)
    for f in dataclasses.fields(ViewRecipe):
        protocol = dataclasses.replace(key_cfg.protocol, views=_changed(key_cfg.protocol.views, f.name))
        keys = _plan_keys(dataclasses.replace(key_cfg, protocol=protocol))
        assert all(keys[k] != base[k] for k in ("store", "job", "assistant", "assistant_store")), f.name
    for f in dataclasses.fields(CachePolicy):
        keys = _plan_keys(dataclasses.replace(key_cfg, cache=_changed(key_cfg.cache, f.name)))
        assert all(keys[k] != base[k] for k in ("store", "job", "baseline_job", "assistant", "assistant_store")), f.name
        assert keys["teacher"] == base["teacher"], f.name


def test_every_teacher_field_is_in_its_key_unless_listed(key_cfg):
    base = _plan_keys(key_cfg)
    teacher = key_cfg.teachers["t"]
    assert set(TEACHER_NOT_IN_KEY) <= {f.name for f in dataclasses.fields(TeacherConfig)}
    variants = {f.name: _changed(teacher, f.name) for f in dataclasses.fields(TeacherConfig) if f.name != "model"}
    variants["model"] = dataclasses.replace(teacher, model="cnn_m")
    variants["data"] = dataclasses.replace(teacher, data=dataclasses.replace(key_cfg.data, val_size=30))
    for f in dataclasses.fields(Protocol):  # the teacher's own training protocol, field by field
        variants[f"train.{f.name}"] = dataclasses.replace(teacher, train=_changed(teacher.train, f.name))
    for name, changed in variants.items():
        keys = _plan_keys(dataclasses.replace(key_cfg, teachers={"t": changed}))
        assert (keys["teacher"] != base["teacher"]) == (name not in TEACHER_NOT_IN_KEY), name
        # A new teacher means new stores, new jobs and a new assistant; the student alone reads no teacher.
        for key in ("store", "job", "assistant", "assistant_store"):
            assert (keys[key] != base[key]) == (keys["teacher"] != base["teacher"]), (key, name)
        assert keys["baseline_job"] == base["baseline_job"], name


def test_every_method_entry_field_is_in_its_jobs_hash(key_cfg):
    base = _plan_keys(key_cfg, stores=False)
    entry = key_cfg.methods["kd"]
    variants = {"label": dataclasses.replace(entry, label="kd2"),
                "method": dataclasses.replace(entry, method="dkd"),
                "params": dataclasses.replace(entry, params={"tau": 2.0}),
                "teacher_source": dataclasses.replace(entry, teacher_source="live")}
    assert set(variants) == {f.name for f in dataclasses.fields(MethodEntry)}
    for name, changed in variants.items():
        keys = _plan_keys(dataclasses.replace(key_cfg, methods={**key_cfg.methods, "kd": changed}), stores=False)
        assert keys["job"] != base["job"], name
        assert all(keys[k] == base[k] for k in ("teacher", "data", "assistant", "baseline_job")), name
    takd = key_cfg.methods["takd"]  # an assistant is its method entry's: each field of it makes another
    for name, changed in {"params": dataclasses.replace(takd, params={**takd.params, "tau": 2.0}),
                          "method": dataclasses.replace(takd, method="amd", params={}),
                          "teacher_source": dataclasses.replace(takd, teacher_source="live")}.items():
        keys = _plan_keys(dataclasses.replace(key_cfg, methods={**key_cfg.methods, "takd": changed}), stores=False)
        assert keys["assistant"] != base["assistant"] and keys["job"] == base["job"], name


def test_a_loaded_teachers_key_ignores_how_jobs_read_the_data(key_cfg):
    """A teacher loaded from a checkpoint learns on nothing here: the data's reading keys (stream, workers,
    shuffle buffer) leave its key alone, while a trained teacher's changes with them; an assistant, trained on
    the table's data either way, changes with them."""
    loaded = dataclasses.replace(key_cfg, teachers={"t": dataclasses.replace(key_cfg.teachers["t"],
                                                                         checkpoint="/ckpt/t.pt")})
    for cfg, moves in ((loaded, False), (key_cfg, True)):
        base = _plan_keys(cfg, stores=False)
        for name in DATA_READ_KEYS:
            keys = _plan_keys(dataclasses.replace(cfg, data=_changed(cfg.data, name)), stores=False)
            assert (keys["teacher"] != base["teacher"]) is moves and keys["assistant"] != base["assistant"], name
