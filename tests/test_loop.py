"""Unit tests of the training loop's pieces (:mod:`kdbench.train.loop`) on tiny in-memory data.

30 random 1x8x8 images of 4 classes in shards of 10, 3 views with mixup, batches of 8 (4 steps per epoch, the
last one short), a ``cnn_xs`` student, and a fake teacher source that records what it was asked for. Every
expected value is a hand value or computed independently of the function under test.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdbench import distributed
from kdbench.config import Protocol, ViewRecipe
from kdbench.data.shards import Split
from kdbench.data.views import ViewRenderer
from kdbench.errors import ConfigError, NonFiniteLossError
from kdbench.meta import DataInfo
from kdbench.methods.base import LossOutput, Requirements, create_method
from kdbench.methods.baseline import Baseline
from kdbench.models import create_model, model_info
from kdbench.train import loop
from kdbench.train import checkpoint as ckpt
from kdbench.train.checkpoint import Checkpointing, Preempted
from kdbench.train.loop import Batch, _Run, _SplitBatches, epoch_order, fit, teacher_view_index, view_targets

N, K, HW = 30, 4, 8
CPU = torch.device("cpu")
DATA = DataInfo(num_classes=K, in_chans=1, image_size=HW, num_train=N, mean=(0.5,), std=(0.25,))
PROTOCOL = Protocol(epochs=3, batch_size=8, eval_batch_size=16, lr=0.1,
                    views=ViewRecipe(count=3, seed=7, mixup=0.5))
PLAIN_SGD = replace(PROTOCOL, momentum=0.0, nesterov=False, weight_decay=0.0)


def _split(n: int = N, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, HW, HW), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, K, (n,), generator=g)
    return Split(images, labels, torch.arange(1000, 1000 + n), shard_size=10)


TRAIN = _split()


class FakeTeacher:
    """A teacher source: deterministic logits per (view, row); records every request."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], dict]] = []
        self.forward_count = 0

    def outputs(self, view, rows, device, **kw):
        self.calls.append((view, rows.tolist(), kw))
        self.forward_count += len(rows)
        r = torch.from_numpy(rows).float()[:, None]
        return {"logits": torch.sin(r + 3.0 * view + torch.arange(K, dtype=torch.float32)).to(device)}

    def bytes_read(self) -> int:
        return 7 * self.forward_count


class Indexing(Baseline):
    """The baseline's loss, declaring that it indexes samples."""

    @classmethod
    def requirements(cls, cfg):
        return Requirements(sample_index=True)


class Counting(Baseline):
    """The baseline's loss, with a buffer and a counter that change every step."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.register_buffer("label_sum", torch.zeros(()))
        self.calls = 0

    def loss(self, student, teacher, targets, ctx):
        self.calls += 1
        self.label_sum += targets.labels.sum()
        return super().loss(student, teacher, targets, ctx)


def _method(name, params: dict | None = None):
    info = model_info(create_model("cnn_xs", K, 1, HW), "cnn_xs", 1, HW)
    if isinstance(name, type):
        return name(name.make_config(params or {}), teacher=None, student=info, data=DATA)
    teacher = None if name == "baseline" else info
    return create_method(name, params or {}, teacher=teacher, student=info, data=DATA)


def _run(method="baseline", params=None, protocol=PROTOCOL, teacher=None, rows=None, seed=0, train=TRAIN) -> _Run:
    torch.manual_seed(seed)
    model = create_model("cnn_xs", K, 1, HW)
    return _Run(model, _method(method, params), train, DATA, protocol, CPU, teacher, "lbl", rows)


def _record_steps(monkeypatch) -> list[dict]:
    """Wraps ``_Run.train_step``; returns the list it appends each step's epoch, view, batch and loss to."""
    steps = []
    orig = _Run.train_step

    def step(self, epoch, view, batch):
        out = orig(self, epoch, view, batch)
        steps.append({"epoch": epoch, "view": view, "rows": batch.rows.tolist(), "loss": out.loss.item(),
                      "terms": {k: v.item() for k, v in out.terms.items()}})
        return out

    monkeypatch.setattr(_Run, "train_step", step)
    return steps


def _first_batch(run: _Run, view: int = 0) -> Batch:
    return next(iter(run.batches.epoch(0, view, 1)))


def _reference_grads(run: _Run, batch: Batch) -> list[torch.Tensor]:
    """The gradient of the mixup cross-entropy of a copy of the student on the batch (the baseline's loss)."""
    model = copy.deepcopy(run.model).train()
    logp = torch.log_softmax(model(batch.x), dim=1)
    t = batch.targets
    own, other = logp[torch.arange(len(t.labels)), t.labels], logp[torch.arange(len(t.labels)), t.partner_labels]
    loss = -(t.lam * own + (1 - t.lam) * other).mean()
    return list(torch.autograd.grad(loss, list(model.parameters())))


# --- teacher_view_index --------------------------------------------------------------------------------------------


def test_teacher_view_same_is_the_students_own_view():
    assert [teacher_view_index("same", v, 3) for v in range(3)] == [0, 1, 2]
    assert teacher_view_index("same", 0, 1) == 0


def test_teacher_view_other_is_the_next_view_wrapping_around():
    assert [teacher_view_index("other", v, 3) for v in range(3)] == [1, 2, 0]
    assert [teacher_view_index("other", v, 2) for v in range(2)] == [1, 0]


def test_teacher_view_clean_is_the_clean_view_for_every_student_view():
    assert [teacher_view_index("clean", v, 3) for v in range(3)] == [-1, -1, -1]
    assert teacher_view_index("clean", 0, 1) == -1


def test_teacher_view_other_with_one_view_per_image_is_refused_with_the_count():
    with pytest.raises(ValueError) as e:
        teacher_view_index("other", 0, 1)
    assert str(e.value) == "teacher_view 'other' needs at least 2 views per image; protocol.views.count is 1"


def test_an_unknown_teacher_view_is_refused_with_the_valid_kinds():
    with pytest.raises(ValueError) as e:
        teacher_view_index("fresh", 0, 3)
    assert str(e.value) == "unknown teacher_view 'fresh'; valid: same, other, clean"


def test_a_run_whose_method_declares_an_impossible_teacher_view_fails_when_built():
    with pytest.raises(ValueError, match="protocol.views.count is 1"):
        _run("funmatch", {"teacher_view": "other"}, protocol=replace(PROTOCOL, views=ViewRecipe(count=1)))


# --- view_targets --------------------------------------------------------------------------------------------------


def test_view_targets_are_own_labels_partner_labels_where_mixed_and_the_weights():
    labels = torch.tensor([3, 1, 2, 0, 1, 2], dtype=torch.int64)
    train = Split(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), labels, torch.arange(6), shard_size=6)
    rows = np.array([1, 2, 4, 5])
    lam = np.array([1.0, 0.75, 0.5, 0.625], dtype=np.float32)
    params = SimpleNamespace(partner=np.array([-1, 0, 3, 2], dtype=np.int64), lam=lam)
    t = view_targets(train, rows, params, CPU)
    assert t.labels.tolist() == [1, 2, 1, 2]
    assert t.partner_labels.tolist() == [1, 3, 0, 2]  # row 1 unmixed keeps its own; partner 0 is a real row
    assert t.labels.dtype == t.partner_labels.dtype == torch.int64
    assert t.lam.dtype == torch.float32 and t.lam.tolist() == [1.0, 0.75, 0.5, 0.625]


# --- epoch_order ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 12, 31])
def test_epoch_order_is_a_permutation_of_the_rows(n):
    order = epoch_order(n, 5, 3)
    assert isinstance(order, np.ndarray) and order.dtype == np.int64
    assert sorted(order.tolist()) == list(range(n))


def test_epoch_order_is_the_published_order():
    # The batch order is part of every published number: a change here changes every run's results.
    assert epoch_order(12, 3, 2).tolist() == [6, 11, 9, 5, 4, 0, 3, 10, 8, 7, 1, 2]


def test_epoch_order_depends_on_the_seed_and_the_epoch_only():
    assert np.array_equal(epoch_order(40, 3, 2), epoch_order(40, 3, 2))
    others = [epoch_order(40, 3, 1), epoch_order(40, 3, 3), epoch_order(40, 2, 2), epoch_order(40, 4, 2)]
    assert all(not np.array_equal(o, epoch_order(40, 3, 2)) for o in others)
    assert not np.array_equal(epoch_order(40, 1, 0), epoch_order(40, 0, 1))


# --- Batch ---------------------------------------------------------------------------------------------------------


def test_global_rows_is_the_batch_length_unless_a_total_is_given():
    rows, x = np.array([4, 7, 9]), torch.zeros(3)
    assert Batch(rows, x, None).global_rows == 3
    assert Batch(rows, x, None, total=8).global_rows == 8


# --- _SplitBatches -------------------------------------------------------------------------------------------------


def _batches(protocol=PROTOCOL, rows=None, image_size=HW, epoch=1, view=2, seed=4) -> list[Batch]:
    return list(_SplitBatches(TRAIN, protocol, DATA, image_size, CPU, rows).epoch(epoch, view, seed))


def test_split_batches_cover_every_row_once_in_sorted_batches_of_the_batch_size():
    batches = _batches()
    assert [len(b.rows) for b in batches] == [8, 8, 8, 6]
    assert [b.global_rows for b in batches] == [8, 8, 8, 6]
    assert all(np.all(np.diff(b.rows) > 0) for b in batches)
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(N))


def test_split_batches_are_the_seeded_epoch_order_cut_into_batches():
    order = epoch_order(N, 4, 1)
    assert [b.rows.tolist() for b in _batches(epoch=1, seed=4)] == [sorted(order[i:i + 8]) for i in range(0, N, 8)]
    assert [b.rows.tolist() for b in _batches(epoch=2, seed=4)] != [b.rows.tolist() for b in _batches(epoch=1, seed=4)]


def test_split_batches_of_a_row_subset_cover_exactly_the_subset_in_its_seeded_order():
    subset = np.array([29, 3, 17, 5, 11, 0, 23, 8, 14, 26, 2, 20, 9])
    batches = _batches(rows=subset)
    assert [len(b.rows) for b in batches] == [8, 5]
    order = subset[epoch_order(len(subset), 4, 1)]
    assert [b.rows.tolist() for b in batches] == [sorted(order[:8]), sorted(order[8:])]


def test_a_process_takes_its_part_of_each_global_batch_and_knows_the_whole_batchs_size(monkeypatch):
    """Data parallel: each process renders its part of the global batch; the loss weights need the whole size."""
    monkeypatch.setattr(loop.distributed, "batch_part", lambda rows: rows[1::2])  # this process: every other row
    whole = _batches()
    monkeypatch.undo()
    single = _batches()
    assert [b.rows.tolist() for b in whole] == [b.rows[1::2].tolist() for b in single]
    assert [b.global_rows for b in whole] == [len(b.rows) for b in single] == [8, 8, 8, 6]


def test_split_batch_inputs_are_the_renderers_view_of_the_batch_rows():
    batches = _batches(image_size=12, view=2)
    renderer = ViewRenderer.for_split(PROTOCOL.views, TRAIN, DATA)
    for b in batches:
        assert b.x.shape == (len(b.rows), 1, 12, 12)
        assert torch.equal(b.x, renderer.render(2, b.rows, 12, CPU)[0])
    assert not torch.equal(batches[0].x, renderer.render(1, batches[0].rows, 12, CPU)[0])


def test_split_batch_targets_are_the_rows_labels_and_their_mixup_partners_labels():
    renderer = ViewRenderer.for_split(PROTOCOL.views, TRAIN, DATA)
    mixed = 0
    for b in _batches(view=2):
        params = renderer.params(2, b.rows)
        labels = [int(TRAIN.labels[r]) for r in b.rows]
        partners = [int(TRAIN.labels[p]) if p >= 0 else own for p, own in zip(params.partner, labels)]
        mixed += int((params.partner >= 0).sum())
        assert b.targets.labels.tolist() == labels
        assert b.targets.partner_labels.tolist() == partners
        assert b.targets.lam.tolist() == params.lam.tolist()
    assert 0 < mixed < N  # the recipe mixes some views, not all


# --- _Run.train_epoch ----------------------------------------------------------------------------------------------


def test_train_epoch_row_has_the_epoch_its_view_the_optimisers_lr_and_the_mean_step_loss_and_terms(monkeypatch):
    protocol = replace(PROTOCOL, epochs=6)
    run = _run("kd", protocol=protocol, teacher=FakeTeacher())
    run.step = 16  # epoch 4 of 4 steps: its last step is step 19 of 24
    steps = _record_steps(monkeypatch)
    row = run.train_epoch(4, seed=1)
    assert [(s["epoch"], s["view"]) for s in steps] == [(4, 1)] * 4
    assert {k: row[k] for k in ("epoch", "view")} == {"epoch": 4, "view": 1}
    assert row["lr"] == run.optimizer.param_groups[0]["lr"]
    assert row["lr"] == pytest.approx(0.05 * (1 + math.cos(19 * math.pi / 24)), rel=1e-12)
    assert row["train_loss"] == pytest.approx(sum(s["loss"] for s in steps) / 4, rel=1e-12)
    assert set(row["terms"]) == {"ce", "kd"}
    for k in ("ce", "kd"):
        assert row["terms"][k] == pytest.approx(sum(s["terms"][k] for s in steps) / 4, rel=1e-12)
    assert row["terms"]["ce"] != pytest.approx(row["terms"]["kd"])
    assert set(row) == {"epoch", "view", "lr", "train_loss", "terms", "_t0", "_train_s"}
    assert 0 < row["_train_s"] < 60 and row["_t0"] <= time.perf_counter() - row["_train_s"]


def test_train_epoch_trains_on_the_epochs_batches_in_the_seeded_order(monkeypatch):
    run = _run()
    steps = _record_steps(monkeypatch)
    run.train_epoch(2, seed=5)
    expected = [b.rows.tolist() for b in _SplitBatches(TRAIN, PROTOCOL, DATA, HW, CPU).epoch(2, 2, 5)]
    assert [s["rows"] for s in steps] == expected


def test_train_epoch_starts_the_methods_epoch_and_puts_student_and_method_in_training_mode(monkeypatch):
    run = _run()
    run.step = 8
    seen = []
    monkeypatch.setattr(run.method, "on_epoch_start", lambda ctx: seen.append((ctx, run.model.training)))
    run.model.eval(), run.method.eval()
    run.train_epoch(2, seed=0)
    ctx, _ = seen[0]
    assert len(seen) == 1
    assert (ctx.epoch, ctx.num_epochs, ctx.step, ctx.steps_per_epoch, ctx.view, ctx.index) == (2, 3, 8, 4, 2, None)
    assert run.model.training and run.method.training


def test_train_epoch_weighs_each_steps_loss_by_this_process_share_of_the_global_batch(monkeypatch):
    run = _run()
    real = list(run.batches.epoch(0, 0, 1))
    parts = [Batch(b.rows[:k], b.x[:k], type(b.targets)(*(t[:k] for t in vars(b.targets).values())), total=len(b.rows))
             for b, k in zip(real, (2, 4, 8, 3))]
    run.batches = SimpleNamespace(epoch=lambda epoch, view, seed: iter(parts))
    steps = _record_steps(monkeypatch)
    row = run.train_epoch(0, seed=1)
    shares = [2 / 8, 4 / 8, 8 / 8, 3 / 6]
    assert row["train_loss"] == pytest.approx(sum(s["loss"] * w for s, w in zip(steps, shares)) / 4, rel=1e-12)
    assert row["terms"]["ce"] == pytest.approx(sum(s["terms"]["ce"] * w for s, w in zip(steps, shares)) / 4)


def test_train_epoch_of_a_data_parallel_job_sums_the_processes_means(monkeypatch):
    run = _run("kd", teacher=FakeTeacher())
    run.world = SimpleNamespace(size=2)
    sums = []
    monkeypatch.setattr(distributed, "all_sum", lambda values: sums.append(list(values)) or [2 * v + 1 for v in values])
    steps = _record_steps(monkeypatch)
    row = run.train_epoch(0, seed=1)
    loss, ce, kd = (sum(s["loss"] for s in steps), *(sum(s["terms"][k] for s in steps) for k in ("ce", "kd")))
    assert sums == [pytest.approx([loss, ce, kd])]
    assert row["train_loss"] == pytest.approx((2 * loss + 1) / 4)
    assert row["terms"] == {"ce": pytest.approx((2 * ce + 1) / 4), "kd": pytest.approx((2 * kd + 1) / 4)}


@pytest.mark.parametrize(("batch_size", "steps", "logged"), [(2, 15, (3, 6, 9, 12)), (4, 8, (2, 4, 6)), (8, 4, (1, 2, 3))])
def test_train_epoch_logs_progress_every_quarter_epoch_with_the_running_mean_loss(monkeypatch, caplog, batch_size,
                                                                                  steps, logged):
    run = _run(protocol=replace(PROTOCOL, batch_size=batch_size))  # a line after every quarter but the last
    recorded = _record_steps(monkeypatch)
    with caplog.at_level("INFO", logger="kdbench.train.loop"):
        run.train_epoch(1, seed=0)
    losses = [s["loss"] for s in recorded]
    lines = [r.getMessage() for r in caplog.records]
    assert [re.sub(r" \| \d+ samples/s$", "", m) for m in lines] == [
        f"lbl epoch 2/3 step {k}/{steps} loss {sum(losses[:k]) / k:.4f}" for k in logged]
    assert all(re.search(r" \| \d+ samples/s$", m) for m in lines)


def test_the_progress_lines_samples_per_second_is_the_steps_images_over_the_time_since_the_epoch_began(
        monkeypatch, caplog):
    run = _run(protocol=replace(PROTOCOL, batch_size=4))  # 8 steps of 4 images
    ticks = iter(range(100, 1000))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(ticks)))  # one second per reading
    with caplog.at_level("INFO", logger="kdbench.train.loop"):
        run.train_epoch(1, seed=0)
    rates = [re.search(r" \| (\d+) samples/s$", r.getMessage()).group(1) for r in caplog.records]
    assert rates == ["8", "8", "8"]  # after steps 2, 4 and 6: 4 images each, the k-th reading k seconds after t0


@pytest.mark.parametrize("yielded", [3, 0])
def test_an_epoch_of_another_number_of_batches_than_the_steps_per_epoch_is_an_error(yielded):
    run = _run()
    batches = list(run.batches.epoch(0, 0, 1))[:yielded]
    run.batches = SimpleNamespace(epoch=lambda epoch, view, seed: iter(batches))
    with pytest.raises(RuntimeError) as e:
        run.train_epoch(2, seed=1)
    assert str(e.value) == f"lbl: epoch 2 had {yielded} batches, expected 4"


@pytest.mark.parametrize(("epoch", "stop_at"), [(1, 0), (1, 1), (0, 3)])  # any step before the last, of 4
def test_a_stop_request_preempts_the_epoch_after_the_current_step(monkeypatch, epoch, stop_at):
    run = _run()
    monkeypatch.setattr(loop, "stop_requested", lambda: run.step >= stop_at)
    with pytest.raises(Preempted) as e:
        run.train_epoch(epoch, seed=0)
    assert e.value.args == (epoch,) and run.step == max(1, stop_at)


def test_a_stop_request_during_the_last_step_lets_the_epoch_end(monkeypatch):
    run = _run()
    monkeypatch.setattr(loop, "stop_requested", lambda: run.step == 4)
    assert run.train_epoch(0, seed=0)["epoch"] == 0 and run.step == 4


# --- _Run.train_step -----------------------------------------------------------------------------------------------


def test_train_step_sets_the_scheduled_lr_on_every_group_before_the_optimiser_step():
    run = _run(protocol=replace(PROTOCOL, weight_decay_exclude_1d=True))
    run.step = 5
    at_step = []
    step = run.optimizer.step
    run.optimizer.step = lambda: (at_step.append([g["lr"] for g in run.optimizer.param_groups]), step())[1]
    run.train_step(1, 1, _first_batch(run, 1))
    lr = 0.05 * (1 + math.cos(5 * math.pi / 12))  # cosine over 3 epochs of 4 steps, step 5
    assert len(run.optimizer.param_groups) == 2
    assert at_step == [[pytest.approx(lr, rel=1e-12)] * 2]


def test_train_step_takes_an_sgd_step_along_the_gradient_of_the_methods_loss_on_the_batch():
    run = _run(protocol=PLAIN_SGD)
    batch = _first_batch(run)
    grads, before = _reference_grads(run, batch), [q.detach().clone() for q in run.model.parameters()]
    for q in run.params:
        q.grad = torch.full_like(q, 1e3)  # a previous step's gradient must not leak into this one
    run.train_step(0, 0, batch)
    for q, g, old in zip(run.model.parameters(), grads, before):
        assert torch.allclose(q.grad, g, rtol=1e-4, atol=1e-6)
        assert torch.allclose(q.detach(), old - 0.1 * g, rtol=1e-4, atol=1e-6)  # lr 0.1 * cosine(0) = 0.1


def test_train_step_counts_the_step_and_the_global_batchs_rows():
    run = _run()
    run.step, run.student_forward = 3, 40
    b = _first_batch(run)
    out = run.train_step(0, 0, Batch(b.rows, b.x, b.targets, total=24))
    assert (run.step, run.student_forward) == (4, 64)
    assert isinstance(out, LossOutput) and set(out.terms) == {"ce"}


def test_a_part_of_a_short_global_batch_weighs_its_gradient_by_its_share_times_the_processes():
    run = _run(protocol=PLAIN_SGD)
    run.world = SimpleNamespace(size=2)
    b = _first_batch(run)
    part = Batch(b.rows[:3], b.x[:3], type(b.targets)(*(t[:3] for t in vars(b.targets).values())), total=5)
    grads = _reference_grads(run, part)
    run.train_step(0, 0, part)
    for q, g in zip(run.model.parameters(), grads):
        assert torch.allclose(q.grad, g * (3 * 2 / 5), rtol=1e-4, atol=1e-6)


def test_train_step_clips_the_gradients_global_norm_when_the_protocol_sets_one():
    run = _run(protocol=replace(PLAIN_SGD, grad_clip_norm=1e-3))
    batch = _first_batch(run)
    grads = _reference_grads(run, batch)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norm > 0.01
    run.train_step(0, 0, batch)
    for q, g in zip(run.model.parameters(), grads):
        assert torch.allclose(q.grad, g * (1e-3 / norm), rtol=1e-3, atol=1e-9)


def test_train_step_does_not_clip_without_a_grad_clip_norm():
    run = _run(protocol=PLAIN_SGD)
    batch = _first_batch(run)
    grads = _reference_grads(run, batch)
    run.train_step(0, 0, batch)
    assert all(torch.allclose(q.grad, g, rtol=1e-4, atol=1e-6) for q, g in zip(run.model.parameters(), grads))


@pytest.mark.parametrize(("ce", "shown"), [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_a_non_finite_loss_raises_naming_the_run_epoch_step_and_terms_without_a_step(ce, shown):
    run = _run()
    run.step, run.student_forward = 7, 56
    run.forward = lambda x, t_out, targets, ctx: LossOutput.from_terms(
        {"ce": torch.tensor(ce, requires_grad=True), "kd": torch.tensor(0.5)})
    before = [q.detach().clone() for q in run.params]
    with pytest.raises(NonFiniteLossError) as e:
        run.train_step(2, 1, _first_batch(run, 1))
    assert str(e.value) == (f"lbl: loss is {shown} at epoch 2 step 7 (terms: {{'ce': {shown}, 'kd': 0.5}}); lower the"
                            " learning rate or check the method's parameters")
    assert (run.step, run.student_forward) == (7, 56)
    assert all(torch.equal(q, old) for q, old in zip(run.params, before))


@pytest.mark.parametrize(("kind", "expected"), [("same", 2), ("other", 0), ("clean", -1)])
def test_train_step_asks_the_teacher_for_the_declared_view_of_the_batchs_rows(kind, expected):
    teacher = FakeTeacher()
    run = _run("funmatch", {"teacher_view": kind}, teacher=teacher)
    b = _first_batch(run, 2)
    run.train_step(2, 2, b)
    teacher_x = torch.zeros(3)
    run.train_step(2, 2, Batch(b.rows, b.x, b.targets, teacher_x=teacher_x))
    assert teacher.calls[0] == (expected, b.rows.tolist(), {})
    assert teacher.calls[1][:2] == (expected, b.rows.tolist()) and teacher.calls[1][2]["inputs"] is teacher_x
    assert len(teacher.calls) == 2


def test_train_step_does_not_ask_the_teacher_when_the_method_reads_no_teacher_taps():
    teacher = FakeTeacher()
    run = _run("baseline", teacher=teacher)
    run.train_step(0, 0, _first_batch(run))
    assert teacher.calls == []


@pytest.mark.parametrize("method", [Indexing, "baseline"])
def test_train_step_gives_the_method_the_step_context_with_the_rows_when_it_indexes_samples(method):
    run = _run(method)
    run.step = 5
    seen = []
    loss = run.method.loss
    run.method.loss = lambda s, t, targets, ctx: (seen.append(ctx), loss(s, t, targets, ctx))[1]
    b = _first_batch(run, 1)
    run.train_step(2, 1, b)
    ctx = seen[0]
    assert (ctx.epoch, ctx.num_epochs, ctx.step, ctx.steps_per_epoch, ctx.view) == (2, 3, 5, 4, 1)
    if method is Indexing:
        assert ctx.index.dtype == torch.int64 and ctx.index.tolist() == b.rows.tolist()
    else:
        assert ctx.index is None


# --- _Run.evaluate -------------------------------------------------------------------------------------------------


def _labels_with_misses(model, split: Split, misses: int) -> Split:
    """``split`` relabelled with the model's own top-1 predictions, ``misses`` of them changed: top-1 is known."""
    x = (split.images.float() / 255 - 0.5) / 0.25
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    model.train()
    labels = pred.clone()
    labels[:misses] = (pred[:misses] + 1) % K
    return Split(split.images, labels, split.ids, split.shard_size)


def test_evaluate_adds_each_splits_top1_and_the_epochs_timings():
    subset = np.arange(0, N, 2)  # 15 training rows
    run = _run(rows=subset)
    val = _labels_with_misses(run.model, _split(12, seed=1), misses=3)
    test = _labels_with_misses(run.model, _split(10, seed=2), misses=5)
    row = {"epoch": 0, "_t0": time.perf_counter() - 100.0, "_train_s": 4.0}
    run.evaluate(row, {"val": val, "test": test})
    assert set(row) == {"epoch", "val_top1", "test_top1", "time_s", "samples_per_s"}
    assert row["val_top1"] == pytest.approx(75.0) and row["test_top1"] == pytest.approx(50.0)
    assert 100.0 <= row["time_s"] < 160.0
    assert row["samples_per_s"] == 15 / 4.0
    assert run.model.training


def test_a_run_on_a_row_subset_has_the_steps_of_the_subset_and_trains_on_those_rows_only(monkeypatch):
    subset = np.arange(3, 20)
    run = _run(rows=subset)
    assert run.steps_per_epoch == 3 and _run().steps_per_epoch == 4
    steps = _record_steps(monkeypatch)
    run.train_epoch(0, seed=0)
    assert sorted(r for s in steps for r in s["rows"]) == subset.tolist()


def test_a_run_reads_the_methods_taps_from_its_config():
    run = _run("fitnet", {"hint_stage": 1, "kd_weight": 1.0}, teacher=FakeTeacher())
    assert run.student_taps == {"logits", "feature[1]"} and run.teacher_taps == {"logits", "feature[1]"}
    other = _run("fitnet", {"hint_stage": 0}, teacher=FakeTeacher())
    assert other.student_taps == {"logits", "feature[0]"} and other.teacher_taps == {"feature[0]"}


def test_a_step_leaves_parameters_without_a_gradient_untouched_even_under_weight_decay():
    """A parameter the loss did not reach in this step (an adapter used in other steps) keeps its value: the step's
    gradients start as None, which the optimiser skips; zeroed ones would still decay it."""
    run = _run("kd", protocol=replace(PROTOCOL, weight_decay=0.1, momentum=0.9))
    unused = torch.nn.Parameter(torch.ones(3))
    run.optimizer.add_param_group({"params": [unused]})
    batch = _first_batch(run)
    run.teacher = FakeTeacher()
    for _ in range(2):
        unused.grad = torch.ones(3)  # left by an earlier step that used it
        run.train_step(0, 0, batch)
    assert torch.equal(unused.detach(), torch.ones(3)) and unused.grad is None


def test_evaluation_runs_in_the_protocols_numerics(monkeypatch):
    seen = []
    real = loop.predict

    def predict(model, split, data, size, batch, device, numerics):
        seen.append(numerics)
        return real(model, split, data, size, batch, device, numerics)

    monkeypatch.setattr(loop, "predict", predict)
    run = _run(protocol=replace(PROTOCOL, channels_last=False))
    run.evaluate({"_t0": 0.0, "_train_s": 1.0}, {"val": TRAIN})
    assert seen == [run.numerics]


# --- _Run.state / restore ------------------------------------------------------------------------------------------


def test_restore_brings_a_fresh_run_to_the_saved_state_and_it_then_trains_identically():
    a = _run(Counting)
    a.train_epoch(0, seed=1)
    saved = copy.deepcopy({**a.state(), "epochs_done": 1})
    assert set(saved) == {"step", "student_forward", "model", "method", "method_extra", "optimizer", "rng",
                          "epochs_done"}
    after = torch.rand(4)
    b = _run(Counting, seed=9)
    assert b.restore(saved) == 1
    assert torch.equal(torch.rand(4), after)
    assert (b.step, b.student_forward) == (4, 30)
    assert b.method.calls == 4 and torch.equal(b.method.label_sum, a.method.label_sum)
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in b.model.state_dict().items())
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_b["param_groups"] == opt_a["param_groups"] and opt_b["state"].keys() == opt_a["state"].keys()
    assert all(torch.equal(opt_b["state"][i]["momentum_buffer"], s["momentum_buffer"])
               for i, s in opt_a["state"].items())
    rows = [r.train_epoch(1, seed=1) for r in (a, b)]
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows[:1]] == [
        {k: v for k, v in rows[1].items() if not k.startswith("_")}]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


# --- fit -----------------------------------------------------------------------------------------------------------


def test_fit_trains_every_epoch_and_logs_one_line_per_history_row(tmp_path):
    torch.manual_seed(0)
    model, teacher = create_model("cnn_xs", K, 1, HW), FakeTeacher()
    log = tmp_path / "runs" / "kd" / "epochs.jsonl"  # its folders made as needed
    result = fit(model, _method("kd"), TRAIN, {"val": _split(12, seed=1)}, DATA, replace(PROTOCOL, epochs=2), 0, CPU,
                 teacher=teacher, epochs_log=log, label="lbl")
    assert [(r["epoch"], r["view"]) for r in result.history] == [(0, 0), (1, 1)]
    assert all("val_top1" in r and "_t0" not in r for r in result.history)
    assert [json.loads(line) for line in log.read_text().splitlines()] == result.history
    assert (result.student_forward, result.teacher_forward, result.cache_bytes_read) == (60, 60, 420)
    assert result.resumed_at == [] and result.train_time_s > 0


def _fit(epochs=3, checkpoint=None, rows=None, evals=None, **kw):
    torch.manual_seed(0)
    evals = {"val": _split(12, seed=1)} if evals is None else evals
    return fit(create_model("cnn_xs", K, 1, HW), _method("baseline"), TRAIN, evals, DATA,
               replace(PROTOCOL, epochs=epochs), 0, CPU, label="lbl", checkpoint=checkpoint, rows=rows, **kw)


def test_fit_names_its_batch_key_when_the_processes_refuse_it(monkeypatch):
    monkeypatch.setattr(loop.distributed, "world", lambda: distributed.World(0, 3, 0, "gloo"))
    with pytest.raises(ConfigError, match=r"^lbl \(3 processes\): key 'protocol\.batch_size' \(8\) is the global"):
        _fit()
    with pytest.raises(ConfigError, match=r"^lbl \(3 processes\): key 'tune\.batch_size' \(8\) is the global"):
        _fit(batch_key="tune.batch_size")


def test_fit_logs_each_epoch_with_its_view_loss_and_accuracies(caplog):
    with caplog.at_level("INFO", logger="kdbench.train.loop"):
        result = _fit(epochs=2, evals={"val": _split(12, seed=1), "test": _split(9, seed=2)})
    lines = [r.getMessage() for r in caplog.records if " view " in r.getMessage()]
    assert [re.sub(r" \| \d+ samples/s$", "", m) for m in lines] == [
        f"lbl epoch {r['epoch'] + 1}/2 view {r['view']} loss {r['train_loss']:.4f} val_top1={r['val_top1']:.2f}"
        f" test_top1={r['test_top1']:.2f}" for r in result.history]


def test_fit_without_a_label_logs_the_bare_epoch(caplog):
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="kdbench.train.loop"):
        fit(create_model("cnn_xs", K, 1, HW), _method("baseline"), TRAIN, {}, DATA, replace(PROTOCOL, epochs=1), 0, CPU)
    assert caplog.records[-1].getMessage().startswith(" epoch 1/1 view 0 loss ")


def test_fit_and_its_checkpoints_count_the_training_time_since_the_start(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Checkpointing, "save", lambda self, state: saved.append(dict(state)))
    t0 = time.perf_counter()
    result = _fit(epochs=2, checkpoint=Checkpointing(tmp_path / "c.pt", {"k": 1}))
    elapsed = time.perf_counter() - t0
    assert 0 < saved[0]["train_time_s"] < saved[1]["train_time_s"] <= result.train_time_s <= elapsed
    assert [s["world_size"] for s in saved] == [1, 1]


def test_a_run_resumed_from_a_checkpoint_without_a_process_count_reads_it_as_one(tmp_path, caplog):
    path = tmp_path / "c.pt"
    _fit(epochs=1, checkpoint=Checkpointing(path, {"k": 1}, every=1))
    state = torch.load(path, weights_only=True)
    del state["world_size"]
    torch.save(state, path)
    with caplog.at_level("INFO", logger="kdbench.train.loop"):
        assert _fit(epochs=2, checkpoint=Checkpointing(path, {"k": 1}, every=1)).resumed_at == [1]
    assert not any("process(es)" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_stopped_before_its_next_epoch_says_the_checkpoint_holds_its_epochs(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    _fit(epochs=1, checkpoint=Checkpointing(path, {"k": 1}, every=1))
    monkeypatch.setattr(loop, "stop_requested", lambda: True)
    with pytest.raises(Preempted) as e:
        _fit(epochs=3, checkpoint=Checkpointing(path, {"k": 1}, every=1))
    assert str(e.value).endswith(f"{path} holds 1 epoch(s); run the job again to resume") and not e.value.progressed


def test_fit_on_a_row_subset_trains_those_rows_only():
    assert _fit(epochs=2, rows=np.arange(5, 18)).student_forward == 2 * 13


def test_fit_checkpoints_every_nth_epoch_and_after_the_last(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Checkpointing, "save", lambda self, state: saved.append(state["epochs_done"]))
    _fit(epochs=5, checkpoint=Checkpointing(tmp_path / "c.pt", {"k": 1}, every=2))
    assert saved == [2, 4, 5]


@pytest.mark.parametrize("after", [1, 2, 3])  # epochs of 3 done when the stop is asked
def test_a_stop_asked_at_the_end_of_an_epoch_starts_no_other_epoch_and_the_last_epoch_completes(
        tmp_path, monkeypatch, after):
    steps = _record_steps(monkeypatch)
    orig = _Run.evaluate

    def evaluate(self, row, evals):
        orig(self, row, evals)
        if row["epoch"] + 1 == after:
            ckpt.request_stop()

    monkeypatch.setattr(_Run, "evaluate", evaluate)
    with ckpt.stop_on_signal():
        if after == 3:  # the run is complete: nothing to stop
            assert len(_fit(checkpoint=Checkpointing(tmp_path / "c.pt", {"k": 1})).history) == 3
        else:
            with pytest.raises(Preempted, match=rf"^lbl: stopped on request after {after} of 3 epochs"):
                _fit(checkpoint=Checkpointing(tmp_path / "c.pt", {"k": 1}))
    assert len(steps) == 4 * after  # no step of a further epoch


def test_fit_says_where_it_resumes_and_when_the_checkpoint_had_other_processes(tmp_path, monkeypatch, caplog):
    path = tmp_path / "c.pt"
    first = _fit(epochs=1, checkpoint=Checkpointing(path, {"k": 1}, every=1))
    assert path.exists() and first.history
    state = torch.load(path, weights_only=True)
    state["epochs_done"], state["world_size"] = 1, 2
    torch.save(state, path)
    with caplog.at_level("INFO", logger="kdbench.train.loop"):
        result = _fit(epochs=2, checkpoint=Checkpointing(path, {"k": 1}, every=1))
    messages = [r.getMessage() for r in caplog.records]
    assert f"lbl: resuming after epoch 1/2 from {path}" in messages
    assert ("lbl: the checkpoint was written by 2 process(es), this run has 1; the global batch and the sample order"
            " do not depend on it") in messages
    assert [r["epoch"] for r in result.history] == [0, 1] and result.resumed_at == [1]


# --- what a data-parallel run refuses, checked when the run is built (the processes faked) -----------------------


def test_a_data_parallel_run_names_the_batch_key_it_was_given(monkeypatch):
    """A trial's batch comes from another key than the protocol's: the refusal names that key."""
    monkeypatch.setattr(loop.distributed, "world", lambda: distributed.World(0, 3, 0, "gloo"))
    model = create_model("cnn_xs", K, 1, HW)
    with pytest.raises(ConfigError, match=r"^lbl \(3 processes\): key 'tune\.batch_size' \(8\) is the global batch"):
        _Run(model, _method("baseline"), TRAIN, DATA, PROTOCOL, CPU, None, "lbl", None, "tune.batch_size")


@pytest.mark.parametrize(("size", "over", "method", "message"), [
    (3, {}, "baseline", "lbl (3 processes): key 'protocol.batch_size' (8) is the global batch and must divide into 3"
                        " processes (runtime.processes); choose a multiple of 3"),
    (8, {}, "baseline", "lbl (8 processes): key 'protocol.batch_size': the last batch of an epoch has 6 of 30 images,"
                        " fewer than the 8 processes; choose a batch size that leaves 0 or at least 8 (or fewer"
                        " processes, runtime.processes)"),
    (2, {}, Indexing, "lbl (2 processes): key 'runtime.processes': the method indexes samples (a memory bank each"
                      " process would update with its own rows only); run it with runtime.processes: 1"),
    (2, {"sync_batchnorm": True}, "baseline", "lbl (2 processes): key 'protocol.sync_batchnorm' needs CUDA (torch's"
                                              " SyncBatchNorm has no CPU kernel); set it false on CPU"),
])
def test_a_data_parallel_run_refuses_what_its_processes_cannot_do(monkeypatch, size, over, method, message):
    monkeypatch.setattr(loop.distributed, "world", lambda: distributed.World(0, size, 0, "gloo"))
    with pytest.raises(ConfigError) as e:
        _run(method, protocol=replace(PROTOCOL, **over))
    assert str(e.value) == message


# --- a run on a streamed split ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    from _helpers_stream import write_variable_data

    from kdbench.config import DataConfig
    from kdbench.data.stream import StreamedSplit

    data_dir = write_variable_data(tmp_path_factory.mktemp("loop-stream"), {"train": 12}, 6, HW, 1, sizes=(10, 14),
                                   num_classes=K)
    return StreamedSplit.open(data_dir, "train", DataConfig(workers=0))


class SizedTeacher(FakeTeacher):
    """A live teacher: the stream renders its inputs at ``input_size``."""

    input_size = 10


@pytest.mark.parametrize(("method", "teacher", "teacher_x"), [
    ("kd", SizedTeacher, (10, 10)), ("kd", FakeTeacher, None), ("baseline", SizedTeacher, None)])
def test_a_run_on_a_streamed_split_batches_the_stream_with_the_live_teachers_inputs(streamed, method, teacher,
                                                                                     teacher_x):
    run = _Run(create_model("cnn_xs", K, 1, HW), _method(method), streamed, DATA, PROTOCOL, CPU, teacher(), "lbl")
    batches = list(run.batches.epoch(0, 1, 0))
    assert sorted(r for b in batches for r in b.rows.tolist()) == list(range(12))
    assert [tuple(b.x.shape) for b in batches] == [(8, 1, HW, HW), (4, 1, HW, HW)]
    assert [b.global_rows for b in batches] == [8, 4]
    assert [None if b.teacher_x is None else tuple(b.teacher_x.shape[2:]) for b in batches] == [teacher_x] * 2
    assert torch.equal(torch.cat([b.targets.labels for b in batches]),
                       torch.cat([torch.as_tensor(streamed.labels)[torch.from_numpy(b.rows)] for b in batches]))


def test_a_row_subset_of_a_streamed_split_is_refused(streamed):
    with pytest.raises(ValueError) as e:
        _Run(create_model("cnn_xs", K, 1, HW), _method("baseline"), streamed, DATA, PROTOCOL, CPU, None, "lbl",
             np.arange(4))
    assert str(e.value) == "lbl: a subset of rows trains from data in memory only, not a streamed split"
