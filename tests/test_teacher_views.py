"""The declared teacher view (FunMatch's consistency ablation), through ``fit`` itself on a real (tiny) store:
``same`` serves the teacher's outputs on exactly the student's view, ``other`` those of another stored view of
the same image, ``clean`` the live teacher's on the un-augmented image (one output per image for the run).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _helpers_store import SpyTeacher, build_store, expect_for, setup_world

import kdbench.train.loop as loop_mod
from kdbench.cache.check import ROUNDOFF
from kdbench.cache.source import CachedTeacher, LiveTeacher
from kdbench.cache.store import TeacherStore
from kdbench.data.shards import load_split, read_manifest
from kdbench.data.views import CLEAN_VIEW, ViewRenderer, render
from kdbench.distill import run_distill
from kdbench.errors import StoreError
from kdbench.meta import data_info
from kdbench.methods.base import create_method
from kdbench.modeldir import load_teacher
from kdbench.models import create_model, model_info
from kdbench.taps import compute_taps
from kdbench.train.loop import fit

CPU = torch.device("cpu")
VARIANTS = {
    "funmatch": {},
    "independent_noise": {"method": "funmatch", "teacher_view": "other"},
    "fixed_teacher": {"method": "funmatch", "teacher_view": "clean"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """100 training images (shards of 40/40/20), 3 views with mixup 0.5, 4 epochs of 4 steps, a cnn_s teacher
    and its logits store built by the real cache jobs."""
    base = tmp_path_factory.mktemp("teacher_views")
    cfg, _, data_dir, teacher_dir = setup_world(base, methods=VARIANTS)
    store_dir = build_store(cfg, teacher_dir, data_dir, "logits", base / "cache")
    data = data_info(read_manifest(data_dir))
    train = load_split(data_dir, "train")
    teacher, _ = load_teacher(teacher_dir, data, CPU)
    return SimpleNamespace(
        base=base, cfg=cfg, data_dir=data_dir, teacher_dir=teacher_dir, store_dir=store_dir, data=data,
        train=train, teacher=teacher, renderer=ViewRenderer.for_split(cfg.protocol.views, train, data),
        store=TeacherStore.open(store_dir, expect_for(cfg, teacher_dir, "logits")),
    )


def _live(world, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return compute_taps(world.teacher, x.contiguous(memory_format=torch.channels_last), {"logits"})["logits"]


def _fit(world, monkeypatch, params: dict, source) -> tuple[SpyTeacher, list[torch.Tensor], int]:
    """Runs ``fit`` with funmatch(``params``) and a spy on ``source``; returns the spy, the student's input of
    every step, and the steps per epoch."""
    student_inputs = []

    def recording_compute_taps(model, x, taps):
        student_inputs.append(x.detach().clone())
        return compute_taps(model, x, taps)

    monkeypatch.setattr(loop_mod, "compute_taps", recording_compute_taps)
    data = world.data
    torch.manual_seed(0)
    student = create_model("cnn_xs", data.num_classes, data.in_chans, data.image_size)
    s_info = model_info(student, "cnn_xs", data.in_chans, data.image_size)
    t_info = model_info(world.teacher, "cnn_s", data.in_chans, data.image_size)
    method = create_method("funmatch", params, teacher=t_info, student=s_info, data=data)
    spy = SpyTeacher(source)
    fit(student, method, world.train, {}, data, world.cfg.protocol, seed=3, device=CPU, teacher=spy)
    steps = math.ceil(len(world.train) / world.cfg.protocol.batch_size)
    assert len(spy.calls) == len(student_inputs) == world.cfg.protocol.epochs * steps == 16
    return spy, student_inputs, steps


def _fp16_close(served: torch.Tensor, live: torch.Tensor) -> bool:
    return bool(torch.all((served - live).abs() <= ROUNDOFF["float16"] * live.abs() * 1.001 + 1e-5))


@pytest.mark.parametrize("teacher_view", ["same", "other"])
def test_fit_serves_the_declared_stored_view(world, monkeypatch, teacher_view):
    """The student gets its own view ``e mod V``; ``same`` serves the teacher's outputs on exactly that input,
    ``other`` the stored outputs of view ``(e + 1) mod V`` of the same images: the live teacher's on that view,
    not on what the student saw."""
    spy, student_inputs, steps = _fit(world, monkeypatch, {"teacher_view": teacher_view}, CachedTeacher(
        {"logits": world.store}))
    V = world.cfg.protocol.views.count
    differs = 0
    for step, ((view, rows, served), x) in enumerate(zip(spy.calls, student_inputs)):
        student_view = (step // steps) % V
        assert torch.equal(x, world.renderer.render(student_view, rows, 28)[0])  # the student's own view
        expected = student_view if teacher_view == "same" else (student_view + 1) % V
        assert view == expected
        assert _fp16_close(served, _live(world, world.renderer.render(expected, rows, 28)[0]))
        on_student_input = _fp16_close(served, _live(world, x))
        assert on_student_input if teacher_view == "same" else not on_student_input
        differs += int(not torch.equal(served, world.store.fetch(student_view, torch.from_numpy(rows))))
    assert differs == (0 if teacher_view == "same" else len(spy.calls))


def test_fit_serves_the_clean_view_from_the_live_teacher(world, monkeypatch):
    """``clean``: every step asks for CLEAN_VIEW, the live teacher sees the whole, unflipped, unmixed image
    (rendered as for evaluation) while the student trains on augmented views, and each image gets one and the
    same teacher output for the whole run."""
    live = LiveTeacher(world.teacher, frozenset({"logits"}), world.renderer, 28)
    spy, student_inputs, _ = _fit(world, monkeypatch, {"teacher_view": "clean"}, live)
    data, images = world.data, world.train.images
    per_image: dict[int, torch.Tensor] = {}
    augmented = 0
    for (view, rows, served), x in zip(spy.calls, student_inputs):
        assert view == CLEAN_VIEW
        clean = render(images[rows], None, None, 28, data.mean, data.std)
        assert torch.allclose(served, _live(world, clean), rtol=1e-5, atol=1e-5)
        augmented += int(not torch.allclose(x, clean))
        for k, r in enumerate(rows):
            first = per_image.setdefault(int(r), served[k])
            assert torch.allclose(served[k], first, rtol=1e-5, atol=1e-5)
    assert len(per_image) == len(world.train) and augmented == len(spy.calls)
    assert spy.forward_count == 4 * len(world.train)


def test_the_store_refuses_the_clean_view(world):
    with pytest.raises(StoreError, match="live_teacher"):
        CachedTeacher({"logits": world.store}).outputs(CLEAN_VIEW, np.arange(4), CPU)


def test_other_view_needs_two_views(world):
    views = dataclasses.replace(world.cfg.protocol.views, count=1)
    protocol = dataclasses.replace(world.cfg.protocol, views=views)
    data = world.data
    student = create_model("cnn_xs", data.num_classes, data.in_chans, data.image_size)
    s_info = model_info(student, "cnn_xs", data.in_chans, data.image_size)
    method = create_method("funmatch", {"teacher_view": "other"}, teacher=s_info, student=s_info, data=data)
    with pytest.raises(ValueError, match="at least 2 views"):
        fit(student, method, world.train, {}, data, protocol, seed=0, device=CPU,
            teacher=CachedTeacher({"logits": world.store}))


def test_distill_jobs_read_the_store_or_run_the_teacher_as_declared(world):
    """The distill job: ``other`` reads the store (the teacher never runs); ``clean`` runs the teacher live on
    every step even when a store is given; the record carries the declaration."""
    stores = {"logits": world.store_dir}
    runs = world.base / "runs"
    noise = run_distill(world.cfg, "t", "cnn_xs", "independent_noise", 0, world.data_dir, world.teacher_dir, stores,
                        runs / "noise")
    fixed = run_distill(world.cfg, "t", "cnn_xs", "fixed_teacher", 0, world.data_dir, world.teacher_dir, stores,
                        runs / "fixed")
    assert noise.cost.teacher_forward == 0 and noise.cost.cache_bytes_read > 0
    assert noise.declarations["teacher_view"] == "other" and not noise.requirements["live_teacher"]
    assert fixed.cost.teacher_forward == 4 * len(world.train) and fixed.cost.cache_bytes_read == 0
    assert fixed.declarations["teacher_view"] == "clean" and fixed.requirements["live_teacher"]
