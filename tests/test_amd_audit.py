"""AMD's audit (kdbench.report.audit): the oracle's verdict over seeds, the pick's stability, and the oracle's
parameters kept out of every key. Pure functions on constructed numbers; the runs themselves are in test_amd."""

from __future__ import annotations

import json

import pytest

from kdbench.methods import METHODS
from kdbench.report.audit import STABLE_SHARE, audit, audit_markdown, oracle_verdict, stable
from kdbench.tasearch import npsd_approx, pick_stability

SCALES = [0.2, 0.4, 0.6, 0.8]
JOINT = [80.0, 85.0, 86.0, 86.5]  # a clear knee at 0.4: slopes 25, 5, 2.5, then 0.4 -> teacher
TEACHER = 87.0
NOISE = [0.3, -0.2, 0.1, -0.25, 0.05]  # per-seed noise shared by every candidate (seed k: same init and order)


def _val(offsets: list[float], jitter: float = 0.2) -> list[list[float]]:
    """Candidate k's val top-1 on 5 seeds: 75 + its offset + the seed's noise + a small candidate-seed jitter."""
    return [[75 + o + n + jitter * ((k + i) % 3 - 1) for i, n in enumerate(NOISE)] for k, o in enumerate(offsets)]


def _summary(m: int = 4) -> dict:
    cands = [{"index": k, "scale": SCALES[k], "name": f"c{k}", "params": 100 * (k + 1), "ratio": SCALES[k],
              "val_top1": JOINT[k], "dir": f"candidates/{k}"} for k in range(m)]
    return {"teacher": "cnn_m", "teacher_params": 1000, "teacher_val_top1": TEACHER, "wall_time_s": 5.0,
            "candidates": cands, "val_images": 5000}


def _selection(val_images: int = 5000) -> dict:
    sel = npsd_approx(SCALES, JOINT, TEACHER)
    return {**sel, "stability": pick_stability(SCALES, JOINT, TEACHER, val_images)}


def _records(val: list[list[float]], seeds: list[int] | None = None) -> list[dict]:
    seeds = seeds or list(range(len(val[0])))
    return [{"identity": {"seed": s}, "final": {"val_top1": v, "test_top1": v - 1}}
            for row in val for s, v in zip(seeds, row)]


def test_equal_candidates_name_no_best():
    """Candidates that differ only by seed noise: the audit must not name a best, in its data or its text."""
    val = _val([0.0, 0.0, 0.0, 0.0])
    verdict = oracle_verdict(val, selected=1, preference=[1.0, 4.0, 3.0, 2.0])
    assert verdict["best"] is None and not verdict["separable"]
    assert verdict["top"] == [0, 1, 2, 3] and verdict["selected_in_top"]
    result = audit(_summary(), _selection(), {"cnn_xs": _records(val)})
    text = audit_markdown(result)
    assert "(best)" not in text and "**not separable**" in text and "names no best" in text
    assert "cannot tell candidates 0, 1, 2, 3 apart" in text


def test_a_candidate_ahead_on_every_seed_is_named_best():
    val = _val([0.0, 2.0, 0.5, -1.0])
    verdict = oracle_verdict(val, selected=1, preference=[1.0, 4.0, 3.0, 2.0])
    assert verdict["separable"] and verdict["best"] == 1 and verdict["top"] == [1]
    assert verdict["regret"] == 0 and verdict["selected_rank"] == 1
    text = audit_markdown(audit(_summary(), _selection(), {"cnn_xs": _records(val)}))
    assert "(best)" in text and "the oracle prefers candidate 1, separable" in text


def test_the_leader_tied_with_one_other_is_not_separable_and_lists_both():
    val = _val([0.0, 2.0, 2.0, -1.0])
    verdict = oracle_verdict(val, selected=3, preference=[1.0, 2.0, 3.0, 4.0])
    assert verdict["best"] is None and verdict["top"] == [1, 2] and not verdict["selected_in_top"]
    means = [sum(v) / len(v) for v in val]
    assert verdict["regret"] == pytest.approx(max(means) - means[3]) and verdict["regret_ci95"] > 0


def test_the_verdict_is_paired_by_seed():
    """A 0.5-point gap under seed noise of ±1 point: separable only because every seed shows it (pairing)."""
    seed_noise = [1.0, -1.0, 0.8, -0.9, 0.1]
    val = [[75 + n for n in seed_noise], [75.5 + n + 0.01 * i for i, n in enumerate(seed_noise)]]
    verdict = oracle_verdict(val, selected=0, preference=[2.0, 1.0])
    assert verdict["best"] == 1  # unpaired t-intervals of the two means would overlap widely


def test_spearman_has_a_bootstrap_interval_over_seeds_around_its_estimate():
    val = _val([0.0, 0.2, 0.4, 0.6], jitter=0.6)  # gaps smaller than the candidate-seed jitter
    verdict = oracle_verdict(val, selected=3, preference=[1.0, 2.0, 3.0, 4.0])
    low, high = verdict["spearman_ci95"]
    assert low <= verdict["spearman"] <= high and low < high and low < 0.5
    noiseless = [[75 + k] * 5 for k in range(4)]  # no seed changes the order: the interval collapses
    assert oracle_verdict(noiseless, 3, [1.0, 2.0, 3.0, 4.0])["spearman_ci95"] == [1.0, 1.0]
    again = oracle_verdict(val, selected=3, preference=[1.0, 2.0, 3.0, 4.0])
    assert again["spearman_ci95"] == [low, high]  # seeded


def test_one_seed_per_candidate_is_reported_as_untested():
    val = [[75.0], [76.0], [74.0]]
    verdict = oracle_verdict(val, selected=0, preference=[3.0, 2.0, 1.0])
    assert verdict["best"] is None and verdict["leader"] == 1 and verdict["spearman_ci95"] is None
    summary = {**_summary(3), "candidates": _summary(3)["candidates"]}
    sel = {**npsd_approx(SCALES[:3], JOINT[:3], TEACHER), "stability": None}
    text = audit_markdown(audit(summary, sel, {"cnn_xs": _records(val)}))
    assert "one seed per candidate: the oracle's order is not tested" in text and "(best)" not in text
    assert "not measured" in text


def test_records_must_pair_the_same_seeds_in_order():
    val = _val([0.0, 1.0, 0.0, 0.0])
    records = _records(val)
    records[5]["identity"]["seed"], records[6]["identity"]["seed"] = 2, 1  # candidate 1's seeds swapped
    with pytest.raises(ValueError, match="same 5 distinct seeds"):
        audit(_summary(), _selection(), {"cnn_xs": records})
    with pytest.raises(ValueError, match="not a multiple of 4"):
        audit(_summary(), _selection(), {"cnn_xs": _records(val)[:-1]})


def test_no_oracle_keeps_the_search_numbers_and_the_stability():
    result = audit(_summary(), _selection(), {})
    text = audit_markdown(result)
    assert result["students"] == {} and "No oracle runs (`oracle_seeds: 0`)" in text
    assert "Stability of the pick" in text and json.loads(json.dumps(result)) == result


# --- stability of the pick ------------------------------------------------------------------------------------


def test_a_clear_knee_measured_on_many_images_is_a_stable_pick():
    st = pick_stability(SCALES, JOINT, TEACHER, val_images=100_000)
    assert npsd_approx(SCALES, JOINT, TEACHER)["selected"] == 1
    assert st["share"] == st["picks"][1] / 1000 >= 0.99 and stable(st["share"])


def test_a_knee_within_the_evaluation_noise_is_not_stable():
    """Slopes 2.5 / 2.0 / 2.5 against an average of ~2.4: which candidate is under the average flips with noise
    of a tenth of a point (50 val images: ±6 points)."""
    joint = [85.0, 85.5, 85.9, 86.4]
    st = pick_stability(SCALES, joint, 86.9, val_images=50)
    assert sum(st["picks"]) == 1000 and st["share"] < STABLE_SHARE and not stable(st["share"])
    assert pick_stability(SCALES, joint, 86.9, val_images=50) == st  # seeded: the same on any machine
    wider = pick_stability(SCALES, joint, 86.9, val_images=50, seed=1)
    assert wider["share"] == pytest.approx(st["share"], abs=0.06)


def test_stability_grows_with_the_val_size():
    shares = [pick_stability(SCALES, JOINT, TEACHER, n)["share"] for n in (100, 1000, 10_000)]
    assert shares[0] < shares[1] <= shares[2]


@pytest.mark.parametrize(("share", "noted"), [(0.55, True), (0.95, False), (None, False)])
def test_the_leaderboard_notes_a_pick_that_is_not_stable(tmp_path, share, noted):
    from test_report import make_record

    from kdbench.report.aggregate import build_tables
    from kdbench.report.display import group_display
    from kdbench.report.records import load_runs

    prov = {} if share is None else {"assistant_pick_share": share}
    paths = [make_record(tmp_path, method="baseline", seed=s, top1=70.0 + s) for s in range(2)]
    paths += [make_record(tmp_path, method="amd", method_name="amd", params={}, seed=s, top1=71.0 + s,
                          provenance=prov) for s in range(2)]
    (group,) = build_tables(load_runs(paths))[0].groups
    shown = group_display(group)
    text = json.dumps([shown.rows, shown.footnotes])
    assert ("pick is not stable: 55% of re-selections" in text) == noted


# --- the oracle's parameters change the audit alone -------------------------------------------------------------


@pytest.mark.parametrize("param", sorted(METHODS.get("amd").audit_params))
def test_oracle_parameters_stay_out_of_every_key_but_other_parameters_do_not(param):
    """Raising the oracle's seeds (or epochs) reruns the oracle and the audit only: the searched assistant's key,
    every distill job's rerun trigger and its record's config hash stay; any other parameter changes them."""
    from pathlib import Path

    from _helpers_store import tiny_raw

    from kdbench.config import parse_config
    from kdbench.distill import config_hash
    from kdbench.plan import Plan, Table

    def keys(params: dict) -> tuple:
        cfg = parse_config(tiny_raw(Path("/nonexistent"), methods={"amd": params}), source="amd.yaml")
        plan = Plan([Table(cfg=cfg, origin="x")])
        job = next(j for j in plan.jobs if j.label == "amd")
        return (plan.job_teacher(job).key, plan.job_hash(job), config_hash(cfg, "amd"),
                len(next(iter(plan.oracle_runs(plan.job_teacher(job).key).values()))))

    base = keys({"grid_step": 0.3})
    changed = keys({"grid_step": 0.3, param: 5})
    assert changed[:3] == base[:3]
    assert (changed[3] != base[3]) == (param == "oracle_seeds")  # 5 seeds per candidate instead of 3
    assert all(a != b for a, b in zip(keys({"grid_step": 0.3, "kd_weight": 2.0})[:3], base[:3]))
    with pytest.raises(StopIteration):  # oracle_seeds 0: no oracle runs at all
        keys({"grid_step": 0.3, "oracle_seeds": 0})
