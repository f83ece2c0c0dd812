"""The leaderboard of a tuned table (:mod:`kdbench.tuning`): tuned and untuned variants of every cell, the tuning
columns, the "Tuning" paragraph (beat the student alone, Kendall's tau) and the expected-validation plot.

Synthetic records from :func:`test_report.make_record`; a final tuned run is the same record plus a ``tuning``
mapping (:func:`kdbench.tuning.tuning_summary`), its params the selected ones. Expected numbers are computed by
hand in the comments.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
from test_report import make_record

from kdbench.report.aggregate import LEADERBOARD_COLUMNS, UNTUNED_SUFFIX, build_tables, tuning_effect
from kdbench.report.display import short_values, tuning_paragraph
from kdbench.report.leaderboard import write_leaderboard
from kdbench.report.records import load_runs
from kdbench.report.stats import expected_max, expected_max_curve, kendall_tau

SEEDS = (0, 1, 2)
# Test top-1 per seed. Untuned (the configured values):
#   baseline 70.0 71.0 72.0 (mean 71)
#   kd       72.0 73.2 73.8 (mean 73)       d = 2.0 2.2 1.8: mean 2.0, sd 0.2, ci 4.303 * 0.2 / sqrt(3) = 0.496868
#                                          -> [+1.50, +2.50]: beats the student alone
#   dkd      70.5 72.5 71.6 (mean 71.5333)  d = 0.5 1.5 -0.4: mean 0.5333, sd 0.950438, ci 2.361211
#                                          -> [-1.83, +2.89]: does not beat it
#   at       69.0 70.0 71.0 (mean 70)       d = -1 -1 -1: does not beat it
# Tuned (the selected values):
#   baseline 71.0 72.0 73.0 (mean 72)       tuning delta +1
#   kd       73.0 74.2 74.8 (mean 74)       d = 2.0 2.2 1.8 over the TUNED baseline: +2.00 [+1.50, +2.50]; delta +1
#   dkd      74.0 75.3 75.7 (mean 75)       d = 3.0 3.3 2.7: mean 3.0, sd 0.3, ci 0.745302 -> [+2.25, +3.75];
#                                          tuning delta 75 - 71.5333 = +3.4667 (moved most)
#   at       69.5 70.5 71.5 (mean 70.5)     d = -1.5 each; tuning delta +0.5
# Orders by mean: untuned kd > dkd > baseline > at, tuned dkd > kd > baseline > at: one swap of n = 4,
# Kendall's tau = 1 - 4 / (4 * 3) = 2/3; exact two-sided p: of the 24 orders of 4, 1 + 3 have at most 1
# discordant pair and 3 + 1 at least 5 -> p = 8 / 24 = 1/3.
UNTUNED = {
    "baseline": [70.0, 71.0, 72.0],
    "kd": [72.0, 73.2, 73.8],
    "dkd": [70.5, 72.5, 71.6],
    "at": [69.0, 70.0, 71.0],
}
TUNED = {
    "baseline": [71.0, 72.0, 73.0],
    "kd": [73.0, 74.2, 74.8],
    "dkd": [74.0, 75.3, 75.7],
    "at": [69.5, 70.5, 71.5],
}
PARAMS = {
    "baseline": {}, "kd": {"tau": 4.0, "kd_weight": 0.9}, "dkd": {"alpha": 1.0, "beta": 8.0}, "at": {"beta": 1000.0}
}
K = 5
# Trial means (val top-1, trial 0 = the configured values) and the selection of each cell.
TRIALS = {
    "baseline": [65.0, 64.0, 63.0, 65.0, 62.0],  # a tie of trials 0 and 3: the configured values win
    "kd": [60.0, 62.0, 58.0, 61.0, 59.0],
    "dkd": [50.0, 55.0, 57.0, 52.0, 56.0],
    "at": [40.0, 41.0, 39.0, 43.0, 42.0],
}
TUNING_TIME = {"baseline": 400.0, "kd": 500.0, "dkd": 650.0, "at": 450.0}


def _default(label: str) -> dict[str, Any]:
    return {"lr": 0.05, "weight_decay": 0.0005, **{f"method.{k}": v for k, v in PARAMS[label].items()}}


def _selected(label: str) -> tuple[int, dict[str, Any]]:
    trial = max(range(K), key=lambda k: (TRIALS[label][k], -k))
    if trial == 0:
        return 0, _default(label)
    values = {"lr": 0.0712, "weight_decay": 3.1e-4}
    values |= {f"method.{k}": round(v * 0.55, 4) for k, v in PARAMS[label].items()}
    return trial, values


def tuning_summary(label: str) -> dict[str, Any]:
    """A tuned record's ``tuning`` as :func:`kdbench.tuning.apply_selection` writes it."""
    trial, values = _selected(label)
    return {
        "metric": "val_top1", "rule": "best_mean", "sampler": "random", "trials": K,
        "budget": {"epochs": 3, "seeds": [0]}, "default": _default(label), "default_score": TRIALS[label][0],
        "selected_trial": trial, "values": values, "selected_score": TRIALS[label][trial],
        "tuning_time_s": TUNING_TIME[label], "trial_means": TRIALS[label], "protocol_hash": "proto1",
    }


def make_tuned_record(root: Path, label: str, seed: int, top1: float, **kw: Any) -> Path:
    """A final tuned run: :func:`make_record` with the selected method params and the ``tuning`` mapping."""
    _, values = _selected(label)
    params = {k.removeprefix("method."): v for k, v in values.items() if k.startswith("method.")}
    path = make_record(root, method=label, seed=seed, top1=top1, params=params, **kw)
    rec = json.loads(path.read_text())
    rec["tuning"] = tuning_summary(label)
    rec["protocol"].update(lr=values["lr"], weight_decay=values["weight_decay"])
    if rec["status"] == "ok":
        rec["provenance"]["config_hash"] = f"tuned-{label}"  # the tuned config holds the selected values
    path.write_text(json.dumps(rec, indent=1))
    return path


def tuned_grid(root: Path, tuned: dict[str, list[float]] = TUNED) -> list[Path]:
    """Untuned records under ``root/runs``, tuned ones under ``root/tuned`` (as the workflow lays them out)."""
    paths = []
    for label, values in UNTUNED.items():
        paths += [make_record(root / "runs", method=label, seed=s, top1=v, params=PARAMS[label])
                  for s, v in zip(SEEDS, values)]
    for label, values in tuned.items():
        paths += [make_tuned_record(root / "tuned", label, s, v) for s, v in zip(SEEDS, values)]
    return paths


@pytest.fixture(scope="module")
def tuned_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("tuned")
    out = root / "leaderboard"
    return write_leaderboard(tuned_grid(root), out, "Tuned KD leaderboard"), out


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------- estimator


def _brute_force(scores: list[float], k: int) -> float:
    subsets = list(itertools.combinations(scores, k))
    return sum(max(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("seed", range(6))
def test_expected_max_matches_the_brute_force_over_all_subsets(seed: int) -> None:
    rng = random.Random(seed)
    scores = [round(rng.uniform(40, 80), 2) for _ in range(rng.randint(1, 8))]
    if seed == 5:
        scores = [61.0, 60.0, 61.0, 59.0, 61.0, 60.0]  # ties
    for k in range(1, len(scores) + 1):
        assert expected_max(scores, k) == pytest.approx(_brute_force(scores, k), abs=1e-9)


def test_expected_max_known_values() -> None:
    scores = [3.0, 1.0, 4.0, 1.0, 5.0]
    assert expected_max(scores, 1) == pytest.approx(sum(scores) / 5)  # k = 1: the mean
    assert expected_max(scores, 5) == 5.0  # k = K: the maximum
    # K = 3, sorted 1, 2, 4, k = 2: subsets {1,2} {1,4} {2,4} -> (2 + 4 + 4) / 3; the formula:
    # i = 2: 2 * C(1, 1) / C(3, 2) + i = 3: 4 * C(2, 1) / C(3, 2) = (2 + 8) / 3.
    assert expected_max([4.0, 1.0, 2.0], 2) == pytest.approx(10 / 3)
    curve = expected_max_curve(TRIALS["dkd"])
    assert len(curve) == K and curve[0] == pytest.approx(54.0) and curve[-1] == 57.0
    assert all(a <= b for a, b in itertools.pairwise(curve))  # more trials never lower the expected best
    with pytest.raises(ValueError):
        expected_max(scores, 0)
    with pytest.raises(ValueError):
        expected_max(scores, 6)


def test_kendall_tau_of_a_planted_swap() -> None:
    first = {m: float(10 - i) for i, m in enumerate("abcdef")}
    assert kendall_tau(first, first).tau == pytest.approx(1.0)
    for n in (3, 4, 6):
        items = dict(list(first.items())[:n])
        swapped = dict(items)
        swapped["a"], swapped["b"] = items["b"], items["a"]  # one adjacent swap
        k = kendall_tau(items, swapped)
        assert k.n == n and k.tau == pytest.approx(1 - 4 / (n * (n - 1)))
    reversed_ = {m: -v for m, v in first.items()}
    assert kendall_tau(first, reversed_).tau == pytest.approx(-1.0)
    assert kendall_tau({"a": 1.0}, {"a": 2.0}).tau is None  # n < 2
    assert kendall_tau({"a": 1.0, "b": 2.0, "z": 5.0}, {"a": 1.0, "b": 3.0}).n == 2  # shared items only


# ---------------------------------------------------------------------------------------------- cells


def test_both_variants_each_over_its_own_baseline(tuned_report: tuple[dict, Path]) -> None:
    summary, out = tuned_report
    rows = _csv(out / "leaderboard.csv")
    assert summary["cells"] == 8 and summary["runs"] == 24
    assert set(rows) == {*UNTUNED, *(m + UNTUNED_SUFFIX for m in UNTUNED)}
    # Tuned rows: over the tuned baseline (kd 74 - 72, dkd 75 - 72).
    kd, dkd = rows["kd"], rows["dkd"]
    assert float(kd["top1_mean"]) == pytest.approx(74.0)
    assert float(kd["delta_vs_baseline"]) == pytest.approx(2.0)
    assert float(kd["delta_ci95_low"]) == pytest.approx(2.0 - 0.496868, abs=1e-5)
    assert float(dkd["delta_vs_baseline"]) == pytest.approx(3.0)
    assert float(dkd["delta_ci95_high"]) == pytest.approx(3.0 + 0.745302, abs=1e-5)
    assert rows["baseline"]["delta_note"] == "baseline"
    # Untuned rows: over the untuned baseline (kd 73 - 71 = 2; against the tuned one it would be 1).
    kd_u, dkd_u = rows["kd (untuned)"], rows["dkd (untuned)"]
    assert float(kd_u["top1_mean"]) == pytest.approx(73.0)
    assert float(kd_u["delta_vs_baseline"]) == pytest.approx(2.0)
    assert float(dkd_u["delta_vs_baseline"]) == pytest.approx(0.533333, abs=1e-5)
    assert float(dkd_u["delta_ci95_low"]) == pytest.approx(0.533333 - 2.361211, abs=1e-5)
    assert rows["baseline (untuned)"]["delta_note"] == "baseline"
    assert float(rows["at (untuned)"]["delta_vs_baseline"]) == pytest.approx(-1.0)
    # Ranks among the rows of each variant. Tuned: dkd 75 (tier 1); kd - dkd = -1.0 -1.1 -0.9 is below 0
    # -> kd opens tier 2; baseline - kd = -2 each -> tier 3; at - baseline = -1.5 each -> tier 4.
    assert {m: rows[m]["rank"] for m in UNTUNED} == {"dkd": "1", "kd": "2", "baseline": "3", "at": "4"}
    # Untuned: kd 73; dkd - kd = -1.5 -0.7 -2.2: mean -1.4667, sd 0.7506, ci 1.8647 -> [-3.33, +0.40]: tier 1;
    # baseline - kd = -2.0 -2.2 -1.8 is below 0 -> tier 2 (rank 3); at - baseline = -1 each -> rank 4.
    untuned_ranks = {m: rows[m + UNTUNED_SUFFIX]["rank"] for m in UNTUNED}
    assert untuned_ranks == {"kd": "1", "dkd": "1", "baseline": "3", "at": "4"}
    # leaderboard.csv keeps the config's label in runs.csv; only the cell label carries the suffix.
    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert {r["method"] for r in runs} == set(UNTUNED) and sum(r["tuned"] == "true" for r in runs) == 12


def test_tuning_columns(tuned_report: tuple[dict, Path]) -> None:
    _, out = tuned_report
    with open(out / "leaderboard.csv", newline="") as f:
        header = next(csv.reader(f))
    new = ["tuned", "trials", "selected_trial", "selected_values", "tuning_time_s", "untuned_top1_mean",
           "tuning_delta", "val_default", "val_selected"]
    assert header == list(LEADERBOARD_COLUMNS) and header[-len(new):] == new
    rows = _csv(out / "leaderboard.csv")
    dkd = rows["dkd"]
    assert dkd["tuned"] == "true" and dkd["trials"] == "5" and dkd["selected_trial"] == "2"
    assert json.loads(dkd["selected_values"]) == {"lr": 0.0712, "weight_decay": 3.1e-4, "method.alpha": 0.55,
                                                  "method.beta": 4.4}
    assert " " not in dkd["selected_values"]  # compact JSON
    assert float(dkd["tuning_time_s"]) == 650.0
    assert float(dkd["untuned_top1_mean"]) == pytest.approx(71.533333, abs=1e-5)
    assert float(dkd["tuning_delta"]) == pytest.approx(3.466667, abs=1e-5)
    assert (float(dkd["val_default"]), float(dkd["val_selected"])) == (50.0, 57.0)
    base = rows["baseline"]
    assert base["selected_trial"] == "0" and json.loads(base["selected_values"]) == _default("baseline")
    assert float(base["tuning_delta"]) == pytest.approx(1.0)
    # Untuned rows: tuned false, the tuning columns empty.
    kd_u = rows["kd (untuned)"]
    assert kd_u["tuned"] == "false"
    assert all(kd_u[c] == "" for c in new[1:])
    # The tuned runs' own config hash (their selected values) is no provenance difference.
    assert "provenance differs" not in " ".join(r["notes"] for r in rows.values())


def test_beat_the_student_alone_moved_most_and_kendall(tmp_path: Path) -> None:
    tables = build_tables(load_runs(tuned_grid(tmp_path)))
    (group,) = tables[0].groups
    effect = tuning_effect(group)
    assert (effect.beat_untuned, effect.methods_untuned) == (["kd"], 3)
    assert (effect.beat_tuned, effect.methods_tuned) == (["dkd", "kd"], 3)
    assert effect.moved[0] == "dkd" and effect.moved[1] == pytest.approx(75.0 - 71.533333, abs=1e-5)
    assert effect.kendall.n == 4 and effect.kendall.tau == pytest.approx(1 - 4 / (4 * 3))
    assert effect.kendall.p == pytest.approx(1 / 3)
    text = " ".join(tuning_paragraph(tables[0]))
    assert "1 of 3 methods beat the student alone before tuning (kd), 2 of 3 after (dkd, kd)." in text
    assert "Moved most: dkd, +3.47 points (untuned 71.53 → tuned 75.00)." in text
    assert "Kendall's tau between the untuned and the tuned order: 0.67 (p = 0.33, n = 4)." in text
    assert "K = 5 trials (random sampler, trial 0 = the configured values), each 3 epochs x seed 0" in text
    assert "is > 0 and its paired 95% t-interval excludes 0" in text


def test_kendall_of_the_untuned_and_tuned_order_sees_every_swap(tmp_path: Path) -> None:
    # Tuned means reversed against the untuned order (at > baseline > dkd > kd): tau = -1, nobody beats it.
    reversed_tuned = {"kd": [60.0, 60.5, 61.0], "dkd": [62.0, 62.5, 63.0], "baseline": [64.0, 64.5, 65.0],
                      "at": [66.0, 66.5, 67.0]}
    (table,) = build_tables(load_runs(tuned_grid(tmp_path, reversed_tuned)))
    effect = tuning_effect(table.groups[0])
    assert effect.kendall.tau == pytest.approx(-1.0) and effect.kendall.n == 4
    assert effect.beat_tuned == ["at"] and effect.beat_untuned == ["kd"]


def test_short_values() -> None:
    values = {"method.tau": 2.3, "weight_decay": 3.1e-4, "lr": 0.0712}  # the protocol's knobs come first
    assert short_values(values) == "lr 0.0712, wd 3.1e-4, tau 2.3"
    values = {"method.beta": 1000.0, "method.k": 4, "method.mode": "mse", "method.w": 2.5e5}
    assert short_values(values) == "beta 1000, k 4, mode mse, w 2.5e5"


# ---------------------------------------------------------------------------------------------- pages


def test_markdown_and_html_of_a_tuned_table(tuned_report: tuple[dict, Path]) -> None:
    _, out = tuned_report
    md = (out / "leaderboard.md").read_text()
    assert "### Tuning" in md and "**Tuned tables**" in md
    assert md.count("### t32x4 (resnet32x4) → resnet8x4") == 2  # the tuned table and the untuned one
    assert "### t32x4 (resnet32x4) → resnet8x4 — untuned (configured values)" in md
    header = next(line for line in md.splitlines() if line.startswith("| Rank | Method | Tuning |"))
    assert "| Untuned top-1 | Tuning Δ |" in header and "| Wall time | Tuning time |" in header
    assert ("| 1 | dkd | tuned, 5 trials: lr 0.0712, wd 3.1e-4, alpha 0.55, beta 4.4 | 3 | 75.00 ± 0.89 |"
            " ±2.21 | +3.00 [+2.25, +3.75] (n=3) | 71.53 ± 1.00 | +3.47 |") in md
    # (a cell's notes are a footnote marked beside its method: " [n]")
    marked = re.sub(r"(\| [a-z]+(?: \(untuned\))?) \[\d+\] \|", r"\1 |", md)
    assert "| 3 | baseline | tuned, 5 trials: configured values | 3 | 72.00 ± 1.00 |" in marked
    assert "| 6.7 min |" in md  # kd's 400 s of trials ... dkd's 650 s
    assert "| 2 | kd (untuned) | 3 |" not in marked and "| 1 | kd (untuned) | 3 | 73.00 ± 0.92 |" in marked
    assert "| 3 | baseline (untuned) | 3 | 71.00 ± 1.00 | ±2.48 | (baseline) |" in marked
    assert "Trial 0 is the configured values and is counted like the others." in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "plots/cifar100_proto1_t32x4_resnet8x4-expected-val.png" in images
    for link in images:
        assert (out / link).is_file()
    page = (out / "index.html").read_text()
    assert "<h3>Tuning</h3>" in page and "counted like the others" in page
    assert page.count('alt="expected best validation score') == 1
    assert "tuned, 5 trials: configured values" in page


def test_expected_val_plot(tuned_report: tuple[dict, Path]) -> None:
    summary, out = tuned_report
    png = out / "plots" / "cifar100_proto1_t32x4_resnet8x4-expected-val.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert summary["files"][f"plots/{png.name}"] == str(png)


def test_a_tuned_and_an_untuned_run_of_a_seed_are_two_runs_but_two_tuned_ones_clash(tmp_path: Path) -> None:
    a = make_record(tmp_path / "runs", method="kd", seed=0)
    b = make_tuned_record(tmp_path / "tuned", "kd", 0, 71.0)
    assert len(load_runs([a, b])) == 2
    c = make_tuned_record(tmp_path / "tuned2", "kd", 0, 71.5)
    with pytest.raises(Exception, match="same run"):
        load_runs([b, c])


def test_a_cell_without_its_tuned_runs_yet(tmp_path: Path) -> None:
    # The workflow is half way: at has no tuned run. Its untuned cell keeps the suffix (stable labels) and
    # the tuned table says so.
    tuned = {k: v for k, v in TUNED.items() if k != "at"}
    (table,) = build_tables(load_runs(tuned_grid(tmp_path, tuned)))
    labels = {c.method for c in table.cells}
    assert "at (untuned)" in labels and "at" not in labels
    from kdbench.report.display import group_displays

    tuned_table, untuned_table = group_displays(table.groups[0])
    assert "no tuned run of at: see the untuned table" in tuned_table.footnotes
    assert len(tuned_table.rows) == 3 and len(untuned_table.rows) == 4


# ---------------------------------------------------------------------------------------------- untuned tables

# leaderboard.csv of an untuned table, as the code before tuned tables wrote it (git HEAD 10e62b7): the
# tuning columns may only be appended, empty.
_GOLDEN_BEFORE_TUNING = """\
dataset,protocol_hash,teacher,teacher_model,teacher_test_top1,student,student_params,method,method_name,params,status,seeds,seed_list,n_skipped,skip_reason,rank,top1_mean,top1_std,top1_ci95,delta_vs_baseline,delta_ci95_low,delta_ci95_high,delta_n,delta_note,best_val_test_top1_mean,best_val_test_top1_std,best_epoch_mean,teacher_agreement,retrieval_tap,map_cosine_mean,map_cosine_std,map_cosine_ci95,map_cosine_delta_vs_baseline,map_cosine_delta_ci95_low,map_cosine_delta_ci95_high,map_cosine_delta_n,map_cosine_delta_note,map_euclidean_mean,map_euclidean_std,map_euclidean_ci95,map_euclidean_delta_vs_baseline,map_euclidean_delta_ci95_low,map_euclidean_delta_ci95_high,map_euclidean_delta_n,map_euclidean_delta_note,p100_cosine,p100_euclidean,wall_time_s,train_time_s,teacher_forward,teacher_tail_forward,teacher_tail_params,teacher_params,student_forward,cache_bytes_read,extra_params,assistant_time_s,assistant_candidates,live_teacher,live_teacher_tail,teacher_source,views_count,views_epochs,views_note,published_top1,published_source,notes
fashion-mnist,p0,cnn_m,cnn_m,79.1,cnn_xs,278324,kd,kd,"{""T"": 4.0, ""alpha"": 0.9}",ok,3,0 1 2,0,,1,73.2,1.252996,3.112867,2.2,-0.8121,5.2121,3,,73.1,1.252996,2.0,81.0,,,,,,,,,,,,,,,,,,,,101.0,90.0,0.0,,,,20000.0,2500000000.0,0,,,false,false,cache,2,4,"2 views / 4 epochs, views repeat",,,
fashion-mnist,p0,cnn_m,cnn_m,79.1,cnn_xs,278324,baseline,baseline,{},ok,3,0 1 2,0,,1,71.0,1.0,2.484338,,,,,baseline,70.9,1.0,2.0,75.0,,,,,,,,,,,,,,,,,,,,101.0,90.0,0.0,,,,20000.0,0.0,0,,,false,false,none,2,4,"2 views / 4 epochs, views repeat",,,
fashion-mnist,p0,cnn_m,cnn_m,79.1,cnn_xs,,crd,crd,"{""T"": 4.0, ""alpha"": 0.9}",skipped,0,,1,needs sample_index,,,,,,,,0,fewer than 2 seeds paired with the baseline (n=0),,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,false,false,,,,,,,skipped seed(s) 0: needs sample_index
"""


def test_an_untuned_tables_leaderboard_csv_is_unchanged(tmp_path: Path) -> None:
    models = {"dataset": "fashion-mnist", "teacher": "cnn_m", "teacher_model": "cnn_m", "student": "cnn_xs",
              "protocol_hash": "p0"}
    paths = []
    for s in SEEDS:
        paths.append(make_record(tmp_path / "runs", method="baseline", seed=s, top1=70.0 + s, **models))
        paths.append(make_record(tmp_path / "runs", method="kd", seed=s, top1=[72.0, 74.5, 73.1][s], **models))
    paths.append(make_record(tmp_path / "runs", method="crd", seed=0, status="skipped",
                             skip_reason="needs sample_index", **models))
    write_leaderboard(paths, tmp_path / "lb", "golden")
    golden = list(csv.reader(_GOLDEN_BEFORE_TUNING.splitlines()))
    new = list(csv.reader((tmp_path / "lb" / "leaderboard.csv").read_text().splitlines()))
    width = len(golden[0])
    assert [row[:width] for row in new] == golden
    assert all(cell == "" for row in new[1:] for cell in row[width:])  # only empty columns appended
    runs = (tmp_path / "lb" / "runs.csv").read_text()
    assert "tuned" not in runs.splitlines()[0]  # no tuning column in an untuned table's runs table
    assert "Tuning" not in (tmp_path / "lb" / "leaderboard.md").read_text()


def test_a_tuned_table_does_not_change_an_untuned_table_beside_it(tmp_path: Path) -> None:
    # Records of two tables in one report: the tuned one (proto1) gets variants, the other (proto2) none.
    paths = tuned_grid(tmp_path)
    paths += [make_record(tmp_path / "other", method=m, protocol_hash="proto2", seed=s, top1=70.0 + s + (m == "kd"))
              for m in ("baseline", "kd") for s in SEEDS]
    tables = {t.protocol_hash: t for t in build_tables(load_runs(paths))}
    assert {c.method for c in tables["proto2"].cells} == {"baseline", "kd"}
    assert all(c.variant is None for c in tables["proto2"].cells)
    assert tuning_paragraph(tables["proto2"]) == [] and tuning_paragraph(tables["proto1"])
    assert math.isclose(tables["proto2"].cells[0].delta.diff.mean, 1.0)
