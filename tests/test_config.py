"""Config validation: every user error names the file, the dotted key and the valid choices."""

from __future__ import annotations

import pytest
import yaml

from kdbench._util import to_jsonable
from kdbench.config import Protocol, build_dataclass, load_config, parse_config, to_raw
from kdbench.errors import ConfigError


def raw(**over):
    base = {
        "name": "t",
        "teachers": {"t": {"model": "cnn_m"}},
        "students": ["cnn_xs"],
        "methods": {"baseline": {}, "kd": {}},
        "seeds": [0, 1],
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"protocol": {"epocs": 3}}, r"cfg\.yaml: unknown key 'protocol\.epocs'; valid keys of 'protocol': .*epochs"),
        ({"protocol": {"lr": "fast"}}, r"cfg\.yaml: key 'protocol\.lr' must be float"),
        ({"protocol": {"views": {"mixup": 2.0}}}, r"'protocol\.views\.mixup' must be a probability"),
        ({"methods": {"kd": {"tau": 4, "temperature": 2}}}, r"'methods\.kd'.*'temperature'.*valid parameters: tau"),
        ({"methods": {"kd": {"tau": "hot"}}}, r"'methods\.kd'.*'tau' must be"),
        ({"methods": {"kdd": {}}}, r"'methods\.kdd': unknown method 'kdd'; valid choices: .*baseline.*kd"),
        ({"methods": {"v": {"method": "nope"}}}, r"unknown method 'nope'"),
        ({"students": ["not_a_model"]}, r"'students\[0\]': unknown timm model 'not_a_model'"),
        ({"teachers": {"t": {"model": "cnn_m", "ckpt": "x"}}}, r"unknown key 'teachers\.t\.ckpt'"),
        ({"teachers": {"t": {"model": "cnn_m", "train": {"epochs": 0}}}}, r"'teachers\.t\.train\.epochs' must be >= 1"),
        ({"seeds": [0, 0]}, r"'seeds' has duplicates"),
        ({"bogus": 1}, r"unknown top-level key 'bogus'"),
        ({"cache": {"topk": "5"}}, r"'cache\.topk' must be"),
        ({"protocol": {"retrieval_tap": "embedding"}}, r"cfg\.yaml: key 'protocol\.retrieval_tap' must be a tap name"),
        ({"protocol": {"retrieval_tap": "feature[x]"}}, r"'protocol\.retrieval_tap' must be a tap name"),
        ({"protocol": {"retrieval_tap": 3}}, r"'protocol\.retrieval_tap' must be"),
        ({"teachers": {"t": {"model": "cnn_m", "train": {"retrieval_tap": "pre_logits"}}}},
         r"'teachers\.t\.train\.retrieval_tap': a teacher's training measures no retrieval"),
        ({"protocol": {"decoupled_weight_decay": True}}, r"'protocol\.decoupled_weight_decay' needs optimizer 'adamw'"),
        ({"protocol": {"grad_clip_norm": 0}}, r"'protocol\.grad_clip_norm' must be > 0"),
        ({"methods": {"fm": {"method": "funmatch", "teacher_view": "centre"}}},
         r"'methods\.fm'.*'teacher_view' must be one of same, other, clean"),
        ({"protocol": {"views": {"count": 1}}, "methods": {"noise": {"method": "funmatch", "teacher_view": "other"}}},
         r"method 'noise' \(funmatch\).*teacher_view 'other'.*'protocol\.views\.count' is 1.*Fix"),
    ],
)
def test_user_errors_name_file_and_key(over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw(**over), source="cfg.yaml")


def test_teacher_protocol_inherits_the_student_protocol():
    cfg = parse_config(raw(protocol={"lr": 0.1, "epochs": 5}, teachers={"t": {"model": "cnn_m", "train": {"epochs": 9}}}))
    assert cfg.teachers["t"].train.epochs == 9 and cfg.teachers["t"].train.lr == 0.1
    assert cfg.protocol.epochs == 5


def test_protocol_hash_is_stable_and_sensitive():
    assert Protocol().hash() == Protocol().hash()
    assert Protocol(lr=0.1).hash() != Protocol().hash()


def test_patience_options_default_to_todays_protocol_and_its_hash():
    """The optimiser options added for FunMatch's patient protocol stay out of the hash while off."""
    new = {"decoupled_weight_decay", "weight_decay_exclude_1d", "grad_clip_norm"}
    assert not new & set(to_jsonable(Protocol())) and new <= set(to_jsonable(Protocol(grad_clip_norm=1.0,
        weight_decay_exclude_1d=True, optimizer="adamw", decoupled_weight_decay=True)))
    on = [Protocol(optimizer="adamw", decoupled_weight_decay=True), Protocol(weight_decay_exclude_1d=True),
          Protocol(grad_clip_norm=1.0)]
    assert len({p.hash() for p in on} | {Protocol().hash()}) == 4


@pytest.mark.parametrize("tap", ["pre_logits", "logits", "feature[0]", "feature[-1]"])
def test_retrieval_tap_switches_retrieval_on_for_the_students_only(tap):
    off, on = parse_config(raw()), parse_config(raw(protocol={"retrieval_tap": tap}))
    assert off.protocol.retrieval_tap is None and on.protocol.retrieval_tap == tap
    assert on.protocol.hash() != off.protocol.hash()
    assert on.teachers["t"].train == off.teachers["t"].train  # the teacher (and its key) does not change
    assert parse_config(to_raw(on)).protocol == on.protocol


def test_retrieval_off_leaves_hashes_and_resolved_configs_as_before_it_existed():
    off = parse_config(raw(protocol={"retrieval_tap": None}))
    assert "retrieval_tap" not in to_jsonable(off.protocol) and "retrieval_tap" not in to_raw(off)["protocol"]
    assert off.protocol.hash() == Protocol().hash() == parse_config(raw()).protocol.hash()


def test_method_variants_keep_their_label():
    cfg = parse_config(raw(methods={"kd_t1": {"method": "kd", "tau": 1.0}}))
    entry = cfg.methods["kd_t1"]
    assert entry.method == "kd" and entry.params == {"tau": 1.0}


# --- numbers YAML 1.1 reads as strings -------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("5e-2", 0.05), ("1e-4", 1e-4), ("-3E+2", -300.0), (".5e1", 5.0), ("2", 2.0)])
def test_numeric_strings_become_floats_where_the_field_is_a_float(text, value):
    proto = build_dataclass(Protocol, {"momentum": text}, "protocol", "cfg.yaml")
    assert proto.momentum == value and isinstance(proto.momentum, float)


@pytest.mark.parametrize("text", ["fast", "nan", "inf", "1_000", "0x10", "5e", "1e-4 "])
def test_non_numeric_strings_are_still_rejected_for_float_fields(text):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: key 'protocol\.lr' must be float, got"):
        parse_config(raw(protocol={"lr": text}), source="cfg.yaml")


def test_float_tuples_take_numeric_strings_and_keep_their_length():
    cfg = parse_config(raw(protocol={"views": {"scale": ["5e-1", "1e0"]}}))
    assert cfg.protocol.views.scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match=r"'protocol\.views\.scale' must be"):
        parse_config(raw(protocol={"views": {"scale": [0.1, 0.2, 0.3]}}))
    with pytest.raises(ConfigError, match=r"'protocol\.milestones' must be"):
        parse_config(raw(protocol={"milestones": ["1e1"]}))  # an int field: no conversion


def test_yaml_exponent_without_dot_loads_as_a_float(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw()) + "protocol:\n  lr: 5e-2\n  weight_decay: 1e-4\n")
    cfg = load_config(path)
    assert cfg.protocol.lr == 0.05 and cfg.protocol.weight_decay == 1e-4


# --- file-level errors: one line naming the file and the fix ---------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_config_file_is_one_clean_error(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "empty" in message
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "text, line, column",
    [("name: x\n  bad: [\n", 2, 6), ("name: x\nseeds: [0, 1\n", 3, 1), ("name: x\n\tseeds: [0]\n", 2, 1)],
)
def test_invalid_yaml_names_file_line_and_column_on_one_line(tmp_path, text, line, column):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not valid YAML at line {line}, column {column}: ")
    assert "fix the YAML syntax" in message


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
