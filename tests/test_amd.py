"""AMD: nested pruned candidates with the requested ratios, a function-preserving channel sort, the selection as
a pure function of logged accuracies, and the search -> select -> fine-tune -> oracle -> audit chain on tiny
data."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdbench.models import create_model, pruned_name, split_pruned_name
from kdbench.prune import CLASSIFIER_INPUT, candidate_grid, slice_state, sort_channels
from kdbench.report.stats import spearman
from kdbench.tasearch import npsd_approx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _randomised(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, 10, 1, 28).eval()
    for m in model.modules():  # non-trivial BN statistics, so that a wrong permutation shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
    return model


@pytest.mark.parametrize("name", ["cnn_m", "resnet20"])
def test_sorting_channels_by_importance_keeps_the_function(name):
    model = _randomised(name)
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    orders = sort_channels(model, torch.zeros(1, 1, 28, 28))
    assert CLASSIFIER_INPUT in orders and len(orders) > 2
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders.values())  # something moved
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cnn_m", "resnet20"])
def test_candidates_have_the_requested_ratios_and_are_nested(name):
    grid = candidate_grid(name, 10, 1, 28, min_scale=0.05, step=0.1)
    assert [c.scale for c in grid] == pytest.approx([0.1 * k for k in range(1, 10)])
    for c in grid:
        assert abs(c.ratio - c.scale) <= 0.02, c  # the requested ratio ± 2% (of the teacher's size)
        assert c.ratio == pytest.approx(c.scale, rel=0.01 if name == "cnn_m" else 0.02), c
        assert split_pruned_name(c.name) == (name, c.widths)
        assert sum(p.numel() for p in create_model(c.name, 10, 1, 28).parameters()) == c.params
    # nested: every tensor of candidate k is a leading slice of candidate k+1's (and of the sorted teacher's)
    teacher = _randomised(name)
    sort_channels(teacher, torch.zeros(1, 1, 28, 28))
    shared = teacher.state_dict()
    states = [slice_state(shared, create_model(c.name, 10, 1, 28).state_dict()) for c in grid]
    for small, big in itertools.pairwise(states):
        for key, t in small.items():
            assert all(a <= b for a, b in zip(t.shape, big[key].shape))
            assert torch.equal(t, big[key][tuple(slice(0, n) for n in t.shape)])
    assert all(a.params < b.params for a, b in itertools.pairwise(grid))


def test_a_grid_too_fine_for_the_widths_is_refused():
    with pytest.raises(ValueError, match="too fine"):
        candidate_grid("cnn_xs", 10, 1, 28, min_scale=0.0, step=0.01)


def test_pruned_names_round_trip_and_bad_ones_are_named():
    assert pruned_name("cnn_m", (3, 4, 5)) == "cnn_m:w3-4-5"
    assert split_pruned_name("cnn_m:w3-4-5") == ("cnn_m", (3, 4, 5))
    with pytest.raises(ValueError, match="cnn_m:w3-4"):
        split_pruned_name("cnn_m:w3-4")
    with pytest.raises(ValueError, match="staged CNN"):
        pruned_name("vit_pico_patch4", (3,))


def test_npsd_approx_is_the_knee_rule_on_logged_accuracies():
    scales = [0.2, 0.4, 0.6, 0.8]
    acc = [60.0, 80.0, 84.0, 86.0]  # steep, then flat
    out = npsd_approx(scales, acc, 88.0)
    assert out["criterion"] == "npsd-approx"
    assert out["slopes"] == pytest.approx([100.0, 20.0, 10.0, 10.0])
    assert out["mean_slope"] == pytest.approx(28.0 / 0.8)
    assert out["selected"] == 1  # the smallest candidate whose slope is at most the average
    assert out["rank"] == [1, 2, 3, 0]
    assert npsd_approx(scales, acc, 88.0) == out  # pure: same inputs, same output
    assert npsd_approx(scales, [80.0, 81.0, 82.0, 83.0], 84.0)["selected"] == 0  # flat: the smallest
    with pytest.raises(ValueError):
        npsd_approx([0.4, 0.2], [1.0, 2.0], 3.0)


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 1]) is None
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """Teacher cnn_s on a tiny Fashion-MNIST slice, its stores, and AMD's whole chain."""
    if not (FMNIST / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")
    from kdbench.cache.build import build_shard, finalize_store
    from kdbench.config import load_config
    from kdbench.data.prepare import prepare
    from kdbench.data.sources import shard_counts
    from kdbench.report.audit import audit
    from kdbench.tasearch import run_finetune, run_oracle, run_search, run_select
    from kdbench.teacher import train_teacher

    root = tmp_path_factory.mktemp("amd")
    raw = {
        "name": "amd-unit",
        "data": {"val_size": 128, "shard_size": 128, "train_limit": 256, "test_limit": 128},
        "protocol": {
            "epochs": 3,
            "batch_size": 64,
            "eval_batch_size": 128,
            "views": {"count": 2, "mixup": 0.0},
        },
        "teachers": {"t": {"model": "cnn_s", "train": {"epochs": 1}}},
        "students": ["cnn_xs"],
        # 2 joint epochs and a random pick of 1 of the 2 smaller candidates per step: a resumed search must restore
        # the epoch and the sandwich's RNG
        "methods": {"amd": {"grid_step": 0.3, "bn_batches": 2, "joint_epochs": 2, "sandwich": 1}},
        "seeds": [0],
        "runtime": {"device": "cpu", "threads": 1},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(root / "config.yaml")
    data, teacher = root / "data", root / "teacher"
    prepare(cfg.data, data)
    train_teacher(cfg, "t", data, teacher)
    stores = {}
    for tap, dirname in (("logits", "logits"), ("feature[2]", "feature_2")):
        store = root / "cache" / dirname
        for i in range(shard_counts(cfg.data)["train"]):
            build_shard(cfg, teacher, data, tap, i, store / f"shard-{i:05d}.h5")
        finalize_store(cfg, teacher, data, tap, store)
        stores[tap] = store
    assistant = root / "assistant"
    search = assistant / "search"
    summary = run_search(cfg, "t", "amd", data, teacher, stores, search)
    selection = run_select(search)
    ta = run_finetune(cfg, "t", "amd", data, teacher, stores, search, assistant)
    oracle = [  # candidate-major, 2 seeds each (paired by seed)
        run_oracle(cfg, "t", "amd", "cnn_xs", search / c["dir"], data, root / "oracle" / f"{c['index']}-{seed}", seed)
        for c in summary["candidates"]
        for seed in (0, 1)
    ]
    result = audit(json.loads((search / "candidates.json").read_text()), selection,
                   {"cnn_xs": [json.loads((root / "oracle" / f"{c['index']}-{seed}" / "record.json").read_text())
                               for c in summary["candidates"] for seed in (0, 1)]})
    return SimpleNamespace(
        cfg=cfg, root=root, summary=summary, selection=selection, ta=ta, oracle=oracle, result=result,
        data=data, teacher=teacher, stores=stores, search=search,
    )


def test_search_trains_every_candidate_and_logs_its_accuracy(searched):
    s = searched
    cands = s.summary["candidates"]
    assert [c["scale"] for c in cands] == pytest.approx([0.3, 0.6, 0.9])
    assert (
        s.summary["joint"]["teacher_forward"] == 0 and s.summary["joint"]["cache_bytes_read"] > 0
    )  # from the stores
    for c in cands:
        metrics = json.loads((s.root / "assistant" / "search" / c["dir"] / "metrics.json").read_text())
        assert metrics["model"] == c["name"] and metrics["val_top1"] == c["val_top1"]
    saved = json.loads((s.root / "assistant" / "search" / "candidates.json").read_text())
    assert saved["candidates"] == cands


def test_selection_recomputes_from_the_logged_accuracies(searched):
    s = searched
    again = npsd_approx(
        [c["scale"] for c in s.summary["candidates"]],
        [c["val_top1"] for c in s.summary["candidates"]],
        s.summary["teacher_val_top1"],
    )
    assert (
        s.selection["selected"] == again["selected"]
        and s.selection["name"] == s.summary["candidates"][again["selected"]]["name"]
    )


def test_finetuned_assistant_starts_from_its_searched_weights_and_is_a_teacher(searched):
    s = searched
    assert s.ta.status == "ok" and s.ta.identity.student == s.selection["name"]
    assert s.ta.protocol.epochs == 1  # a third of the protocol's 3 epochs
    metrics = json.loads((s.root / "assistant" / "metrics.json").read_text())
    assert metrics["model"] == s.selection["name"]
    from kdbench.distill import _assistant_cost

    seconds, candidates = _assistant_cost(s.root / "assistant")
    assert candidates == 3 and seconds == pytest.approx(s.ta.cost.wall_time_s + s.summary["wall_time_s"])


def test_oracle_runs_distil_live_from_each_candidate_and_the_audit_ranks_them(searched):
    s = searched
    assert all(r.status == "ok" and r.cost.teacher_forward > 0 for r in s.oracle)  # the candidate ran live
    assert [r.identity.seed for r in s.oracle] == [0, 1] * 3
    st = s.result["students"]["cnn_xs"]
    assert st["val_top1"] == [[r.final.val_top1 for r in s.oracle[2 * k : 2 * k + 2]] for k in range(3)]
    assert st["seeds"] == 2 and st["seed_ids"] == [0, 1]
    means = [sum(v) / 2 for v in st["val_top1"]]
    assert st["mean"] == pytest.approx(means)
    assert st["regret"] == pytest.approx(max(means) - means[s.selection["selected"]])
    assert 1 <= st["selected_rank"] <= 3
    assert s.result["stability"]["val_images"] == 128 and sum(s.result["stability"]["picks"]) == 1000
    from kdbench.report.audit import audit_markdown

    text = audit_markdown(s.result)
    assert "npsd-approx" in text and "(selected)" in text and "Stability of the pick" in text


@pytest.mark.slow
def test_the_workflow_runs_amds_search_rules_and_writes_the_audit(tmp_path):
    """The tiny workflow config with AMD: search -> select -> fine-tune -> cache -> distill, plus the oracle
    runs and the audit, through Snakemake itself."""
    if not (FMNIST / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")
    from test_workflow import TINY, job_counts, snakemake

    raw = yaml.safe_load(TINY.read_text())
    raw.update(
        students=["cnn_xs"], seeds=[0], methods={"baseline": {}, "amd": {"grid_step": 0.3, "bn_batches": 2}}
    )
    config = tmp_path / "amd.yaml"
    config.write_text(yaml.safe_dump(raw))
    plan = snakemake(tmp_path, config, "-n")
    assert plan.returncode == 0, plan.stderr
    counts = job_counts(plan.stdout)
    assert counts["amd_search"] == 1 and counts["amd_select"] == 1 and counts["amd_audit"] == 1
    assert counts["amd_oracle"] == 3 * 3 and counts["train_assistant"] == 1 and counts["distill"] == 2  # 3 seeds
    run = snakemake(tmp_path, config, "--cores", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    audit_md = next((tmp_path / "results" / "tiny" / "audit").rglob("amd.md"))
    text = audit_md.read_text()
    assert "npsd-approx" in text and "(selected)" in text
    record = json.loads(
        next((tmp_path / "results" / "tiny" / "runs").rglob("amd/seed0/record.json")).read_text()
    )
    assert record["status"] == "ok"
    assert record["cost"]["assistant_candidates"] == 3 and record["cost"]["assistant_time_s"] > 0
    assert (
        ":w"
        in json.loads(
            (
                Path(record["inputs"]["teacher_dir"])
                if Path(record["inputs"]["teacher_dir"]).is_absolute()
                else tmp_path / record["inputs"]["teacher_dir"]
            )
            .joinpath("metrics.json")
            .read_text()
        )["model"]
    )


def test_the_cifar100_amd_config_plans_the_search_on_files_in_the_real_format(tmp_path):
    from test_data import make_cifar100

    from kdbench.plan import Plan

    make_cifar100(tmp_path / "cifar100", n_train=600, n_test=200)
    config = Path(__file__).resolve().parents[1] / "workflow" / "config" / "cifar100-amd.yaml"
    plan = Plan.resolve([config], {"data": {"root": str(tmp_path / "cifar100"), "val_size": 100}})
    assert plan.skipped == {} and {j.label for j in plan.jobs} == {"baseline", "kd", "takd", "amd"}
    ((teacher, label),) = [a for a in plan.assistants("cifar100-amd") if plan.searched("cifar100-amd", a[1])]
    akey = plan.assistant_key("cifar100-amd", teacher, label).key
    grid = plan.search_grid(akey)
    assert [c.scale for c in grid] == pytest.approx([0.1 * k for k in range(1, 10)])
    assert all(c.name.startswith("resnet110:w") and abs(c.ratio - c.scale) <= 0.02 for c in grid)
    assert len(plan.oracle_runs(akey)["resnet8"]) == 9 * 3  # 3 oracle seeds per candidate
    assert plan.audits("cifar100-amd") == [plan.audit_file("cifar100-amd", teacher, label)]
    # the searched assistant's stores: the method's taps of a resnet110-shaped model
    job = next(j for j in plan.jobs if j.label == "amd")
    assert set(plan.job_stores(job)) == {"logits", "feature[-1]"} and plan.job_teacher(job).key == akey


# --- preemption: the search resumes where it stopped ------------------------------------------------------

STEPS = 4  # joint steps per epoch: 256 images in batches of 64; the fixture's search trains 2 epochs


def _search_args(s, out: Path) -> list[str]:
    stores = [arg for store in s.stores.values() for arg in ("--store", str(store))]
    return ["amd-search", "--config", s.cfg.source, "--teacher", "t", "--method-label", "amd", "--data", str(s.data),
            "--teacher-dir", str(s.teacher), *stores, "--out", str(out)]


def _assert_same_search(ref: Path, out: Path) -> None:
    """``out`` holds the search in ``ref``: ``candidates.json`` apart from the wall time, every candidate's weights,
    predictions and metrics apart from provenance; and no checkpoint is left."""
    from kdbench.train.checkpoint import CHECKPOINT_FILE

    def untimed(path: Path, key: str) -> dict:
        data = json.loads(path.read_text())
        data.pop(key)
        return data

    summary = untimed(out / "candidates.json", "wall_time_s")
    assert summary == untimed(ref / "candidates.json", "wall_time_s")
    for c in summary["candidates"]:
        a, b = ref / c["dir"], out / c["dir"]
        assert untimed(a / "metrics.json", "provenance") == untimed(b / "metrics.json", "provenance")
        assert (a / "predictions.npy").read_bytes() == (b / "predictions.npy").read_bytes()
        ws, wo = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
        assert ws.keys() == wo.keys() and all(torch.equal(ws[k], wo[k]) for k in ws)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(CHECKPOINT_FILE)) == []


def _checkpoint(out: Path) -> dict:
    from kdbench.train.checkpoint import CHECKPOINT_FILE

    return torch.load(out / CHECKPOINT_FILE, weights_only=True)


KILLED_SEARCH = """
import sys, time
from pathlib import Path
import kdbench.tasearch as ts
marker, where = Path(sys.argv[1]), sys.argv[2]

def wait():  # the checkpoint is on disk: wait to be killed
    marker.write_text(where)
    time.sleep(600)

if where == "training":  # after 2 steps of the second joint epoch
    lr_factor = ts.lr_factor
    ts.lr_factor = lambda p, step, spe: wait() if step == spe + 2 else lr_factor(p, step, spe)
else:  # candidate 0 saved, candidate 1 being evaluated
    save = ts.save_model_dir
    ts.save_model_dir = lambda out, *a, **k: wait() if out.name == "1" else save(out, *a, **k)
from kdbench.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _kill_when(marker: Path, where: str, args: list[str]) -> str:
    """Runs the search in a child that stops at ``where`` (its hook writes ``marker``), SIGKILLs it and returns its
    log."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", KILLED_SEARCH, str(marker), where, *args],
                             cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"the child never reached {where}"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        log = child.stderr.read().decode()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    marker.unlink()
    return log


def test_a_search_killed_in_training_then_between_candidates_resumes_to_the_uninterrupted_search(searched, tmp_path,
                                                                                               caplog):
    from kdbench.tasearch import run_search

    s, out = searched, tmp_path / "search"
    assert "resuming" not in _kill_when(tmp_path / "marker", "training", _search_args(s, out))
    state = _checkpoint(out)
    assert (state["epochs_done"], state["step"], state.get("rows")) == (1, STEPS, None)
    assert not (out / "candidates").exists()

    log = _kill_when(tmp_path / "marker", "candidates", _search_args(s, out))
    assert "t/amd/search: resuming after joint epoch 1/2 and 0 of 3 candidates" in log
    state = _checkpoint(out)
    assert (state["epochs_done"], state["step"]) == (2, 2 * STEPS)
    assert [r["index"] for r in state["rows"]] == [0] and (out / "candidates" / "0" / "metrics.json").exists()
    assert not (out / "candidates.json").exists()
    kept = (out / "candidates" / "0" / "metrics.json").stat().st_mtime_ns

    with caplog.at_level("INFO"):
        summary = run_search(s.cfg, "t", "amd", s.data, s.teacher, s.stores, out)
    assert "t/amd/search: resuming after joint epoch 2/2 and 1 of 3 candidates" in caplog.text
    assert (out / "candidates" / "0" / "metrics.json").stat().st_mtime_ns == kept  # skipped, not redone
    assert summary["joint"]["cache_bytes_read"] == s.summary["joint"]["cache_bytes_read"] > 0  # all runs counted
    _assert_same_search(s.search, out)


def test_sigusr1_in_training_then_after_a_candidate_exits_75_and_each_rerun_resumes(searched, monkeypatch, tmp_path):
    """The fast test of the resume logic: SIGUSR1 mid-way through the second joint epoch, then while candidate 0
    is saved; the third run completes the uninterrupted search without redoing candidate 0."""
    import os
    import signal

    from test_resume import fake_scontrol

    from kdbench import tasearch
    from kdbench.cli import main
    from kdbench.train.checkpoint import EXIT_PREEMPTED, stop_requested

    s, out = searched, tmp_path / "search"
    calls = fake_scontrol(monkeypatch, tmp_path)
    lr_factor, save, signalled, saved = tasearch.lr_factor, tasearch.save_model_dir, [], []

    def signal_once(where: str) -> None:
        if where not in signalled:
            signalled.append(where)
            os.kill(os.getpid(), signal.SIGUSR1)

    def lr_then_signal(p, step, spe):
        if step == STEPS + 2:  # the step is taken, then the search stops
            signal_once("training")
        return lr_factor(p, step, spe)

    def save_then_signal(cdir, *args, **kw):
        result = save(cdir, *args, **kw)
        saved.append(int(cdir.name))
        signal_once("candidates")
        return result

    monkeypatch.setattr(tasearch, "lr_factor", lr_then_signal)
    monkeypatch.setattr(tasearch, "save_model_dir", save_then_signal)
    handler = signal.getsignal(signal.SIGUSR1)
    assert main(_search_args(s, out)) == EXIT_PREEMPTED
    assert calls.read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is handler and not stop_requested()
    state = _checkpoint(out)
    assert (state["epochs_done"], state["step"], state.get("rows")) == (1, STEPS, None)
    assert not (out / "candidates").exists()

    assert main(_search_args(s, out)) == EXIT_PREEMPTED  # the requeued job
    state = _checkpoint(out)
    assert (state["epochs_done"], state["step"]) == (2, 2 * STEPS) and [r["index"] for r in state["rows"]] == [0]
    assert not (out / "candidates.json").exists() and not (out / "candidates" / "1").exists()
    kept = (out / "candidates" / "0" / "metrics.json").stat().st_mtime_ns

    assert main(_search_args(s, out)) == 0  # requeued again
    assert saved == [0, 1, 2] and (out / "candidates" / "0" / "metrics.json").stat().st_mtime_ns == kept
    assert calls.read_text().split() == ["requeue", "4242"] * 2
    _assert_same_search(s.search, out)


def test_a_checkpoint_of_another_search_is_not_resumed(searched, monkeypatch, tmp_path, caplog):
    """A search of another grid stopped in its second joint epoch leaves its checkpoint; the fixture's search in that
    directory deletes it with a warning (file, what differs) and gives the uninterrupted search."""
    from kdbench import tasearch
    from kdbench.config import load_config
    from kdbench.train import checkpoint as ckpt

    s, out = searched, tmp_path / "search"
    raw = yaml.safe_load(Path(s.cfg.source).read_text())
    raw["methods"]["amd"]["grid_step"] = 0.45
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(raw))
    other = load_config(tmp_path / "other.yaml")
    lr_factor = tasearch.lr_factor

    def stop_in_epoch_1(p, step, spe):
        if step == STEPS + 2:
            ckpt.request_stop()
        return lr_factor(p, step, spe)

    monkeypatch.setattr(tasearch, "lr_factor", stop_in_epoch_1)
    with ckpt.stop_on_signal(), pytest.raises(ckpt.Preempted, match=r"after 1 of 2 epochs.*checkpoint\.pt holds 1 ep"):
        tasearch.run_search(other, "t", "amd", s.data, s.teacher, s.stores, out)
    assert _checkpoint(out)["fingerprint"]["candidates"] != [c["name"] for c in s.summary["candidates"]]
    monkeypatch.undo()

    with caplog.at_level("WARNING"):
        tasearch.run_search(s.cfg, "t", "amd", s.data, s.teacher, s.stores, out)
    assert re.search(r"search/checkpoint\.pt: another job wrote it \(candidates: checkpoint \[.*\], this job \[.*\];"
                     r" config_hash: checkpoint '\w+', this job '\w+'\); deleted, the job starts over", caplog.text)
    _assert_same_search(s.search, out)
