"""Preemption-safe training: epoch checkpoints, resuming a killed job to the uninterrupted record, SIGUSR1.

A tiny Fashion-MNIST slice (256 training images, 4 steps per epoch, 3 epochs), a 1-epoch ``cnn_xs`` teacher and
stores of its logits and pre_logits: ``kd`` from the logits store and ``crd`` (memory banks, adapters) from
both stores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers_store import trained_world

from kdbench.cli import main
from kdbench.distill import run_distill
from kdbench.methods.base import DistillMethod
from kdbench.teacher import train_teacher
from kdbench.train import checkpoint as ckpt
from kdbench.train.checkpoint import CHECKPOINT_FILE, EXIT_PREEMPTED, Preempted
from kdbench.train.loop import _Run
from kdbench.verify import compare_runs

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
STEPS = 4  # steps per epoch: 256 images in batches of 64


def tiny_raw(**over) -> dict:
    raw = {
        "name": "resume",
        "data": {"val_size": 128, "shard_size": 128, "train_limit": 256, "test_limit": 128},
        "protocol": {"epochs": 3, "batch_size": 64, "eval_batch_size": 128, "views": {"count": 2, "mixup": 0.5}},
        "teachers": {"t": {"model": "cnn_xs", "train": {"epochs": 2, "batch_size": 64}}},
        "students": ["cnn_xs"],
        "methods": {"baseline": {}, "kd": {}, "crd": {"nce_k": 32, "feat_dim": 16}},
        "seeds": [0, 1],
        "runtime": {"device": "cpu", "threads": 1},
    }
    raw.update(over)
    return raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (FMNIST / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("resume")
    _, cfg, data, teacher, stores = trained_world(root, tiny_raw(), ("logits", "pre_logits"))
    return cfg, data, teacher, stores, root


def _inputs(setup, label):
    _cfg, _data, teacher, stores, _root = setup
    if label == "baseline":
        return None, {}
    return teacher, {tap: stores[tap] for tap in (("logits",) if label == "kd" else ("logits", "pre_logits"))}


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run of a label (seed 0), run once."""
    cfg, data, _teacher, _stores, root = setup
    done = {}

    def get(label: str) -> Path:
        if label not in done:
            out = root / f"ref_{label}"
            run_distill(cfg, "t", "cnn_xs", label, 0, data, *_inputs(setup, label), out)
            assert not (out / CHECKPOINT_FILE).exists()  # removed once the record is written
            done[label] = out
        return done[label]

    return get


def _stop_in_epoch_1(monkeypatch, action) -> None:
    """Calls ``action()`` once, after the second step of the second epoch."""
    orig = _Run.train_step
    fired = []

    def step(self, epoch, view, rows):
        out = orig(self, epoch, view, rows)
        if self.step == STEPS + 2 and not fired:
            fired.append(True)
            action()
        return out

    monkeypatch.setattr(_Run, "train_step", step)


def _epochs_done(run_dir: Path) -> int:
    return torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["epochs_done"]


KILLED_CHILD = """
import sys, time
from pathlib import Path
from kdbench.train.loop import _Run
orig = _Run.train_step
def step(self, epoch, view, rows):
    out = orig(self, epoch, view, rows)
    if self.step == {steps} + 2:  # mid-epoch 1: the checkpoint of epoch 0 is on disk; wait to be killed
        Path(sys.argv[1]).write_text("mid-epoch")
        time.sleep(600)
    return out
_Run.train_step = step
from kdbench.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("label", ["kd", "crd"])
def test_a_job_killed_mid_epoch_resumes_to_the_uninterrupted_record(setup, reference, label):
    cfg, data, _teacher, _stores, root = setup
    out = root / f"killed_{label}"
    marker = root / f"killed_{label}.mid"
    teacher_dir, used = _inputs(setup, label)
    args = ["distill", "--config", cfg.source, "--teacher", "t", "--student", "cnn_xs", "--method-label", label,
            "--seed", "0", "--data", str(data), "--teacher-dir", str(teacher_dir), "--out", str(out)]
    for store in used.values():
        args += ["--store", str(store)]
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD.format(steps=STEPS), str(marker), *args],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached epoch 1"
            time.sleep(0.05)
        assert _epochs_done(out) == 1
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL and not (out / "record.json").exists()
    (out / f"{CHECKPOINT_FILE}.tmp-99999").write_bytes(b"half a checkpoint")  # what a kill during a save leaves

    record = run_distill(cfg, "t", "cnn_xs", label, 0, data, teacher_dir, used, out)
    ref = reference(label)
    assert compare_runs(ref, out) == []  # final metrics, cost counters, every epoch, the weights' sha256
    full = json.loads((ref / "record.json").read_text())
    assert record.cost.teacher_forward == full["cost"]["teacher_forward"] == 0
    assert record.cost.cache_bytes_read == full["cost"]["cache_bytes_read"] > 0
    assert record.cost.student_forward == full["cost"]["student_forward"] == 3 * 256
    assert record.provenance["resumed_at_epochs"] == [1] and "resumed_at_epochs" not in full["provenance"]
    assert len((out / "epochs.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(CHECKPOINT_FILE)) == []


def fake_scontrol(monkeypatch, tmp_path: Path) -> Path:
    """Runs the test inside SLURM job 4242 with an ``scontrol`` that appends its arguments to the file returned."""
    calls = tmp_path / "scontrol.calls"
    _scontrol(monkeypatch, tmp_path, f'echo "$@" >> {calls}')
    return calls


def test_sigusr1_checkpoints_exits_75_and_requeues_then_the_rerun_completes(setup, reference, monkeypatch, tmp_path):
    cfg, data, teacher, stores, _root = setup
    out = tmp_path / "run"
    calls = fake_scontrol(monkeypatch, tmp_path)
    args = ["distill", "--config", cfg.source, "--teacher", "t", "--student", "cnn_xs", "--method-label", "kd",
            "--seed", "0", "--data", str(data), "--teacher-dir", str(teacher), "--store", str(stores["logits"]),
            "--out", str(out)]
    handler = signal.getsignal(signal.SIGUSR1)
    _stop_in_epoch_1(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    assert main(args) == EXIT_PREEMPTED
    assert calls.read_text().split() == ["requeue", "4242"]
    assert _epochs_done(out) == 1 and not (out / "record.json").exists()
    assert len((out / "epochs.jsonl").read_text().splitlines()) == 1
    assert signal.getsignal(signal.SIGUSR1) is handler and not ckpt.stop_requested()

    assert main(args) == 0  # the requeued job (the patch fires only once)
    assert compare_runs(reference("kd"), out) == []
    assert not (out / CHECKPOINT_FILE).exists() and calls.read_text().split() == ["requeue", "4242"]


def test_a_run_stopped_before_it_saved_a_new_epoch_is_not_requeued(setup, monkeypatch, tmp_path, caplog):
    """An epoch longer than the time the signal leaves would requeue forever: the second stop, in the same epoch as
    the first, exits 75 without a requeue (Snakemake's retry then resubmits the job with twice the time)."""
    cfg, data, _teacher, _stores, _root = setup
    out = tmp_path / "run"
    calls = fake_scontrol(monkeypatch, tmp_path)
    args = ["distill", "--config", cfg.source, "--teacher", "t", "--student", "cnn_xs", "--method-label",
            "baseline", "--seed", "0", "--data", str(data), "--out", str(out)]
    _stop_in_epoch_1(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    assert main(args) == EXIT_PREEMPTED and calls.read_text().split() == ["requeue", "4242"]
    _stop_in_epoch_1(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGUSR1))  # resumed at epoch 1: stops in it
    assert main(args) == EXIT_PREEMPTED
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue
    assert _epochs_done(out) == 1 and "not requeued: this run saved no new epoch" in caplog.text


def test_a_stop_at_the_end_of_an_epoch_checkpoints_that_epoch(setup, monkeypatch, tmp_path):
    cfg, data, _teacher, _stores, _root = setup
    orig = _Run.evaluate

    def evaluate(self, row, evals):  # the signal arrives while epoch 0 is evaluated
        orig(self, row, evals)
        if row["epoch"] == 0:
            ckpt.request_stop()

    monkeypatch.setattr(_Run, "evaluate", evaluate)
    with ckpt.stop_on_signal(), pytest.raises(Preempted, match=r"after 1 of 3 epochs.*checkpoint\.pt holds 1 epoch"):
        run_distill(cfg, "t", "cnn_xs", "baseline", 0, data, None, {}, tmp_path / "run", checkpoint_every=2)
    assert _epochs_done(tmp_path / "run") == 1


def test_without_checkpoints_a_stopped_job_says_it_starts_over(setup, monkeypatch, tmp_path):
    cfg, data, _teacher, _stores, _root = setup
    _stop_in_epoch_1(monkeypatch, ckpt.request_stop)
    with ckpt.stop_on_signal(), pytest.raises(Preempted, match="after 1 of 3 epochs.*no checkpoint holds any of it"):
        run_distill(cfg, "t", "cnn_xs", "baseline", 0, data, None, {}, tmp_path / "run", checkpoint_every=0)
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_a_checkpoint_of_another_job_is_deleted_with_a_warning_and_the_job_starts_over(setup, monkeypatch, tmp_path,
                                                                                       caplog):
    cfg, data, _teacher, _stores, _root = setup
    out = tmp_path / "run"
    _stop_in_epoch_1(monkeypatch, ckpt.request_stop)
    with ckpt.stop_on_signal(), pytest.raises(Preempted):
        run_distill(cfg, "t", "cnn_xs", "baseline", 0, data, None, {}, out)
    monkeypatch.undo()
    assert (out / CHECKPOINT_FILE).exists()
    fresh = run_distill(cfg, "t", "cnn_xs", "baseline", 1, data, None, {}, tmp_path / "fresh")
    with caplog.at_level("WARNING"):
        record = run_distill(cfg, "t", "cnn_xs", "baseline", 1, data, None, {}, out)  # seed 1 in seed 0's folder
    assert re.search(r"run/checkpoint\.pt: another job wrote it \(seed: checkpoint 0, this job 1\); deleted, the job"
                     r" starts over", caplog.text)
    assert record.final == fresh.final and not (out / CHECKPOINT_FILE).exists()  # a whole run, not a resumed one
    caplog.clear()
    (out / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING"):
        assert run_distill(cfg, "t", "cnn_xs", "baseline", 1, data, None, {}, out).final == fresh.final
    assert "checkpoint.pt: it cannot be read" in caplog.text


def test_teacher_training_resumes_to_the_same_teacher(setup, monkeypatch, tmp_path):
    cfg, data, teacher, _stores, _root = setup
    _stop_in_epoch_1(monkeypatch, ckpt.request_stop)
    with ckpt.stop_on_signal(), pytest.raises(Preempted, match="teacher t: stopped on request after 1 of 2 epochs"):
        train_teacher(cfg, "t", data, tmp_path / "t")
    assert _epochs_done(tmp_path / "t") == 1 and not (tmp_path / "t" / "metrics.json").exists()
    resumed = train_teacher(cfg, "t", data, tmp_path / "t")
    assert resumed["sha256"] == json.loads((teacher / "metrics.json").read_text())["sha256"]
    assert not (tmp_path / "t" / CHECKPOINT_FILE).exists()


def test_method_counters_are_checkpoint_state_by_default():
    class Counting(DistillMethod):
        name, Config, reference = "counting", object, ""

        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.samples, self.scale, self._private, self.flag = 0, 1.0, 5, True
            self.bank = torch.nn.Parameter(torch.zeros(2))

    m = Counting()
    m.samples, m.scale = 7, 0.5
    state = m.checkpoint_state()
    assert state == {"samples": 7, "scale": 0.5}  # not private names, bools (``training``) or tensors
    fresh = Counting()
    fresh.load_checkpoint_state(state)
    assert (fresh.samples, fresh.scale) == (7, 0.5)


def test_scalekd_tail_counter_is_restored():
    from kdbench.meta import DataInfo
    from kdbench.methods.base import create_method
    from kdbench.models import create_model, model_info

    data = DataInfo(num_classes=10, in_chans=1, image_size=28, num_train=64, mean=(0.5,), std=(0.5,))
    infos = [model_info(create_model(n, 10, 1, 28), n, 1, 28) for n in ("cnn_m", "cnn_xs")]
    method, fresh = (create_method("scalekd", {}, teacher=infos[0], student=infos[1], data=data) for _ in range(2))
    method.tail_forward = 96
    fresh.load_checkpoint_state(method.checkpoint_state())
    assert fresh.tail_forward == 96


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# --- requeue(): scontrol's answer, one case at a time ----------------------------------------------------------------


def _scontrol(monkeypatch, tmp_path: Path, body: str, job: str | None = "4242") -> Path:
    """An ``scontrol`` on PATH running ``body`` (sh), inside SLURM job ``job`` (``None``: outside SLURM)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    return bin_dir


def test_requeue_asks_scontrol_to_requeue_this_job_and_says_so(monkeypatch, tmp_path, caplog):
    calls = tmp_path / "calls"
    _scontrol(monkeypatch, tmp_path, f'echo "$@" >> {calls}; echo chatter; echo noise >&2', job="977")
    with caplog.at_level("INFO", logger="kdbench.train.checkpoint"):
        assert ckpt.requeue() is True
    assert calls.read_text() == "requeue 977\n"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", "SLURM job 977 requeued")]


def test_a_failed_requeue_returns_false_and_warns_with_scontrols_message(monkeypatch, tmp_path, caplog, capfd):
    _scontrol(monkeypatch, tmp_path, 'echo "  scontrol: error: Invalid job id specified  " >&2; exit 1', job="55")
    with caplog.at_level("INFO", logger="kdbench.train.checkpoint"):
        assert ckpt.requeue() is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "scontrol requeue 55 failed: scontrol: error: Invalid job id specified")]
    assert capfd.readouterr() == ("", "")  # scontrol's output is captured, not left on the job's log


def test_requeue_outside_slurm_or_without_scontrol_does_nothing(monkeypatch, tmp_path, caplog):
    calls = tmp_path / "calls"
    _scontrol(monkeypatch, tmp_path, f'echo "$@" >> {calls}', job=None)
    with caplog.at_level("INFO", logger="kdbench.train.checkpoint"):
        assert ckpt.requeue() is False
    monkeypatch.setenv("SLURM_JOB_ID", "")
    assert ckpt.requeue() is False
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ckpt.requeue() is False
    assert not calls.exists() and caplog.records == []


def test_requeue_gives_up_when_scontrol_does_not_answer(monkeypatch, tmp_path, caplog):
    """A controller that hangs must not hold the preempted job past its limit: no requeue, a warning, False."""
    _scontrol(monkeypatch, tmp_path, "exec sleep 20", job="31")
    monkeypatch.setattr(ckpt, "REQUEUE_TIMEOUT_S", 0.3)
    with caplog.at_level("INFO", logger="kdbench.train.checkpoint"):
        assert ckpt.requeue() is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "scontrol requeue 31 did not answer in 0.3 s; the job is not requeued")]


# --- the stop message, the schedule, the RNG state on a CUDA machine ---------------------------------------------


@pytest.mark.parametrize(("kept", "first", "progressed"), [(None, 0, False), (2, 2, False), (3, 2, True), (1, 0, True)])
def test_a_stop_says_what_is_on_disk_and_whether_the_run_progressed(tmp_path, kept, first, progressed):
    checkpoint = ckpt.Checkpointing(tmp_path / CHECKPOINT_FILE, {})
    stop = ckpt.stopped("kd/s0", 2, 5, checkpoint, kept, first)
    where = (f"{tmp_path / CHECKPOINT_FILE} holds {kept} epoch(s); run the job again to resume" if kept is not None
             else "no checkpoint holds any of it; run the job again to start over")
    assert str(stop) == (f"kd/s0: stopped on request after 2 of 5 epochs (steps of an unfinished epoch are lost);"
                         f" {where}")
    assert stop.progressed is progressed
    none = ckpt.stopped("kd/s0", 2, 5, None, kept, first)  # checkpoints off: nothing on disk whatever ``kept``
    assert str(none).endswith("no checkpoint holds any of it; run the job again to start over")


def test_a_stop_outside_the_epoch_loop_counts_as_progress():
    """AMD's search stops between its candidates after the joint training (kept on disk) without a count."""
    assert Preempted("search stopped").progressed is True
    assert Preempted("x", progressed=False).progressed is False


def test_a_checkpoint_is_due_every_n_epochs_after_the_last_and_at_a_stop():
    every2 = ckpt.Checkpointing(Path("c.pt"), {}, every=2)
    assert [e for e in range(1, 8) if every2.due(e, 7)] == [2, 4, 6, 7]
    assert [e for e in range(1, 8) if ckpt.Checkpointing(Path("c.pt"), {}, every=0).due(e, 7)] == []
    with ckpt.stop_on_signal():
        ckpt.request_stop()
        assert every2.due(3, 7) and not ckpt.Checkpointing(Path("c.pt"), {}, every=0).due(3, 7)


def _fake_cuda(monkeypatch, initialised: bool) -> list:
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7, 8], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    return restored


def test_the_cuda_rng_state_is_saved_once_cuda_is_initialised_and_restored_where_cuda_is(monkeypatch):
    restored = _fake_cuda(monkeypatch, initialised=False)
    assert "cuda" not in ckpt.rng_state()  # reading it would initialise CUDA in a CPU-only job
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"][0], torch.tensor([7, 8], dtype=torch.uint8))
    ckpt.set_rng_state(state)
    assert len(restored) == 1 and restored[0] is state["cuda"]
    ckpt.set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # written on a CPU: nothing to restore
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt.set_rng_state(state)  # written on a GPU, resumed on a CPU
    assert len(restored) == 1


# --- load(): which files are this job's progress, and what the warning says ------------------------------------


FINGERPRINT = {"method": "kd", "seed": 0, "teacher": "t"}


def _load(tmp_path: Path, caplog, fingerprint=FINGERPRINT) -> tuple[dict | None, list[str]]:
    checkpoint = ckpt.Checkpointing(tmp_path / CHECKPOINT_FILE, fingerprint)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kdbench.train.checkpoint"):
        state = checkpoint.load()
    return state, [r.getMessage() for r in caplog.records]


def _deleted(tmp_path: Path, why: str) -> list[str]:
    return [f"{tmp_path / CHECKPOINT_FILE}: {why}; deleted, the job starts over"]


def test_load_returns_this_jobs_checkpoint_and_nothing_without_one(tmp_path, caplog):
    assert _load(tmp_path, caplog) == (None, [])
    ckpt.Checkpointing(tmp_path / CHECKPOINT_FILE, FINGERPRINT).save({"epochs_done": 2, "w": torch.ones(2)})
    state, warnings = _load(tmp_path, caplog)
    assert warnings == [] and state["epochs_done"] == 2 and torch.equal(state["w"], torch.ones(2))
    assert state["format"] == ckpt.FORMAT_VERSION and state["fingerprint"] == FINGERPRINT


def test_a_checkpoint_of_another_job_names_every_difference(tmp_path, caplog):
    ckpt.Checkpointing(tmp_path / CHECKPOINT_FILE, {**FINGERPRINT, "student": "cnn_xs"}).save({})
    state, warnings = _load(tmp_path, caplog, {**FINGERPRINT, "seed": 1, "protocol": "ab12"})
    assert state is None and not (tmp_path / CHECKPOINT_FILE).exists()
    assert warnings == _deleted(tmp_path, "another job wrote it (protocol: checkpoint None, this job 'ab12'; seed:"
                                          " checkpoint 0, this job 1; student: checkpoint 'cnn_xs', this job None)")


@pytest.mark.parametrize("content", [["a", "list"], {"format": ckpt.FORMAT_VERSION + 1, "fingerprint": FINGERPRINT},
                                     {"fingerprint": FINGERPRINT}])
def test_a_file_that_is_not_a_checkpoint_of_this_format_is_deleted(tmp_path, caplog, content):
    torch.save(content, tmp_path / CHECKPOINT_FILE)
    assert _load(tmp_path, caplog) == (
        None, _deleted(tmp_path, f"it is not a training checkpoint of format {ckpt.FORMAT_VERSION}"))
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_an_unreadable_checkpoint_is_deleted_with_the_first_line_of_the_error(tmp_path, caplog, monkeypatch):
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as error:  # noqa: PT011  (whatever torch raises on it)
        torch.load(path, weights_only=True)
    first_line = str(error.value).splitlines()[0][:200]
    assert _load(tmp_path, caplog) == (None, _deleted(tmp_path, f"it cannot be read ({first_line})"))
    assert not path.exists()
    for raised, shown in [(EOFError(), "EOFError"), (ValueError("x" * 300 + "\nsecond"), "x" * 200),
                          (OSError("first line\nsecond line"), "first line")]:
        path.write_bytes(b"")

        def fail(*_a, raised=raised, **_k):
            raise raised

        monkeypatch.setattr(torch, "load", fail)
        assert _load(tmp_path, caplog) == (None, _deleted(tmp_path, f"it cannot be read ({shown})"))


def test_a_checkpoint_holding_arbitrary_objects_is_not_unpickled(tmp_path, caplog):
    """A checkpoint is loaded weights-only: a file whose pickle names other objects is refused, not executed."""
    from fractions import Fraction

    torch.save({"format": ckpt.FORMAT_VERSION, "fingerprint": FINGERPRINT, "lr": Fraction(1, 3)},
               tmp_path / CHECKPOINT_FILE)
    state, warnings = _load(tmp_path, caplog)
    assert state is None and len(warnings) == 1 and "it cannot be read (Weights only load failed" in warnings[0]
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_discard_deletes_the_checkpoint_and_left_temporaries_and_needs_neither(tmp_path):
    checkpoint = ckpt.Checkpointing(tmp_path / CHECKPOINT_FILE, FINGERPRINT)
    checkpoint.discard()  # nothing there
    checkpoint.save({})
    (tmp_path / f"{CHECKPOINT_FILE}.tmp-123").write_bytes(b"half")
    (tmp_path / "other.pt").write_bytes(b"kept")
    checkpoint.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]
    (tmp_path / f"{CHECKPOINT_FILE}.tmp-9").write_bytes(b"half")
    checkpoint.discard()  # a temporary without a checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]
