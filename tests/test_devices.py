"""Devices (issue 15): the protocol's numerics (bf16 autocast, channels-last) on CPU, determinism settings, seeded
DataLoader workers, and ``kdbench verify``'s tolerance for CUDA and bf16 records. Everything runs on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from kdbench import runtime
from kdbench.cache.store import StoreError, check_identity, store_identity
from kdbench.config import (
    CachePolicy,
    Protocol,
    Runtime,
    ViewRecipe,
    config_hash,
    load_config,
    parse_config,
    to_raw,
)
from kdbench.data.shards import Split
from kdbench.data.stream import seeded_loader
from kdbench.errors import ConfigError
from kdbench.evaluate import predict
from kdbench.meta import DataInfo
from kdbench.methods.base import create_method
from kdbench.models import create_model, model_info
from kdbench.numerics import DEFAULT, Numerics
from kdbench.train.loop import fit
from kdbench.verify import GPU_TOLERANCE_PP, judge

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def raw(**over):
    base = {"name": "t", "teachers": {"t": {"model": "cnn_m"}}, "students": ["cnn_xs"], "methods": {"baseline": {}},
            "seeds": [0]}
    return {**base, **over}


# --- config ------------------------------------------------------------------------------------------------


def test_the_default_config_keeps_its_hashes():
    """Hashes of workflow/config/config.yaml computed before precision and channels_last existed."""
    cfg = load_config(ROOT / "workflow" / "config" / "config.yaml")
    assert config_hash(cfg) == "6e1920b52e16"
    assert cfg.protocol.hash() == "ae823983bac8"
    assert cfg.teachers["cnn_m"].train.hash() == "65de50900bb0"


def test_precision_and_channels_last_appear_in_the_resolved_config_only_when_set():
    plain = to_raw(parse_config(raw()))
    assert "precision" not in plain["protocol"] and "channels_last" not in plain["protocol"]
    explicit_defaults = parse_config(raw(protocol={"precision": "fp32", "channels_last": True}))
    assert to_raw(explicit_defaults) == plain
    cfg = parse_config(raw(protocol={"precision": "bf16", "channels_last": False}))
    resolved = to_raw(cfg)
    assert resolved["protocol"]["precision"] == "bf16" and resolved["protocol"]["channels_last"] is False
    assert parse_config(resolved) == cfg  # the resolved config round-trips
    assert cfg.protocol.hash() != Protocol().hash() and config_hash(cfg) != config_hash(parse_config(raw()))


def test_a_teacher_does_not_inherit_the_students_numerics():
    cfg = parse_config(raw(protocol={"precision": "bf16", "channels_last": False}))
    assert cfg.teachers["t"].train.precision == "fp32" and cfg.teachers["t"].train.channels_last is True
    own = parse_config(raw(teachers={"t": {"model": "cnn_m", "train": {"precision": "bf16"}}}))
    assert own.teachers["t"].train.precision == "bf16" and own.protocol.precision == "fp32"
    assert parse_config(to_raw(own)) == own


@pytest.mark.parametrize("protocol, pattern", [
    ({"precision": "fp16"}, r"cfg\.yaml: key 'protocol\.precision' must be one of fp32, bf16, got 'fp16'"),
    ({"precision": 16}, r"cfg\.yaml: key 'protocol\.precision' must be str"),
    ({"channels_last": "yes"}, r"cfg\.yaml: key 'protocol\.channels_last' must be bool"),
])
def test_bad_numerics_name_file_and_key(protocol, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw(protocol=protocol), source="cfg.yaml")


def test_a_teachers_bad_precision_names_its_key():
    with pytest.raises(ConfigError, match=r"key 'teachers\.t\.train\.precision' must be one of fp32, bf16"):
        parse_config(raw(teachers={"t": {"model": "cnn_m", "train": {"precision": "half"}}}), source="cfg.yaml")


def test_the_schema_knows_the_numerics():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(raw(protocol={"precision": "bf16", "channels_last": False}), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw(protocol={"precision": "fp16"}), schema)


# --- numerics ------------------------------------------------------------------------------------------------


def _model(name: str = "cnn_xs") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 10, 1, 28).eval()


def test_the_default_numerics_are_the_default_protocols():
    assert DEFAULT == Numerics("fp32", True) and DEFAULT.delta() == {}
    assert Numerics.of(Protocol(precision="bf16", channels_last=False)).delta() == {"precision": "bf16",
                                                                                   "channels_last": False}


def test_bf16_autocast_runs_on_cpu_and_returns_float32_close_to_fp32():
    model, x = _model(), torch.randn(16, 1, 28, 28)
    seen = []
    model.get_classifier().register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.no_grad():
        fp32 = DEFAULT.taps(model, x, {"logits", "feature[-1]"})
        bf16 = Numerics("bf16", True).taps(model, x, {"logits", "feature[-1]"})
    assert seen == [torch.float32, torch.bfloat16]  # the forward really ran in bf16 ...
    assert all(v.dtype == torch.float32 for v in bf16.values())  # ... and its outputs leave it as float32
    assert not torch.equal(bf16["logits"], fp32["logits"])
    torch.testing.assert_close(bf16["logits"], fp32["logits"], rtol=0.05, atol=0.05)


def test_fp32_numerics_return_the_models_own_tensor():
    model, x = _model(), torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(DEFAULT.run(model, x), model(x.contiguous(memory_format=torch.channels_last)))


def test_channels_last_gives_the_contiguous_predictions_within_1e_5():
    x = torch.randn(32, 1, 28, 28)
    outs = {}
    for channels_last in (True, False):
        numerics = Numerics("fp32", channels_last)
        model = numerics.model(_model("cnn_s"))
        conv = next(p for p in model.parameters() if p.ndim == 4)
        assert conv.is_contiguous(memory_format=numerics.memory_format)
        assert numerics.inputs(x).is_contiguous(memory_format=numerics.memory_format)
        with torch.no_grad():
            outs[channels_last] = numerics.run(model, x)
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-5)
    assert Numerics("fp32", True).inputs(torch.zeros(2, 3)).shape == (2, 3)  # not an image batch: as it is


def _tiny_world(n: int = 96) -> tuple[Split, Split, DataInfo]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    images = (torch.rand(n, 1, 16, 16, generator=g) * 60 + labels[:, None, None, None] * 45).to(torch.uint8)
    split = Split(images, labels, torch.arange(n), n)
    return split, Split(images[:32], labels[:32], torch.arange(32), 32), DataInfo(4, 1, 16, n, (0.4,), (0.3,))


def _fit_one_epoch(precision: str):
    train, val, data = _tiny_world()
    protocol = Protocol(epochs=1, batch_size=32, lr=0.05, precision=precision, views=ViewRecipe(count=1))
    torch.manual_seed(0)
    model = create_model("cnn_xs", data.num_classes, data.in_chans, data.image_size)
    method = create_method("baseline", {}, teacher=None,
                           student=model_info(model, "cnn_xs", data.in_chans, data.image_size), data=data)
    losses, logits_dtypes = [], []
    loss = method.loss

    def spy(s_out, t_out, targets, ctx):
        logits_dtypes.append(s_out["logits"].dtype)
        out = loss(s_out, t_out, targets, ctx)
        losses.append(out.loss)
        return out

    method.loss = spy
    result = fit(model, method, train, {"val": val}, data, protocol, seed=0, device=CPU)
    return result, predict(model, val, data, 16, 32, CPU, Numerics.of(protocol)), losses, logits_dtypes


def test_bf16_trains_a_tiny_model_one_epoch_close_to_fp32_with_fp32_losses():
    fp32, fp32_logits, _, _ = _fit_one_epoch("fp32")
    bf16, bf16_logits, losses, dtypes = _fit_one_epoch("bf16")
    assert len(losses) == 3 and all(loss.dtype == torch.float32 for loss in losses)
    assert set(dtypes) == {torch.float32}  # the method sees float32 outputs of a bf16 forward
    assert bf16_logits.dtype == torch.float32
    assert not torch.equal(bf16_logits, fp32_logits)
    assert (bf16_logits - fp32_logits).abs().max() < 0.1 * fp32_logits.abs().max()
    assert abs(bf16.history[0]["train_loss"] - fp32.history[0]["train_loss"]) < 0.05


# --- teacher-output stores --------------------------------------------------------------------------------------


def test_a_store_of_other_numerics_is_refused_both_ways():
    default = store_identity("sha", "logits", ViewRecipe(), CachePolicy(), 28)
    assert default == store_identity("sha", "logits", ViewRecipe(), CachePolicy(), 28, DEFAULT.delta())
    bf16 = store_identity("sha", "logits", ViewRecipe(), CachePolicy(), 28, Numerics("bf16", True).delta())
    check_identity("s", default, default)
    check_identity("s", bf16, bf16)
    with pytest.raises(StoreError, match="field 'teacher_numerics' is None but this run expects"):
        check_identity("s", default, bf16)
    with pytest.raises(StoreError, match="field 'teacher_numerics' is .*bf16.* but this run expects None"):
        check_identity("s", bf16, default)


def test_a_bf16_table_gets_its_own_stores_and_the_default_keeps_its_paths(tmp_path):
    from _helpers_store import tiny_raw, write_config, write_fmnist_idx

    from kdbench.plan import Plan

    raw_root = write_fmnist_idx(tmp_path / "raw")
    base = tiny_raw(raw_root, methods={"baseline": {}, "kd": {}})

    def plan(name: str, **protocol) -> Plan:
        raw = {**base, "protocol": {**base.get("protocol", {}), **protocol}}
        return Plan.resolve([write_config(tmp_path / name, raw)], {})

    default, explicit = plan("a.yaml"), plan("b.yaml", precision="fp32", channels_last=True)
    assert set(default.stores) == set(explicit.stores) and set(default.teachers) == set(explicit.teachers)
    for numerics in ({"precision": "bf16"}, {"channels_last": False}):
        other = plan("c.yaml", **numerics)
        assert set(other.teachers) == set(default.teachers)  # the teacher trains as before (no inheritance) ...
        assert not set(other.stores) & set(default.stores)  # ... but its outputs for this table are other bits


# --- determinism ---------------------------------------------------------------------------------------------


def test_setup_on_cpu_changes_no_determinism_setting():
    before = runtime.determinism(CPU)
    assert runtime.setup(Runtime(device="cpu")) == CPU
    assert runtime.determinism(CPU) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in before


def test_setup_on_cuda_asks_for_determinism_before_any_cuda_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        device = runtime.setup(Runtime(device="auto"))
        assert device.type == "cuda"
        assert runtime.determinism(device) == {"deterministic_algorithms": True, "cudnn_benchmark": False,
                                               "cudnn_deterministic": True, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
        runtime.setup(Runtime(device="cuda"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_provenance_records_numerics_and_determinism():
    prov = runtime.provenance(CPU, Numerics("bf16", False))
    assert prov["precision"] == "bf16" and prov["channels_last"] is False
    assert prov["determinism"] == runtime.determinism(CPU)
    assert "precision" not in runtime.provenance(CPU)


# --- seeded DataLoader workers ------------------------------------------------------------------------------


class _Draws(IterableDataset):
    """Each worker yields its id and a draw of torch, numpy and random, from its own seeded state."""

    def __iter__(self):
        import random

        info = torch.utils.data.get_worker_info()
        yield {"worker": info.id, "torch": torch.rand(2), "numpy": np.random.rand(2), "random": random.random()}


def _draw(seed: int) -> list:
    return sorted((int(b["worker"]), b["torch"].tolist(), b["numpy"].tolist(), float(b["random"]))
                  for b in seeded_loader(_Draws(), 2, seed))


def test_seeded_workers_draw_the_same_numbers_in_every_run_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = _draw(7), _draw(7)  # the global RNG moves on between the two if the loader draws from it
    assert torch.equal(torch.get_rng_state(), state)
    assert first == second and len(first) == 2 and first[0][1:] != first[1][1:]
    assert _draw(8) != first


# --- kdbench verify ------------------------------------------------------------------------------------------


def _run_dir(path: Path, top1: float, device: str, precision: str | None = None) -> tuple[Path, dict]:
    path.mkdir(parents=True)
    record = {"final": {"test_top1": top1}, "cost": {"student_params": 10},
              "protocol": {"epochs": 1, **({"precision": precision} if precision else {})},
              "provenance": {"model_sha256": f"w{top1}", "device": device, "cpu": "A", "cpu_capability": "AVX2"}}
    (path / "record.json").write_text(json.dumps(record))
    (path / "epochs.jsonl").write_text(json.dumps({"epoch": 0, "val_top1": top1, "time_s": 3.0}) + "\n")
    return path, record


def test_a_cuda_record_is_compared_within_the_stated_tolerance(tmp_path):
    run, record = _run_dir(tmp_path / "run", 80.0, "NVIDIA A100-SXM4-80GB")
    rerun, rerun_record = _run_dir(tmp_path / "rerun", 80.25, "cpu (x86_64)")
    report = judge(run, rerun, record, rerun_record["provenance"])
    assert report.status == "within_tolerance" and report.ok and report.tolerance == GPU_TOLERANCE_PP
    text = report.render(run)
    assert f"within {GPU_TOLERANCE_PP} points" in text
    assert "the record ran on CUDA (NVIDIA A100-SXM4-80GB)" in text and "not bit-deterministic" in text
    far, far_record = _run_dir(tmp_path / "far", 81.0, "cpu (x86_64)")
    worse = judge(run, far, record, far_record["provenance"])
    assert worse.status == "differs" and not worse.ok
    assert f"beyond the tolerance of {GPU_TOLERANCE_PP} points" in worse.render(run)


def test_a_bf16_record_is_compared_within_the_tolerance_and_a_cpu_fp32_one_bit_for_bit(tmp_path):
    run, record = _run_dir(tmp_path / "bf16", 80.0, "cpu (x86_64)", "bf16")
    rerun, rerun_record = _run_dir(tmp_path / "bf16-rerun", 80.25, "cpu (x86_64)", "bf16")
    report = judge(run, rerun, record, rerun_record["provenance"])
    assert report.status == "within_tolerance" and "computes in bf16" in report.render(run)
    fp32, fp32_record = _run_dir(tmp_path / "fp32", 80.0, "cpu (x86_64)")
    fp32_rerun, fp32_rerun_record = _run_dir(tmp_path / "fp32-rerun", 80.25, "cpu (x86_64)")
    strict = judge(fp32, fp32_rerun, fp32_record, fp32_rerun_record["provenance"])
    assert strict.status == "differs" and strict.tolerance == 0.0 and "tolerance" not in strict.render(fp32)
    same = judge(fp32, fp32, fp32_record, fp32_record["provenance"])
    assert same.status == "identical"
