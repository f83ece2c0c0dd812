"""Tests of the report package: statistics, rank rule, records, and the files of a whole leaderboard.

Synthetic run records are written into ``tmp_path`` by :func:`make_record`; expected numbers are computed
by hand in the comments.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from kdbench.errors import RecordError
from kdbench.report.aggregate import LeaderboardCell, build_tables, rank_cells
from kdbench.report.display import report_view
from kdbench.report.leaderboard import write_leaderboard
from kdbench.report.provenance import summarize_provenance
from kdbench.report.published import published_result, published_teacher
from kdbench.report.records import load_runs, read_epochs, runs_columns
from kdbench.report.stats import paired_delta, summarize, t_critical_95

_PROVENANCE = {
    "kdbench_version": "0.1.0",
    "git_commit": "0123456789abcdef0123456789abcdef01234567",
    "packages": {"torch": "2.14.1", "timm": "1.0.20", "numpy": "2.4.6"},
    "python": "3.11.2",
    "device": "cpu",
    "torch_threads": 1,
    "config_file": "workflow/config/cifar100.yaml",
    "config_hash": "c0ffee123456",
    "teacher_sha256": "ab" * 32,
    "data_manifest_sha256": "cd" * 32,
    "store_manifests": {"logits": "ef" * 32},
}


def make_record(
    root: Path,
    *,
    method: str = "kd",
    seed: int = 0,
    top1: float = 70.0,
    method_name: str | None = None,
    dataset: str = "cifar100",
    protocol_hash: str = "proto1",
    teacher: str = "t32x4",
    teacher_model: str = "resnet32x4",
    student: str = "resnet8x4",
    status: str = "ok",
    skip_reason: str | None = None,
    params: dict[str, Any] | None = None,
    best_val_test: float | None = None,
    retrieval: dict[str, float] | None = None,
    live_teacher: bool = False,
    views: int = 2,
    epochs: int = 4,
    provenance: dict[str, Any] | None = None,
    student_params: int | None = None,
) -> Path:
    """Writes one synthetic ``record.json`` (and its ``epochs.jsonl``) and returns the record's path."""
    method_name = method_name or method
    run_dir = root / dataset / protocol_hash / teacher / student / method / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {
        "schema_version": 1,
        "status": status,
        "skip_reason": skip_reason,
        "identity": {
            "config": "test",
            "dataset": dataset,
            "teacher": teacher,
            "teacher_model": teacher_model,
            "student": student,
            "method": method,
            "method_name": method_name,
            "params": params
            if params is not None
            else ({} if method_name == "baseline" else {"T": 4.0, "alpha": 0.9}),
            "seed": seed,
        },
        "protocol": {"epochs": epochs, **({"retrieval_tap": "pre_logits"} if retrieval else {})},
        "protocol_hash": protocol_hash,
    }
    if status == "ok":  # a skipped record (as distill writes it) has no views, final, cost or provenance
        rec["views"] = {"count": views, "epochs": epochs, "repeats": epochs > views}
        rec["epochs_file"] = "epochs.jsonl"
        teacher_run = method_name != "baseline"
        rec["final"] = {
            "test_top1": top1,
            "test_top5": min(100.0, top1 + 20),
            "val_top1": top1 + 0.5,
            "best_epoch": epochs - 2,
            "best_val_top1": top1 + 0.7,
            "test_top1_at_best_val": best_val_test if best_val_test is not None else top1 - 0.1,
            "teacher_agreement": 80.0 + seed if teacher_run else 75.0,
            "teacher_test_top1": 79.1,
            **(retrieval or {}),  # map_cosine, map_euclidean, p100_cosine, p100_euclidean (None when not measured)
        }
        rec["cost"] = {
            "wall_time_s": 100.0 + seed,
            "train_time_s": 90.0,
            "student_params": student_params or (1_233_124 if student == "resnet8x4" else 278_324),
            "extra_params": 0,
            "teacher_forward": 5000 if live_teacher else 0,
            "student_forward": 20000,
            "cache_bytes_read": 2_500_000_000 if teacher_run and not live_teacher else 0,
            "assistant_time_s": None,
        }
        rec["requirements"] = {"live_teacher": live_teacher, "sample_index": False, "full_logits": False}
        prov = copy.deepcopy(_PROVENANCE)
        if not teacher_run:
            prov["store_manifests"] = {}
        prov.update(provenance or {})
        rec["provenance"] = prov
        with open(run_dir / "epochs.jsonl", "w") as f:
            for e in range(epochs):
                test = top1 - 30.0 * (1.0 - (e + 1) / epochs) ** 2
                f.write(
                    json.dumps(
                        {
                            "epoch": e,
                            "view": e % views,
                            "lr": 0.05,
                            "train_loss": 2.0 / (e + 1),
                            "terms": {"ce": 1.0},
                            "val_top1": test + 0.5,
                            "test_top1": test,
                            "time_s": 20.0,
                            "samples_per_s": 1000.0,
                        }
                    )
                    + "\n"
                )
    path = run_dir / "record.json"
    path.write_text(json.dumps(rec, indent=1))
    return path


# Hand-computed reference grid (teacher t32x4 -> resnet8x4, seeds 0, 1, 2):
#   baseline 70.0, 71.0, 72.0 : mean 71, std 1, ci = 4.303 * 1 / sqrt(3) = 2.484339
#   kd       72.0, 74.5, 73.1 : mean 73.2, SS = 1.44 + 1.69 + 0.01 = 3.14, std = sqrt(1.57) = 1.252996,
#                               ci = 4.303 * 1.252996 / sqrt(3) = 3.112869
#            paired d = 2.0, 3.5, 1.1 : mean 2.2, SS = 0.04 + 1.69 + 1.21 = 2.94, sd = sqrt(1.47) = 1.212436,
#                               ci = 4.303 * 1.212436 / sqrt(3) = 3.012105
BASE = [70.0, 71.0, 72.0]
KD = [72.0, 74.5, 73.1]
# Retrieval (teacher t32x4 -> resnet20, seeds 0, 1, 2), paired like top-1:
#   map_cosine     baseline 40, 41, 42 (mean 41, std 1); kd 45, 47, 46 (mean 46, std 1)
#                  d = 5, 6, 4: mean 5, sd 1, ci 4.303 / sqrt(3) = 2.484339 -> [+2.52, +7.48]
#   map_euclidean  baseline 35, 36, 37 (mean 36, std 1); kd 38, 38.5, 40.5 (mean 39, SS 3.5, std 1.322876)
#                  d = 3, 2.5, 3.5: mean 3, sd 0.5, ci 4.303 * 0.5 / sqrt(3) = 1.242170 -> [+1.76, +4.24]
RETRIEVAL_BASE = {"map_cosine": [40.0, 41.0, 42.0], "map_euclidean": [35.0, 36.0, 37.0],
                  "p100_cosine": [30.0, 31.0, 32.0], "p100_euclidean": [29.0, 30.0, 31.0]}
RETRIEVAL_KD = {"map_cosine": [45.0, 47.0, 46.0], "map_euclidean": [38.0, 38.5, 40.5],
                "p100_cosine": [33.0, 34.0, 35.0], "p100_euclidean": [32.0, 33.0, 34.0]}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed, (b, k) in enumerate(zip(BASE, KD)):
        paths.append(make_record(root, method="baseline", seed=seed, top1=b))
        paths.append(make_record(root, method="kd", seed=seed, top1=k))
        paths.append(
            make_record(
                root, method="dkd", seed=seed, top1=76.0 + 0.2 * seed, params={"alpha": 1.0, "beta": 8.0}
            )
        )
        paths.append(make_record(root, method="scalekd", seed=seed, top1=74.0 + seed, live_teacher=True))
        paths.append(
            make_record(
                root,
                method="crd",
                seed=seed,
                status="skipped",
                skip_reason="needs sample_index, not provided by this store",
            )
        )
    # Only one seed paired with the baseline: no delta; seed 1 skipped.
    paths.append(make_record(root, method="fitnet", seed=0, top1=72.0))
    paths.append(make_record(root, method="fitnet", seed=1, status="skipped", skip_reason="out of memory"))
    # Second student (with retrieval mAP: RETRIEVAL_BASE, RETRIEVAL_KD) and a run with a different torch build.
    for seed in range(3):
        paths.append(
            make_record(
                root,
                method="baseline",
                student="resnet20",
                seed=seed,
                top1=68.0 + seed,
                retrieval={k: v[seed] for k, v in RETRIEVAL_BASE.items()},
            )
        )
        prov = {"packages": {"torch": "2.15.0", "timm": "1.0.20", "numpy": "2.4.6"}} if seed == 2 else None
        paths.append(
            make_record(
                root,
                method="kd",
                student="resnet20",
                seed=seed,
                top1=69.5 + seed,
                retrieval={k: v[seed] for k, v in RETRIEVAL_KD.items()},
                provenance=prov,
            )
        )
    # The same dataset under another protocol.
    for seed in range(2):
        paths.append(
            make_record(root, method="baseline", protocol_hash="proto2", seed=seed, top1=60.0 + seed)
        )
        paths.append(make_record(root, method="kd", protocol_hash="proto2", seed=seed, top1=61.0 + seed))
    return paths


@pytest.fixture(scope="module")
def report(grid: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The leaderboard of :func:`grid`, built once for the module (tests only read it)."""
    out = tmp_path_factory.mktemp("leaderboard")
    (out / "plots").mkdir()
    (out / "plots" / "stale_from_an_earlier_report.png").write_bytes(b"old")  # must be removed
    return write_leaderboard(grid, out, "Synthetic KD leaderboard"), out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _row(rows: list[dict[str, str]], **match: str) -> dict[str, str]:
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, (match, len(hits))
    return hits[0]


# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    "df, expected",
    [
        (1, 12.706),
        (2, 4.303),
        (4, 2.776),
        (9, 2.262),
        (10, 2.228),
        (19, 2.093),
        (29, 2.045),
        (30, 2.042),
        (31, 1.960),
        (1000, 1.960),
    ],
)
def test_t_critical_values(df: int, expected: float) -> None:
    assert t_critical_95(df) == pytest.approx(expected, abs=5e-4)


def test_t_critical_is_decreasing_and_rejects_zero_df() -> None:
    values = [t_critical_95(df) for df in range(1, 40)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_summarize_against_hand_values() -> None:
    s = summarize(KD)
    assert s.n == 3
    assert s.mean == pytest.approx(73.2)
    assert s.std == pytest.approx(math.sqrt(1.57))  # 1.252996
    assert s.ci95 == pytest.approx(3.112869, abs=1e-5)
    assert summarize(BASE).ci95 == pytest.approx(2.484339, abs=1e-5)
    one = summarize([71.5])
    assert (one.n, one.mean, one.std, one.ci95) == (1, 71.5, None, None)
    assert summarize([]).mean is None
    assert summarize([1.0, None, 3.0]).mean == 2.0  # missing values are left out


def test_paired_delta_against_hand_values() -> None:
    d = paired_delta(dict(enumerate(KD)), dict(enumerate(BASE)))
    assert d.seeds == (0, 1, 2)
    assert d.diff.mean == pytest.approx(2.2)
    assert d.diff.std == pytest.approx(math.sqrt(1.47))
    assert d.diff.ci95 == pytest.approx(3.012105, abs=1e-5)
    assert (d.diff.low, d.diff.high) == pytest.approx((2.2 - 3.012105, 2.2 + 3.012105), abs=1e-5)
    assert d.note == ""


def test_paired_delta_uses_only_shared_seeds_and_needs_two() -> None:
    # Seeds 1 and 2 are shared: d = (74 - 71, 76 - 72) = (3, 4), mean 3.5, sd 0.7071,
    # ci = 12.706 * 0.7071 / sqrt(2) = 12.706 * 0.5 = 6.353.
    d = paired_delta({1: 74.0, 2: 76.0, 5: 99.0}, {0: 70.0, 1: 71.0, 2: 72.0})
    assert d.seeds == (1, 2)
    assert d.diff.mean == pytest.approx(3.5)
    assert d.diff.ci95 == pytest.approx(6.353, abs=1e-3)
    lonely = paired_delta({0: 72.0}, {0: 70.0, 1: 71.0})
    assert lonely.diff.mean is None and lonely.diff.ci95 is None
    assert "fewer than 2" in lonely.note and "n=1" in lonely.note


# ---------------------------------------------------------------------------------------------- rank rule


def _cell(method: str, top1: dict[int, float]) -> LeaderboardCell:
    """A cell of finished runs with the given test top-1 per seed."""
    cell = LeaderboardCell(("ds", "p", "t", "s", method))
    cell.runs = [{"seed": seed, "test_top1": value} for seed, value in sorted(top1.items())]
    cell.top1 = summarize(list(top1.values()))
    return cell


def _ranks(top1: dict[str, dict[int, float]]) -> dict[str, int | None]:
    cells = [_cell(method, values) for method, values in top1.items()]
    rank_cells(cells)
    return {c.method: c.rank for c in cells}


# Per-seed test top-1 copied from the committed results/leaderboard/fashion-mnist-default/runs.csv
# (teacher cnn_m). cnn_xs: kd - baseline = 1.55, 2.29, 1.77 (mean 1.87, paired 95% CI [0.93, 2.81]).
DEFAULT_CNN_XS = {
    "kd": {0: 84.240001, 1: 85.100001, 2: 85.320002},
    "baseline": {0: 82.690001, 1: 82.810003, 2: 83.55},
}
DEFAULT_VIT = {
    "baseline": {0: 77.249998, 1: 77.810001, 2: 78.969997},
    "kd": {0: 77.200001, 1: 79.140002, 2: 77.209997},
}
# ... and from results/leaderboard/fashion-mnist-zoo/runs.csv (cnn_m -> cnn_xs, seeds 0 and 1).
ZOO = {
    "at": {0: 53.02, 1: 60.99},
    "baseline": {0: 73.549998, 1: 76.279998},
    "crd": {0: 68.000001, 1: 74.049997},
    "dist": {0: 78.009999, 1: 78.539997},
    "dkd": {0: 74.049997, 1: 75.849998},
    "fitnet": {0: 69.859999, 1: 71.48},
    "kd": {0: 78.060001, 1: 77.209997},
    "pkt": {0: 71.319997, 1: 75.230002},
    "rkd": {0: 69.220001, 1: 71.649998},
    "takd": {0: 76.059997, 1: 76.130003},
}


def test_rank_rule_on_the_default_leaderboard() -> None:
    # cnn_xs: the paired interval of kd - baseline excludes 0 -> baseline opens tier 2.
    assert _ranks(DEFAULT_CNN_XS) == {"kd": 1, "baseline": 2}
    # vit: kd - baseline = -0.16 [-4.01, +3.69] -> one tier.
    assert _ranks(DEFAULT_VIT) == {"baseline": 1, "kd": 1}


def test_rank_rule_on_the_zoo() -> None:
    # By mean: dist 78.27, kd 77.63, takd 76.09, dkd 74.95, baseline 74.91, pkt 73.27, crd 71.02,
    # fitnet 70.67, rkd 70.43, at 57.01. With 2 seeds t = 12.706; the first cell below one of its tier is
    # fitnet: fitnet - dist = -8.15, -7.06: mean -7.605, sd 0.771, ci 12.706 * 0.771 / sqrt(2) = 6.93
    # -> [-14.53, -0.68].
    # rkd - fitnet = -0.64, +0.17 and at - fitnet / at - rkd are too noisy: both join fitnet's tier (rank 8).
    ranks = _ranks(ZOO)
    assert ranks == {m: 8 if m in ("fitnet", "rkd", "at") else 1 for m in ZOO}
    assert ranks["rkd"] > ranks["baseline"]  # rkd - baseline = -4.48 [-6.39, -2.57]


def test_rank_rule_checks_every_cell_of_the_tier() -> None:
    cells = {
        "a": _cell("a", {0: 80.0, 1: 76.0, 2: 84.0}),  # mean 80, noisy: opens tier 1
        "b": _cell("b", {0: 79.0, 1: 79.2, 2: 79.4}),  # b - a = -1, 3.2, -4.6: not below a -> rank 1
        # c - b = -1, -1, -1 (sd 0): below b although not below a (-2, 2.2, -5.6) -> opens tier 2, rank 3
        "c": _cell("c", {0: 78.0, 1: 78.2, 2: 78.4}),
        "d": _cell("d", {0: 77.0, 1: 77.5, 2: 78.5}),  # d - c = -1, -0.7, +0.1: not below c -> rank 3
        # Lower mean (73.07) but above c and d on the seeds they share (g - c = +1.5, +1.5): the paired
        # evidence contradicts the means, which is no reason for a new tier -> rank 3.
        "g": _cell("g", {0: 79.5, 1: 79.7, 3: 60.0}),
        "e": _cell("e", {5: 50.0, 6: 51.0}),  # no seed in common with anyone: not separable -> rank 3
        "f": _cell("f", {0: 90.0}),  # one seed: not ranked
    }
    rank_cells(list(cells.values()))
    expected = {"a": 1, "b": 1, "c": 3, "d": 3, "g": 3, "e": 3, "f": None}
    assert {k: c.rank for k, c in cells.items()} == expected
    assert any(n.startswith("ranked below b: paired Δ -1.00 [-1.00, -1.00] (n=3)") for n in cells["c"].notes)
    assert not any("ranked below" in n for c in (cells["a"], cells["b"], cells["d"]) for n in c.notes)
    assert any("not ranked" in n for n in cells["f"].notes)


def test_rank_rule_ties_share_a_rank() -> None:
    x = {0: 70.0, 1: 70.1, 2: 69.9}
    cells = [_cell("x", x), _cell("y", {s: v + 1.0 for s, v in x.items()}), _cell("z", dict(x))]
    rank_cells(cells)
    assert [c.rank for c in cells] == [2, 1, 2]


def test_rank_rule_orders_means_equal_up_to_float_noise_by_method_whatever_the_rounding() -> None:
    # The zoo's tuned pkt and takd: equal means (74.828) that differ in the last float bits depending on whether
    # the board is built from the records or rebuilt from runs.csv (6 decimals). Both must order pkt first.
    dist = {s: 76.4 + s / 10 for s in range(5)}
    for noise in (+1e-9, -1e-9, +4e-6, -4e-6):
        spread = (0.3, -0.3, 0.2, -0.2, 0.0)  # the same mean, other per-seed values
        takd = {s: 74.828 + noise + d for s, d in enumerate(spread)}
        pkt = {s: 74.828 - d for s, d in enumerate(spread)}
        cells = [_cell("takd", takd), _cell("dist", dist), _cell("pkt", pkt)]
        rank_cells(cells)
        first = next(c for c in cells if any(n.startswith("ranked below dist") for n in c.notes))
        assert first.method == "pkt", noise
        assert not any("ranked below" in n for n in cells[0].notes)


# ---------------------------------------------------------------------------------------------- records


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(RecordError, match=re.escape(str(bad))):
        write_leaderboard([bad], tmp_path / "out", "x")


def test_missing_key_names_file_and_key(tmp_path: Path) -> None:
    path = make_record(tmp_path, seed=0)
    rec = json.loads(path.read_text())
    del rec["final"]["test_top1"]
    path.write_text(json.dumps(rec))
    with pytest.raises(RecordError) as err:
        load_runs([path])
    assert str(path) in str(err.value) and "'final.test_top1'" in str(err.value)


def test_skipped_record_needs_no_final_but_a_reason(tmp_path: Path) -> None:
    path = make_record(tmp_path, method="crd", status="skipped", skip_reason="incompatible student")
    (row,) = load_runs([path])
    assert row["status"] == "skipped" and row["test_top1"] is None
    rec = json.loads(path.read_text())
    rec["skip_reason"] = None
    path.write_text(json.dumps(rec))
    with pytest.raises(RecordError, match="skip_reason"):
        load_runs([path])


def test_duplicate_runs_are_refused(tmp_path: Path) -> None:
    a = make_record(tmp_path / "a", seed=0)
    b = make_record(tmp_path / "b", seed=0)
    with pytest.raises(RecordError, match="same run"):
        load_runs([a, b])


def test_group_without_baseline_borrows_the_students_baseline(tmp_path: Path) -> None:
    paths = [make_record(tmp_path, method="baseline", seed=s, top1=70.0 + s) for s in range(2)]
    paths += [
        make_record(tmp_path, method="kd", teacher="t2", teacher_model="wrn_40_2", seed=s, top1=71.5 + s)
        for s in range(2)
    ]
    paths += [make_record(tmp_path, method="kd", student="resnet20", seed=s, top1=69.0) for s in range(2)]
    tables = build_tables(load_runs(paths))
    groups = {g.key[2:]: g for g in tables[0].groups}
    kd = groups[("t2", "resnet8x4")].cells[0]
    assert kd.delta.diff.mean == pytest.approx(1.5) and kd.delta.diff.ci95 == pytest.approx(0.0)
    assert "deltas are against the baseline of teacher t32x4" in groups[("t2", "resnet8x4")].notes[0]
    lonely = groups[("t32x4", "resnet20")]
    assert lonely.baseline is None and lonely.cells[0].delta is None
    assert "no baseline" in lonely.notes[0]


def test_published_lookup() -> None:
    assert published_result("CIFAR-100", "resnet32x4", "resnet8x4", "dkd").top1 == 76.32
    assert published_result("cifar100", "wrn_40_2", "resnet8x4", "baseline").top1 == 72.50  # any teacher
    assert published_result("cifar100", "wrn_40_2", "resnet8x4", "kd") is None
    assert published_result("fashion-mnist", "cnn_l", "cnn_s", "kd") is None
    assert published_teacher("cifar_100", "resnet32x4").top1 == 79.42


def test_provenance_scopes(tmp_path: Path) -> None:
    dirty = {"git_commit": _PROVENANCE["git_commit"] + "+dirty"}
    paths = [
        make_record(tmp_path, method="kd", seed=0, provenance={"model_sha256": "11" * 32}),
        make_record(tmp_path, method="kd", seed=1, provenance={"model_sha256": "22" * 32}),
        make_record(tmp_path, method="kd", seed=2, provenance={"model_sha256": "33" * 32, **dirty}),
        # Another teacher has another digest: a different scope, not a difference.
        make_record(tmp_path, method="kd", teacher="t2", seed=0, provenance={"teacher_sha256": "99" * 32}),
    ]
    rows = load_runs(paths)
    fields, flagged = summarize_provenance(rows, runs_columns(rows))
    seed0 = next(r for r in rows if r["teacher"] == "t32x4" and r["seed"] == 0)
    assert seed0["prov.model_sha256"] == "11" * 32  # kept in the runs table ...
    assert all(f.column != "prov.model_sha256" for f in fields)  # ... but never compared
    assert list(flagged.values()) == [["prov.git_commit"]]
    teacher = {f.scope: f for f in fields if f.column == "prov.teacher_sha256"}
    assert set(teacher) == {("cifar100", "proto1", "t32x4"), ("cifar100", "proto1", "t2")}
    assert not any(f.differs for f in teacher.values())
    view = report_view("x", build_tables(rows), {}, fields, flagged, n_runs=len(rows))
    assert any("+dirty" in w for w in view.warnings)


def test_provenance_footer_shows_dirty_files_and_cpu(tmp_path: Path) -> None:
    new = {
        "git_commit": _PROVENANCE["git_commit"] + "+dirty",
        "dirty_files": ["workflow/rules/report.smk", "kdbench/methods/new_method.py"],
        "cpu": "AMD EPYC 7B13",
        "cpu_capability": "AVX2",
    }
    paths = [make_record(tmp_path, seed=s, provenance=new) for s in range(2)]
    paths.append(make_record(tmp_path, seed=2))  # an older record: no dirty_files, cpu or cpu_capability
    clean = {**new, "git_commit": _PROVENANCE["git_commit"], "dirty_files": []}
    paths.append(make_record(tmp_path, seed=3, provenance=clean))
    rows = load_runs(paths)
    assert rows[0]["prov.dirty_files"] == "kdbench/methods/new_method.py; workflow/rules/report.smk"
    assert rows[2]["prov.cpu"] is None and rows[3]["prov.dirty_files"] is None
    fields, flagged = summarize_provenance(rows, runs_columns(rows))
    view = report_view("x", build_tables(rows), {}, fields, flagged, n_runs=len(rows))
    footer = {row[0]: row for row in view.provenance}
    assert footer["dirty_files"][2:] == ["kdbench/methods/new_method.py; workflow/rules/report.smk", "2"]
    assert footer["cpu"][1:] == ["all runs", "AMD EPYC 7B13", "3"]
    assert footer["cpu_capability"][1:] == ["all runs", "AVX2", "3"]
    (dirty,) = [w for w in view.warnings if "+dirty" in w]
    assert dirty.startswith("2 run(s)")
    assert "Uncommitted files: kdbench/methods/new_method.py, workflow/rules/report.smk." in dirty
    old = load_runs([make_record(tmp_path / "old", seed=0, provenance={"git_commit": new["git_commit"]})])
    fields, flagged = summarize_provenance(old, runs_columns(old))
    view = report_view("x", build_tables(old), {}, fields, flagged, n_runs=1)
    assert any("The modified files were not recorded." in w for w in view.warnings)
    assert not any(row[0] in ("dirty_files", "cpu") for row in view.provenance)


def test_published_legend_and_footnotes_only_with_published_numbers(tmp_path: Path) -> None:
    models = {"dataset": "fashion-mnist", "teacher_model": "cnn_m", "student": "cnn_xs"}
    paths = [make_record(tmp_path, method=m, seed=s, **models) for m in ("baseline", "kd") for s in range(2)]
    rows = load_runs(paths)
    view = report_view("x", build_tables(rows), {}, [], {}, n_runs=len(rows))
    assert not any("Published" in item for item in view.legend)
    ((table, _),) = view.tables[0].groups
    assert "Published" not in table.headers and not table.footnotes and "published" not in table.caption
    assert not any("mAP" in h for h in table.headers) and not any("mAP" in item for item in view.legend)


def test_bad_epochs_line_names_file_and_line(tmp_path: Path) -> None:
    path = make_record(tmp_path, seed=0).parent / "epochs.jsonl"
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(RecordError, match=re.escape(f"{path}, line 5")):
        read_epochs(path)


# ---------------------------------------------------------------------------------------------- whole report


def test_runs_csv_is_one_row_per_record(report: tuple[dict, Path], grid: list[Path]) -> None:
    summary, out = report
    rows = _csv(out / "runs.csv")
    assert len(rows) == len(grid) == summary["runs"]
    assert summary["skipped"] == 4
    kd0 = _row(rows, method="kd", student="resnet8x4", seed="0", protocol_hash="proto1")
    assert kd0["param.T"] == "4.0" and kd0["param.alpha"] == "0.9"
    assert kd0["test_top1"] == "72.0" and kd0["prov.device"] == "cpu" and kd0["pkg.torch"] == "2.14.1"
    assert kd0["store.logits"] == "ef" * 32
    assert Path(kd0["epochs_file"]).is_file()
    assert _row(rows, method="dkd", seed="0")["param.beta"] == "8.0"
    crd = _row(rows, method="crd", seed="0")
    assert crd["status"] == "skipped" and "sample_index" in crd["skip_reason"] and crd["test_top1"] == ""


def test_leaderboard_csv_numbers(report: tuple[dict, Path]) -> None:
    summary, out = report
    rows = _csv(out / "leaderboard.csv")
    # proto1/resnet8x4: baseline kd dkd scalekd crd fitnet; proto1/resnet20: baseline kd; proto2: baseline kd.
    assert len(rows) == summary["cells"] == 10
    kd = _row(rows, method="kd", student="resnet8x4", protocol_hash="proto1")
    assert float(kd["top1_mean"]) == pytest.approx(73.2)
    assert float(kd["top1_std"]) == pytest.approx(1.252996, abs=1e-5)
    assert float(kd["top1_ci95"]) == pytest.approx(3.112869, abs=1e-5)
    assert float(kd["delta_vs_baseline"]) == pytest.approx(2.2)
    assert float(kd["delta_ci95_low"]) == pytest.approx(2.2 - 3.012105, abs=1e-5)
    assert float(kd["delta_ci95_high"]) == pytest.approx(2.2 + 3.012105, abs=1e-5)
    assert kd["delta_n"] == "3" and kd["seeds"] == "3" and kd["seed_list"] == "0 1 2"
    assert float(kd["best_val_test_top1_mean"]) == pytest.approx(73.1)
    assert float(kd["teacher_test_top1"]) == pytest.approx(79.1)
    assert float(kd["teacher_agreement"]) == pytest.approx(81.0)
    assert float(kd["published_top1"]) == pytest.approx(73.33) and "RepDistiller" in kd["published_source"]
    assert kd["views_note"] == "2 views / 4 epochs, views repeat"
    base = _row(rows, method="baseline", student="resnet8x4", protocol_hash="proto1")
    assert base["delta_vs_baseline"] == "" and base["delta_note"] == "baseline"
    assert float(base["published_top1"]) == pytest.approx(72.50)
    assert _row(rows, method="scalekd")["live_teacher"] == "true"
    assert _row(rows, method="scalekd")["teacher_source"] == "live (required)"
    assert kd["teacher_source"] == "cache" and base["teacher_source"] == "none"
    assert float(_row(rows, method="scalekd")["teacher_forward"]) == 5000
    r20 = _row(rows, method="kd", student="resnet20")
    assert r20["published_top1"] == ""
    # Retrieval columns are empty where the protocol does not measure retrieval.
    assert kd["map_cosine_mean"] == kd["map_cosine_delta_vs_baseline"] == kd["retrieval_tap"] == ""
    assert kd["map_cosine_delta_note"] == base["map_euclidean_delta_note"] == ""


def test_pairs_csv_compares_every_two_cells_of_a_group_paired_by_seed(report: tuple[dict, Path]) -> None:
    """pairs.csv against the hand values above: each unordered pair once (the first-listed cell as a), per metric."""
    summary, out = report
    assert summary["files"]["pairs.csv"] == str(out / "pairs.csv")
    rows = _csv(out / "pairs.csv")

    def pair(a: str, b: str, metric: str = "top1", student: str = "resnet8x4", proto: str = "proto1") -> dict:
        found = [r for r in rows if {r["a"], r["b"]} == {a, b} and r["metric"] == metric
                 and r["student"] == student and r["protocol_hash"] == proto]
        assert len(found) == 1, found
        return found[0]

    kd = pair("kd", "baseline")  # d = 2.0, 3.5, 1.1: mean 2.2, ci 3.012105 -> the interval contains 0
    assert (kd["a"], kd["n"], kd["verdict"]) == ("kd", "3", "not separable")
    assert float(kd["delta"]) == pytest.approx(2.2) and float(kd["ci95_low"]) == pytest.approx(2.2 - 3.012105, abs=1e-5)
    dkd = pair("dkd", "kd")  # d = 4.0, 1.7, 3.3: mean 3.0, sd 1.178983, ci 4.303 * 1.178983 / sqrt(3) = 2.928992
    assert dkd["a"] == "dkd" and float(dkd["delta"]) == pytest.approx(3.0)
    assert float(dkd["ci95_high"]) == pytest.approx(3.0 + 2.928992, abs=1e-5) and dkd["verdict"] == "a > b"
    assert pair("fitnet", "baseline")["verdict"] == "fewer than 2 paired seeds"
    assert not [r for r in rows if "crd" in (r["a"], r["b"])]  # no finished seed
    r20 = pair("kd", "baseline", student="resnet20")  # d = 1.5 on every seed: a zero-width interval above 0
    assert r20["verdict"] == "a > b" and float(r20["ci95_low"]) == pytest.approx(1.5)
    cos = pair("kd", "baseline", "map_cosine", student="resnet20")
    assert cos["verdict"] == "a > b" and float(cos["ci95_low"]) == pytest.approx(5 - 2.484339, abs=1e-5)
    assert not [r for r in rows if r["metric"] == "map_cosine" and r["student"] == "resnet8x4"]  # not measured
    assert {r["protocol_hash"] for r in rows if r["student"] == "resnet8x4"} == {"proto1", "proto2"}
    n_cells = 4  # baseline, kd, dkd, scalekd with 3 seeds, and fitnet with 1: 5 finished cells -> 10 pairs
    assert sum(r["metric"] == "top1" and r["student"] == "resnet8x4" and r["protocol_hash"] == "proto1"
               for r in rows) == (n_cells + 1) * n_cells // 2


def test_leaderboard_csv_retrieval_map_with_paired_delta(report: tuple[dict, Path]) -> None:
    _, out = report
    rows = _csv(out / "leaderboard.csv")
    kd = _row(rows, method="kd", student="resnet20")
    assert kd["retrieval_tap"] == "pre_logits"
    assert float(kd["map_cosine_mean"]) == pytest.approx(46.0) and float(kd["map_cosine_std"]) == pytest.approx(1.0)
    assert float(kd["map_cosine_ci95"]) == pytest.approx(2.484339, abs=1e-5)
    assert float(kd["map_cosine_delta_vs_baseline"]) == pytest.approx(5.0)
    assert float(kd["map_cosine_delta_ci95_low"]) == pytest.approx(5.0 - 2.484339, abs=1e-5)
    assert float(kd["map_cosine_delta_ci95_high"]) == pytest.approx(5.0 + 2.484339, abs=1e-5)
    assert kd["map_cosine_delta_n"] == "3" and kd["map_cosine_delta_note"] == ""
    assert float(kd["map_euclidean_mean"]) == pytest.approx(39.0)
    assert float(kd["map_euclidean_std"]) == pytest.approx(1.322876, abs=1e-5)
    assert float(kd["map_euclidean_delta_vs_baseline"]) == pytest.approx(3.0)
    assert float(kd["map_euclidean_delta_ci95_low"]) == pytest.approx(3.0 - 1.242170, abs=1e-5)
    assert float(kd["map_euclidean_delta_ci95_high"]) == pytest.approx(3.0 + 1.242170, abs=1e-5)
    assert float(kd["p100_cosine"]) == pytest.approx(34.0) and float(kd["p100_euclidean"]) == pytest.approx(33.0)
    base = _row(rows, method="baseline", student="resnet20")
    assert float(base["map_cosine_mean"]) == pytest.approx(41.0) and base["map_cosine_delta_vs_baseline"] == ""
    assert base["map_cosine_delta_note"] == base["map_euclidean_delta_note"] == "baseline"
    # Top-1 stays the headline: its columns, delta and rank are the ones compare reads.
    assert float(kd["delta_vs_baseline"]) == pytest.approx(1.5) and kd["rank"] == "1"


def test_leaderboard_ranks_and_skips(report: tuple[dict, Path]) -> None:
    _, out = report
    rows = [
        r
        for r in _csv(out / "leaderboard.csv")
        if r["student"] == "resnet8x4" and r["protocol_hash"] == "proto1"
    ]
    rank = {r["method"]: r["rank"] for r in rows}
    # By mean: dkd 76.2, scalekd 75, kd 73.2, baseline 71 (seeds 0, 1, 2 each).
    # scalekd - dkd = -2, -1.2, -0.4: mean -1.2, sd 0.8, ci 4.303 * 0.8 / sqrt(3) = 1.988 -> not below -> 1.
    # kd - dkd = -4, -1.7, -3.3: mean -3, SS 1 + 1.69 + 0.09 = 2.78, sd 1.178983, ci 2.928984
    #   -> [-5.93, -0.07] is below 0 -> kd opens tier 2 -> rank 3.
    # baseline - kd = -2.2 [-5.21, +0.81] -> joins kd's tier -> rank 3 (only the current tier is checked).
    # fitnet (1 seed) and crd (skipped) are unranked.
    assert rank == {"dkd": "1", "scalekd": "1", "kd": "3", "baseline": "3", "fitnet": "", "crd": ""}
    assert "ranked below dkd: paired Δ -3.00 [-5.93, -0.07] (n=3)" in _row(rows, method="kd")["notes"]
    crd = _row(rows, method="crd")
    assert crd["status"] == "skipped" and crd["seeds"] == "0" and crd["n_skipped"] == "3"
    assert crd["skip_reason"] == "needs sample_index, not provided by this store"
    fitnet = _row(rows, method="fitnet")
    assert fitnet["status"] == "partial" and fitnet["delta_vs_baseline"] == ""
    assert "fewer than 2 seeds" in fitnet["delta_note"]
    assert "out of memory" in fitnet["notes"] and "not ranked" in fitnet["notes"]


def test_markdown(report: tuple[dict, Path]) -> None:
    _, out = report
    md = (out / "leaderboard.md").read_text()
    assert "# Synthetic KD leaderboard" in md
    # A cell's notes are a footnote marked beside its method (not a column).
    assert "| 3 | kd [3] | 3 | 73.20 ± 1.25 | ±3.11 | +2.20 [-0.81, +5.21] (n=3) |" in md
    assert "- [3] kd: ranked below dkd: paired Δ -3.00 [-5.93, -0.07] (n=3)" in md and "| Notes |" not in md
    assert "| 3 | baseline | 3 | 71.00 ± 1.00 | ±2.48 | (baseline) |" in md
    assert "skipped: needs sample_index, not provided by this store" in md
    assert "| Teacher fwd (images) |" in md and "**Teacher fwd (images)**: training images" in md
    assert "interval entirely below 0" in md and "overlaps" not in md
    # Retrieval mAP (only the resnet20 group measured it): mean ± std and the paired Δ, as top-1.
    header = "| mAP (cosine) | Δ mAP (cosine) [95% CI] | mAP (Euclidean) | Δ mAP (Euclidean) [95% CI] |"
    assert md.count(header) == 1
    assert "| 46.00 ± 1.00 | +5.00 [+2.52, +7.48] (n=3) | 39.00 ± 1.32 | +3.00 [+1.76, +4.24] (n=3) |" in md
    assert "| 41.00 ± 1.00 | (baseline) | 36.00 ± 1.00 | (baseline) |" in md
    assert "Retrieval embedding: pre_logits." in md and "- **mAP (cosine)**, **mAP (Euclidean)**:" in md
    # Published numbers: a legend item and a footnote for each marker, the teacher's included.
    assert "Teacher t32x4 (resnet32x4): test top-1 79.10%, published 79.42 [1]" in md
    assert "- [1] Published teacher resnet32x4: 79.42 — RepDistiller" in md
    assert "| 73.33 [4] |" in md and "- [4] Published kd: 73.33 — RepDistiller" in md
    assert "- **Published** numbers" in md and "footnote [n]" in md
    assert md.count("### t32x4 (resnet32x4) → resnet8x4") == 2  # once per protocol
    assert "2 different protocols (proto1, proto2)" in md
    assert "DIFFERS: 2.14.1 (22 runs); 2.15.0 (1 run)" in md
    assert "package torch" in md and "live" in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file()


def test_html_is_self_contained(report: tuple[dict, Path]) -> None:
    _, out = report
    page = (out / "index.html").read_text()
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # Its only links are to its own files beside it (relative: the plots, runs.csv, ...).
    hrefs = re.findall(r"""\bhref\s*=\s*["']([^"']*)""", page)
    assert hrefs and all(h == "data:," or (out / h).is_file() for h in hrefs), hrefs
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert re.findall(r"<link[^>]*>", page) == ['<link rel="icon" href="data:,">']  # (no favicon request)
    assert "<style>" in page and "<footer>" in page
    footer = page[page.index("<footer>") :]
    assert "0123456789abcdef" in footer and "2.14.1" in footer and "proto1" in footer
    assert (
        page.count("<h3>") == 3 + 2
    )  # 3 groups + one plot section per table and "skipped: needs sample_index" in page


def test_plots_written(report: tuple[dict, Path]) -> None:
    summary, out = report
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    # Per table: accuracy vs params and gain; per group: curves (3 groups).
    assert len(pngs) == 2 * 2 + 3
    assert "cifar100_proto1_accuracy_vs_params.png" in names
    assert "cifar100_proto1_gain_vs_baseline.png" in names
    assert "cifar100_proto1_t32x4_resnet8x4_curves.png" in names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert {k for k in summary["files"] if k.startswith("plots/")} == {f"plots/{n}" for n in names}


def test_provenance_flags_the_deviating_run(report: tuple[dict, Path]) -> None:
    summary, out = report
    assert summary["provenance_flagged"] == 1
    flagged = [r for r in _csv(out / "runs.csv") if r["provenance_differs"]]
    assert len(flagged) == 1 and flagged[0]["provenance_differs"] == "pkg.torch"
    assert flagged[0]["student"] == "resnet20" and flagged[0]["seed"] == "2"
    assert summary["protocols"] == {"cifar100": ["proto1", "proto2"]}
