"""Config validation: every user error names the file, the dotted key and the valid choices."""

from __future__ import annotations

import pytest

from kdbench.config import ConfigError, Protocol, parse_config


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


def test_method_variants_keep_their_label():
    cfg = parse_config(raw(methods={"kd_t1": {"method": "kd", "tau": 1.0}}))
    entry = cfg.methods["kd_t1"]
    assert entry.method == "kd" and entry.params == {"tau": 1.0}
