"""Data-parallel jobs (``runtime.processes``, :mod:`kdbench.distributed`): one distill job in 2 processes under
torchrun on CPU (gloo) against the same job in 1 process.

The fast tests check the pieces (the split of a global batch and of an evaluation, the config keys, the hashes,
the refusals). The ``slow`` ones run ``kdbench distill`` under ``torchrun --nproc-per-node=2`` on a tiny
Fashion-MNIST slice (256 training images, batches of 64: 4 steps per epoch, 3 epochs) with a student without
BatchNorm (``vit_femto_patch7``: LayerNorm only, so a sample's gradient does not depend on the other samples of
its batch) and ``kd`` from a stored teacher: the 2-process run must see every training sample once per epoch,
each step's samples being the 1-process step's, and end with the 1-process run's weights and metrics up to
float rounding; it evaluates every image once; only rank 0 writes; a rank killed with SIGKILL mid-epoch ends
the job with an error naming it, and the rerun resumes from the last checkpoint to the uninterrupted record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _helpers_store import trained_world

from kdbench import distributed
from kdbench.config import Protocol, load_config
from kdbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
STEPS = 4  # steps per epoch: 256 images in batches of 64
EPOCHS = 3
#: Measured (this machine, torch 2.14 CPU): the 2-process run's weights differ from the 1-process run's by at
#: most ~1e-7 (float32 rounding of the gradient all-reduce); final metrics are equal. The bound leaves room.
WEIGHT_TOLERANCE = 1e-5


# --- the pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,size", [(64, 2), (64, 4), (7, 2), (5, 4), (1, 2)])
def test_the_parts_of_a_global_batch_are_disjoint_contiguous_and_cover_it(n, size):
    rows = np.sort(np.random.default_rng(n).choice(1000, n, replace=False))
    parts = [distributed.batch_part(rows, r, size) for r in range(size)]
    assert np.array_equal(np.concatenate(parts), rows)  # in rank order, the batch itself: no sample twice, none lost
    if n % size == 0:
        assert {len(p) for p in parts} == {n // size}


@pytest.mark.parametrize("n,size", [(128, 2), (127, 2), (10, 3), (1, 2), (0, 2)])
def test_evaluation_parts_cover_the_split_in_order_once(n, size):
    parts = [distributed.eval_part(n, r, size) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert sum(stop - start for start, stop in parts) == n


@pytest.mark.parametrize("n,size,align", [(128, 2, 50), (1000, 4, 64), (10, 3, 4), (50, 2, 50), (7, 2, 64)])
def test_aligned_parts_are_whole_batches_that_cover_the_split_in_order(n, size, align):
    """A cache job's parts: every process takes whole teacher batches (its forward sees the one-process batches),
    the parts in rank order are the split, and they are as even as whole batches allow."""
    parts = [distributed.eval_part(n, r, size, align=align) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert all(start % align == 0 for start, _ in parts)
    blocks = [-(-(stop - start) // align) for start, stop in parts]
    assert max(blocks) - min(blocks) <= 1


def test_gather_array_in_one_process_is_the_array():
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert distributed.gather_array(a) is a


def test_one_process_is_todays_job():
    assert distributed.world() == distributed.World(0, 1, 0, None) and distributed.is_writer()
    part = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(part) is part
    assert distributed.all_sum([1.5, 2.0]) == [1.5, 2.0] and distributed.any_rank(True)
    assert distributed.describe(64, True) == {"world_size": 1, "per_rank_batch": 64, "global_batch": 64,
                                              "backend": None, "sync_batchnorm": False}


#: ``Protocol().hash()`` before ``sync_batchnorm`` existed (commit 71d7bae): kdbench's hashes are published.
DEFAULT_PROTOCOL_HASH = "8b66e8fb2b82"


def test_sync_batchnorm_at_its_default_keeps_every_protocol_hash():
    from kdbench._util import to_jsonable
    from kdbench.plan import resolve_tables

    assert Protocol().hash() == Protocol(sync_batchnorm=False).hash() == DEFAULT_PROTOCOL_HASH
    assert Protocol(sync_batchnorm=True).hash() != DEFAULT_PROTOCOL_HASH
    for path in sorted((REPO / "workflow" / "config").glob("*.yaml")):
        for table in resolve_tables([path]):
            assert "sync_batchnorm" not in to_jsonable(table.cfg.protocol), path


def _raw(**over) -> dict:
    raw = {
        "name": "dp",
        "data": {"val_size": 128, "shard_size": 128, "train_limit": 256, "test_limit": 130},
        "protocol": {"epochs": EPOCHS, "batch_size": 64, "eval_batch_size": 50, "views": {"count": 2, "mixup": 0.5},
                     "lr": 0.01},
        "teachers": {"t": {"model": "cnn_xs", "train": {"epochs": 1, "batch_size": 64}}},
        "students": ["vit_femto_patch7"],
        "methods": {"baseline": {}, "kd": {}},
        "seeds": [0],
        "runtime": {"device": "cpu", "threads": 1},
    }
    raw.update(over)
    return raw


def test_a_global_batch_that_does_not_divide_into_the_processes_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(runtime={"device": "cpu", "processes": 3})))
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'protocol\.batch_size' \(64\).*3 processes"):
        load_config(path)
    path.write_text(yaml.safe_dump(_raw(runtime={"device": "cpu", "processes": 4})))
    assert load_config(path).runtime.processes == 4


def test_runtime_processes_must_be_a_positive_integer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(runtime={"processes": 0})))
    with pytest.raises(ConfigError, match="runtime.processes"):
        load_config(path)


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys):
    from kdbench.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["verify-teacher", "--config", "x.yaml", "--teacher", "t", "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "kdbench verify-teacher runs in one process" in err and "distill, trial, train-teacher" in err


def test_processes_makes_kdbench_start_torchrun_itself(monkeypatch):
    """``kdbench --processes 2 distill ...`` replaces itself by torchrun starting 2 of the same command (without
    ``--processes``, this Python's kdbench); 1 process runs the command in place."""
    from kdbench import cli

    started = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: started.append(argv) or sys.exit(0))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["distill", "--config", "c.yaml", "--teacher", "t", "--student", "s", "--method-label", "kd", "--seed",
            "3", "--data", "d", "--out", "o", "--threads", "2"]
    for flag in (["--processes", "2"], ["--processes=2"]):
        with pytest.raises(SystemExit):
            cli.main([*flag, *args])
        assert started.pop() == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                 "--nproc-per-node=2", "-m", "kdbench.cli", *args]
    # one process, or a process torchrun started: the command runs in place (here: fails on the missing config)
    assert cli.main(["--processes", "1", *args]) == 2 and not started
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["--processes", "2", *args]) == 2 and not started


@pytest.mark.parametrize("argv, message", [
    (["--processes", "2", "verify-teacher", "--config", "x.yaml", "--teacher", "t", "--data", "d", "--out", "o"],
     "verify-teacher runs in one process (--processes applies to distill, trial, train-teacher, cache"),
    (["--processes", "0", "train-teacher", "--config", "x.yaml", "--teacher", "t", "--data", "d", "--out", "o"],
     "--processes 0: give a positive number"),
])
def test_processes_is_refused_where_it_cannot_apply(monkeypatch, capsys, argv, message):
    from kdbench import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli.os, "execv", lambda *a: pytest.fail("started torchrun"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_processes_must_match_the_torchrun_that_started_the_command(monkeypatch, capsys):
    from kdbench import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["--processes", "4", "train-teacher", "--config", "x.yaml", "--teacher", "t", "--data", "d",
                     "--out", "o"]) == 2
    assert "under torchrun with 2 processes: drop --processes" in capsys.readouterr().err


def test_verify_states_its_tolerance_for_a_multi_process_record():
    from kdbench.verify import tolerance_reasons

    cpu = {"device": "cpu (x86_64)"}
    one = {**cpu, "parallel": distributed.describe(64, False)}
    two = {**cpu, "parallel": {**one["parallel"], "world_size": 2, "per_rank_batch": 32, "backend": "gloo"}}
    assert tolerance_reasons({"protocol": {}, "provenance": one}, one) == []  # today's verdict: bit for bit
    (reason,) = tolerance_reasons({"protocol": {}, "provenance": two}, one)
    assert "ran in 2 process(es) and the re-run in 1" in reason and "per process" in reason
    assert tolerance_reasons({"protocol": {}, "provenance": cpu}, one) == []  # a record from before the key


def test_the_global_batch_is_part_of_the_protocol_and_the_processes_are_not():
    """The leaderboard's tables are (dataset, protocol hash): runs with another global batch never share one,
    runs of the same global batch in any number of processes do."""
    assert Protocol(batch_size=128).hash() != Protocol(batch_size=256).hash()
    from kdbench._util import to_jsonable
    from kdbench.config import Runtime

    assert "processes" not in to_jsonable(Runtime(processes=1))  # (runtime is never hashed; default omitted)


def test_a_method_that_indexes_samples_is_refused_before_the_dag_in_a_data_parallel_table():
    from kdbench import preflight
    from kdbench.plan import Plan, resolve_tables

    tiny = REPO / "tests" / "configs" / "tiny.yaml"
    overrides = {"methods": {"crd": {"nce_k": 32}}, "runtime": {"processes": 2}}
    plan = Plan(resolve_tables([tiny], {"methods": {"crd": {"nce_k": 32}}}))
    preflight._check_processes(plan.tables["tiny"])  # one process: fine
    plan = Plan(resolve_tables([tiny], overrides))
    with pytest.raises(ConfigError, match=r"tiny\.yaml.*key 'runtime\.processes' \(2\): method 'crd' \(crd\) indexes"):
        preflight._check_processes(plan.tables["tiny"])


# --- 2 processes under torchrun -------------------------------------------------------------------------------

CHILD = """
import os, sys, json, signal, time
from pathlib import Path
rank = int(os.environ.get("RANK", "0"))
log, kill_at, out_dir = Path(sys.argv[1]), int(sys.argv[2]), os.path.realpath(sys.argv[3]) + os.sep
writes = []
def audit(event, args):  # every file this process opens for writing under the run directory
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[1] is not None:
        mode = args[1] if isinstance(args[1], str) else ""
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        path = os.path.realpath(os.fsdecode(args[0]))
        if writing and path.startswith(out_dir):
            writes.append(path)
    elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir") and os.path.realpath(
            os.fsdecode(args[0])).startswith(out_dir):
        writes.append(event + " " + os.fsdecode(args[0]))
sys.addaudithook(audit)
from kdbench.train.loop import _Run
orig = _Run.train_step
rows = []
def step(self, epoch, view, batch):
    out = orig(self, epoch, view, batch)
    rows.append({"epoch": epoch, "step": self.step - 1, "rows": batch.rows.tolist(), "total": batch.global_rows})
    if self.step == kill_at and rank == 1:  # mid-epoch 1: the checkpoint of epoch 0 is on disk
        with open(f"{log}.rank{rank}.json", "w") as f:
            json.dump({"rows": rows, "writes": writes}, f)
        os.kill(os.getpid(), signal.SIGKILL)
    return out
_Run.train_step = step
from kdbench.cli import main
try:
    code = main(sys.argv[4:])
finally:
    with open(f"{log}.rank{rank}.json", "w") as f:
        json.dump({"rows": rows, "writes": writes}, f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (FMNIST / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("dp")
    cfg_path, _, data, teacher, stores = trained_world(root, _raw())
    store = stores["logits"]
    (root / "child.py").write_text(CHILD)
    return cfg_path, data, teacher, store, root


def _distill_args(setup, out: Path, label: str = "kd") -> list[str]:
    cfg_path, data, teacher, store, _root = setup
    args = ["distill", "--config", str(cfg_path), "--teacher", "t", "--student", "vit_femto_patch7", "--method-label",
            label, "--seed", "0", "--data", str(data), "--out", str(out)]
    return args + (["--teacher-dir", str(teacher), "--store", str(store)] if label == "kd" else [])


def _run(setup, out: Path, processes: int, kill_at: int = 0, label: str = "kd",
         args: list[str] | None = None) -> subprocess.CompletedProcess:
    """``kdbench distill`` (through the child script; ``args``: these arguments instead of the setup's) in
    ``processes`` processes; the per-rank logs land beside ``out`` as ``<out>.log.rank<r>.json``."""
    root = setup[-1]
    args = _distill_args(setup, out, label) if args is None else args
    child = [str(root / "child.py"), f"{out}.log", str(kill_at), str(out), *args]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*launch, *child], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _log(out: Path, rank: int) -> dict:
    return json.loads(Path(f"{out}.log.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(setup):
    """The same ``kd`` job in 1 and in 2 processes, run once each."""
    root = setup[-1]
    done = {}
    for n in (1, 2):
        out = root / f"p{n}"
        t0 = time.perf_counter()
        proc = _run(setup, out, n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done[n] = out
        print(f"{n} process(es): {time.perf_counter() - t0:.1f} s")
    return done


def _by_epoch(steps: list[dict]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for s in steps:
        out.setdefault(s["epoch"], []).extend(s["rows"])
    return out


@pytest.mark.slow
def test_two_processes_see_the_one_process_samples_each_step_split_between_them(runs):
    one = _log(runs[1], 0)["rows"]
    ranks = [_log(runs[2], r)["rows"] for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == EPOCHS * STEPS
    for s1, s_a, s_b in zip(one, *ranks):
        assert s1["step"] == s_a["step"] == s_b["step"]
        assert set(s_a["rows"]).isdisjoint(s_b["rows"]) and len(s_a["rows"]) == len(s_b["rows"]) == 32
        assert sorted(s_a["rows"] + s_b["rows"]) == s1["rows"]  # the step's global batch is the 1-process batch
        assert s_a["total"] == s_b["total"] == 64
    for epoch, rows in _by_epoch(one).items():
        two = _by_epoch(ranks[0])[epoch] + _by_epoch(ranks[1])[epoch]
        assert sorted(two) == sorted(rows) == list(range(256))  # every training sample exactly once per epoch


@pytest.mark.slow
def test_two_processes_end_with_the_one_process_weights_and_metrics(runs):
    w1 = torch.load(runs[1] / "model.pt", weights_only=True)
    w2 = torch.load(runs[2] / "model.pt", weights_only=True)
    diff = max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1)
    print(f"max |weight difference| after {EPOCHS * STEPS} steps: {diff:.3g}")
    assert diff < WEIGHT_TOLERANCE
    r1, r2 = (json.loads((runs[n] / "record.json").read_text()) for n in (1, 2))
    for key in ("test_top1", "test_top5", "val_top1", "teacher_agreement"):
        assert r2["final"][key] == pytest.approx(r1["final"][key], abs=1e-9), key
    e1, e2 = ([json.loads(line) for line in (runs[n] / "epochs.jsonl").read_text().splitlines()] for n in (1, 2))
    assert [e["val_top1"] for e in e2] == [e["val_top1"] for e in e1]
    assert [e["train_loss"] for e in e2] == pytest.approx([e["train_loss"] for e in e1], rel=1e-5)
    for key in ("student_forward", "teacher_forward", "cache_bytes_read"):
        assert r2["cost"][key] == r1["cost"][key], key  # counted over both processes
    assert r1["cost"]["student_forward"] == EPOCHS * 256
    assert r1["protocol_hash"] == r2["protocol_hash"]


@pytest.mark.slow
def test_the_record_states_the_processes_and_evaluation_counts_every_image_once(runs):
    r1, r2 = (json.loads((runs[n] / "record.json").read_text()) for n in (1, 2))
    assert r1["provenance"]["parallel"] == {"world_size": 1, "per_rank_batch": 64, "global_batch": 64,
                                            "backend": None, "sync_batchnorm": False}
    assert r2["provenance"]["parallel"] == {"world_size": 2, "per_rank_batch": 32, "global_batch": 64,
                                            "backend": "gloo", "sync_batchnorm": False}
    # 130 test images over 2 processes (65 each, in batches of 50): every prediction once, in order
    p1, p2 = (np.load(runs[n] / "predictions.npy") for n in (1, 2))
    assert len(p2) == 130 and np.array_equal(p1, p2)
    assert json.loads((runs[2] / "metrics.json").read_text())["test_top1"] == r2["final"]["test_top1"]


@pytest.mark.slow
def test_only_rank_0_writes(runs):
    assert _log(runs[2], 1)["writes"] == []
    assert _log(runs[2], 0)["writes"]  # (the audit sees rank 0's writes: it would see rank 1's)
    assert sorted(p.name for p in runs[2].iterdir()) == sorted(p.name for p in runs[1].iterdir())


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_ends_the_job_naming_it_and_the_rerun_resumes(setup, runs):
    import re
    import shutil

    from kdbench.verify import compare_runs

    root = setup[-1]
    out = root / "killed"
    proc = _run(setup, out, 2, kill_at=STEPS + 2)  # rank 1 kills itself (SIGKILL) at step 2 of epoch 1
    assert proc.returncode != 0
    # torchrun ends the job (rank 0 is stopped) and names the rank that died first
    cause = proc.stderr.partition("Root Cause")[2]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", cause) and "SIGKILL" in cause, proc.stderr[-2000:]
    assert not (out / "record.json").exists() and not (out / "model.pt").exists()  # nothing half-written
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epochs_done"] == 1
    other_n = root / "killed_then_1"
    shutil.copytree(out, other_n)

    proc = _run(setup, out, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert compare_runs(runs[2], out) == []  # the uninterrupted 2-process record, bit for bit
    rec = json.loads((out / "record.json").read_text())
    assert rec["provenance"]["resumed_at_epochs"] == [1] and not (out / "checkpoint.pt").exists()

    # a checkpoint written by 2 processes resumes in 1: the same global batches, up to float rounding
    proc = _run(setup, other_n, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in proc.stderr
    w2 = torch.load(runs[2] / "model.pt", weights_only=True)
    w = torch.load(other_n / "model.pt", weights_only=True)
    assert max((w2[k].double() - w[k].double()).abs().max().item() for k in w2) < WEIGHT_TOLERANCE
    assert compare_runs(runs[2], other_n, tolerance=1e-4) == []  # every epoch, final metrics and counters
    r = json.loads((other_n / "record.json").read_text())
    assert r["final"]["test_top1"] == rec["final"]["test_top1"]
    assert r["provenance"]["parallel"]["world_size"] == 1 and r["cost"]["student_forward"] == EPOCHS * 256


@pytest.mark.slow
def test_streamed_data_two_processes_take_their_slices_of_the_one_process_stream(setup, tmp_path):
    """An image folder (images of many sizes: streamed, ``kdbench.data.stream``) in 2 processes: each step's
    samples are the 1-process step's, split between the processes, and the result is the same."""
    from test_imagefolder import TINY as TINY_FOLDER
    from test_imagefolder import make_folder

    from kdbench.data.prepare import prepare

    raw = yaml.safe_load(TINY_FOLDER.read_text())
    raw["data"].update(root=str(make_folder(tmp_path / "images")), workers=1)
    raw.update(students=["vit_pico_patch4"], protocol={**raw["protocol"], "epochs": 2, "lr": 0.01})
    cfg_path = tmp_path / "folder.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    data = tmp_path / "data"
    prepare(cfg.data, data)
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        args = ["distill", "--config", str(cfg_path), "--teacher", "cnn_s", "--student", "vit_pico_patch4",
                "--method-label", "baseline", "--seed", "0", "--data", str(data), "--out", str(out)]
        proc = _run(setup, out, n, args=args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n] = out
    one = _log(outs[1], 0)["rows"]
    ranks = [_log(outs[2], r)["rows"] for r in (0, 1)]
    assert one and len(one) == len(ranks[0]) == len(ranks[1])
    for s1, s_a, s_b in zip(one, *ranks):
        assert set(s_a["rows"]).isdisjoint(s_b["rows"]) and sorted(s_a["rows"] + s_b["rows"]) == sorted(s1["rows"])
    for epoch, rows in _by_epoch(one).items():
        assert sorted(_by_epoch(ranks[0])[epoch] + _by_epoch(ranks[1])[epoch]) == sorted(rows) == list(range(30))
    w1, w2 = (torch.load(outs[n] / "model.pt", weights_only=True) for n in (1, 2))
    assert max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1) < WEIGHT_TOLERANCE
    r1, r2 = (json.loads((outs[n] / "record.json").read_text()) for n in (1, 2))
    assert r2["final"]["test_top1"] == r1["final"]["test_top1"] and r2["cost"] | TIMES == r1["cost"] | TIMES
    assert len(np.load(outs[2] / "predictions.npy")) == 6


TIMES = {"wall_time_s": 0, "train_time_s": 0}


def _h5(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {"attrs": {k: f.attrs[k] for k in f.attrs}, **{k: f[k][()] for k in f}}


@pytest.mark.slow
def test_a_store_built_in_two_processes_is_the_one_process_store(setup):
    """Each shard in 2 processes (whole teacher batches each: 50 + 78 of 128 rows, mixup partners across the
    boundary), gathered and written by rank 0 alone: the one-process shard's every array and attribute, bit for
    bit, and a store that check-cache passes."""
    import h5py  # noqa: F401

    cfg_path, data, teacher, store, root = setup
    out = root / "cache_p2" / "logits"  # a store's directory names its tap
    for shard in (0, 1):
        args = ["cache", "--config", str(cfg_path), "--teacher-dir", str(teacher), "--data", str(data),
                "--store", str(out), "--shard", str(shard)]
        proc = _run(setup, out, 2, args=args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _log(out, 1)["writes"] == []  # rank 1 computed its half and wrote nothing
        one, two = _h5(store / f"shard-{shard:05d}.h5"), _h5(out / f"shard-{shard:05d}.h5")
        assert one.keys() == two.keys() and str(one["attrs"]) == str(two["attrs"])
        for key in one.keys() - {"attrs"}:
            assert one[key].dtype == two[key].dtype and np.array_equal(one[key], two[key]), key
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    common = ["--config", str(cfg_path), "--teacher-dir", str(teacher), "--data", str(data), "--store", str(out)]
    for command in ("cache-manifest", "check-cache"):
        proc = subprocess.run([sys.executable, "-m", "kdbench.cli", command, *common], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_teacher_trains_in_two_processes_as_in_one(setup, tmp_path):
    cfg_path, data = setup[0], setup[1]
    raw = _raw(teachers={"t": {"model": "vit_femto_patch7", "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}}})
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(raw))
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"t{n}"
        args = ["train-teacher", "--config", str(config), "--teacher", "t", "--data", str(data), "--out", str(out)]
        proc = _run(setup, out, n, args=args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n] = out
    w1, w2 = (torch.load(outs[n] / "model.pt", weights_only=True) for n in (1, 2))
    assert max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1) < WEIGHT_TOLERANCE
    m1, m2 = (json.loads((outs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert m2["test_top1"] == m1["test_top1"] and "parallel" not in m1
    assert m2["parallel"] == {"world_size": 2, "per_rank_batch": 32, "global_batch": 64, "backend": "gloo",
                              "sync_batchnorm": False}
    assert _log(outs[2], 1)["writes"] == [] and sorted(os.listdir(outs[2])) == sorted(os.listdir(outs[1]))


# --- the workflow: torchrun and the SLURM request ---------------------------------------------------------------


def test_the_gpu_request_of_one_and_of_n_processes():
    from kdbench.resources import gpu_request

    # one process: today's request (the profile's KDBENCH_GRES), whatever the GPU
    assert gpu_request(1, 3, "gpu:1") == {"gres": "gpu:1", "gpu": 0, "gpu_model": "", "cpus_per_gpu": 3}
    assert gpu_request(1, 3, "")["gres"] == ""
    # N processes: N GPUs of KDBENCH_GRES's type and CPUs per GPU, no gres (the plugin refuses gres with gpu)
    assert gpu_request(4, 3, "gpu:a100:1") == {"gres": "", "gpu": 4, "gpu_model": "a100", "cpus_per_gpu": 3}
    assert gpu_request(2, 1, "gpu:1") == {"gres": "", "gpu": 2, "gpu_model": "", "cpus_per_gpu": 1}
    assert gpu_request(2, 1, "")["gpu"] == 0  # no GPU asked for: a CPU job (the rule's threads)


@pytest.mark.slow
def test_a_data_parallel_table_runs_distill_under_torchrun_and_asks_slurm_for_its_gpus(tmp_path):
    """``snakemake -n -p`` with the SLURM profile: a table with ``runtime.processes: 2`` launches distill and the
    teacher's training and the cache jobs with torchrun and asks for 2 GPUs and CPUs per GPU, never tasks."""
    from test_workflow import ENV, TINY

    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"), "--configfile",
           str(TINY), "--config", "runtime={processes: 2, device: cpu}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, "KDBENCH_GRES": "gpu:v100:1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    blocks = {}
    for block in out.stdout.split("\nrule ")[1:]:
        blocks.setdefault(block.split(":", 1)[0], block)
    distill = blocks["distill"]
    resources = next(ln for ln in distill.splitlines() if ln.strip().startswith("resources:"))
    assert "gpu=2" in resources and "gpu_model=v100" in resources and "cpus_per_gpu=1" in resources
    assert "gres=," in resources and "tasks" not in resources
    assert "kdbench --processes 2 distill" in distill  # kdbench starts torchrun itself
    assert "--threads 1 " in distill  # per process
    teacher = blocks["train_teacher"]  # a trained teacher: 2 processes too (2 CPUs each)
    assert "kdbench --processes 2 train-teacher" in teacher
    assert "gpu=2" in teacher and "cpus_per_gpu=2" in teacher
    cache = next(ln for ln in blocks["cache_shard"].splitlines() if ln.strip().startswith("resources:"))
    assert "gpu=2" in cache and "gres=," in cache  # a shard's teacher batches split over 2 GPUs
    assert "kdbench --processes 2 cache" in blocks["cache_shard"]
