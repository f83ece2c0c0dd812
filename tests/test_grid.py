"""The grid of a table: every teacher x every student, or the listed ``pairs``; and ``protocol.student_lr``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdbench.config import parse_config, to_raw
from kdbench.errors import ConfigError
from kdbench.plan import Plan

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def raw(**over):
    base = {
        "name": "t",
        "teachers": {"big": {"model": "cnn_l"}, "mid": {"model": "cnn_m"}},
        "pairs": [["big", "cnn_s"], ["mid", "cnn_xs"], ["big", "cnn_xs"]],
        "methods": {"baseline": {}, "kd": {}},
        "seeds": [0, 1],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_pairs_are_the_grid_in_their_order_and_name_the_students():
    cfg = parse_config(raw())
    assert cfg.grid() == [("big", "cnn_s"), ("mid", "cnn_xs"), ("big", "cnn_xs")]
    assert cfg.students == ("cnn_s", "cnn_xs")  # first appearance order
    assert cfg.students_of("big") == ("cnn_s", "cnn_xs") and cfg.students_of("mid") == ("cnn_xs",)
    again = parse_config(to_raw(cfg))  # what every job reads: the resolved config
    assert again.grid() == cfg.grid() and again.students == cfg.students


def test_without_pairs_the_grid_is_every_teacher_with_every_student():
    cfg = parse_config(raw(pairs=None, students=["cnn_s", "cnn_xs"]))
    assert cfg.pairs is None and "pairs" not in to_raw(cfg)  # existing configs keep their hashes
    assert cfg.grid() == [("big", "cnn_s"), ("big", "cnn_xs"), ("mid", "cnn_s"), ("mid", "cnn_xs")]
    assert cfg.students_of("mid") == ("cnn_s", "cnn_xs")


@pytest.mark.parametrize("over, pattern", [
    ({"pairs": []}, r"cfg\.yaml: key 'pairs' must be a non-empty list of \[teacher, student\]"),
    ({"pairs": [["big"]]}, r"key 'pairs\[0\]' must be \[teacher, student\]"),
    ({"pairs": [["huge", "cnn_s"]]}, r"key 'pairs\[0\]': teacher 'huge' is not under 'teachers' \(big, mid\)"),
    ({"pairs": [["big", "cnn_s"], ["mid", "resnet_nope"]]}, r"key 'pairs\[1\]': unknown timm model 'resnet_nope'"),
    ({"pairs": [["big", "cnn_s"], ["mid", "cnn_s"], ["big", "cnn_s"]]}, r"'pairs\[2\]'.*listed twice"),
    ({"pairs": [["big", "cnn_s"]]}, r"key 'teachers': 'mid' is in no pair of 'pairs'"),
    ({"students": ["cnn_s"]}, r"key 'pairs': student 'cnn_xs' \(teacher 'mid'\) is not in 'students'"),
    ({"students": ["cnn_s", "cnn_xs", "cnn_m"]}, r"key 'students': 'cnn_m' is in no pair"),
    ({"pairs": None}, r"missing required key 'students'.*or 'pairs'"),
    ({"protocol": {"student_lr": {"cnn_xs": 0}}}, r"key 'protocol\.student_lr' must map student models to learning rates > 0"),
    ({"protocol": {"student_lr": {"MobileNetV2": 0.01}}}, r"key 'protocol\.student_lr\.MobileNetV2': unknown timm model"),
    ({"protocol": {"student_lr": {"cnn_xs": "slow"}}}, r"key 'protocol\.student_lr' must be a mapping of str -> float"),
])
def test_grid_errors_name_the_file_and_the_key(over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw(**over), source="cfg.yaml")


def test_the_plan_runs_only_the_listed_pairs(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg.pop("students")
    teacher = next(iter(cfg["teachers"]))
    cfg["teachers"]["second"] = {"model": "cnn_m"}
    cfg["pairs"] = [[teacher, "cnn_xs"], ["second", "vit_pico_patch4"]]
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plan = Plan.resolve([path])
    assert {(j.teacher, j.student) for j in plan.jobs} == {(teacher, "cnn_xs"), ("second", "vit_pico_patch4")}
    assert len(plan.jobs) == 2 * len(cfg["methods"]) * len(cfg["seeds"]) and not plan.skipped
    assert set(plan.teachers) >= {plan.teacher_key(plan.jobs[0].table, t).key
                                  for t in (teacher, "second")}


def test_student_lr_reaches_the_optimiser_of_a_distill_job(tmp_path, monkeypatch):
    """``run_distill`` hands ``fit`` the student's protocol; the record keeps the table's (one protocol hash)."""
    import kdbench.distill as distill
    from kdbench.config import load_config
    from kdbench.data.prepare import prepare

    if not Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")
    cfg_raw = raw(pairs=None, teachers={"t": {"model": "cnn_s"}}, students=["cnn_xs", "cnn_s"],
                  data={"val_size": 64, "shard_size": 128, "train_limit": 128, "test_limit": 64},
                  protocol={"epochs": 1, "batch_size": 64, "lr": 0.05, "student_lr": {"cnn_xs": 0.01}},
                  runtime={"device": "cpu", "threads": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg_raw))
    cfg = load_config(path)
    prepare(cfg.data, tmp_path / "data")
    seen = []
    real_fit = distill.fit

    def spy(model, method, train, evals, data, protocol, *args, **kwargs):
        seen.append(protocol.lr)
        return real_fit(model, method, train, evals, data, protocol, *args, **kwargs)

    monkeypatch.setattr(distill, "fit", spy)
    records = [distill.run_distill(cfg, "t", s, "baseline", 0, tmp_path / "data", None, {}, tmp_path / s)
               for s in ("cnn_xs", "cnn_s")]
    assert seen == [0.01, 0.05]
    assert records[0].protocol_hash == records[1].protocol_hash == cfg.protocol.hash()
