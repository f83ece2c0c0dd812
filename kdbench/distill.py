"""One distillation job: (teacher, student, method, seed) under the config's protocol -> a run record.

The record (``record.json``, written last) holds identity, protocol, final metrics (last-epoch test top-1 is
the headline; the best epoch is selected on val only), cost and provenance; ``epochs.jsonl`` beside it holds
the per-epoch metrics, and ``model.pt`` / ``predictions.npy`` / ``metrics.json`` make the run directory usable
as a teacher directory (TAKD's assistant).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from kdbench._util import read_json, sha256_file, stable_hash, write_json_atomic
from kdbench.cache.build import store_identity
from kdbench.cache.source import CachedTeacher, LiveTeacher
from kdbench.cache.store import StoreError, TeacherStore
from kdbench.config import Config
from kdbench.data.shards import load_split, read_manifest
from kdbench.data.views import ViewRenderer
from kdbench.evaluate import agreement
from kdbench.meta import data_info
from kdbench.methods.base import METHODS, DistillMethod
from kdbench.modeldir import load_teacher, read_teacher_metrics, save_model_dir
from kdbench.models import create_model, model_info
from kdbench.runtime import provenance, seed_everything, setup
from kdbench.taps import normalize_tap, tap_dirname
from kdbench.train.loop import fit

_logger = logging.getLogger(__name__)
SCHEMA_VERSION = 1


def run_identity(cfg: Config, teacher: str, student: str, label: str, seed: int) -> dict:
    entry = cfg.methods[label]
    method_cls = METHODS.get(entry.method)
    return {
        "config": cfg.name,
        "dataset": cfg.data.source,
        "teacher": teacher,
        "teacher_model": cfg.teachers[teacher].model,
        "student": student,
        "method": label,
        "method_name": entry.method,
        "params": dataclasses.asdict(method_cls.make_config(entry.params)),
        "seed": seed,
    }


def run_distill(
    cfg: Config,
    teacher: str,
    student: str,
    label: str,
    seed: int,
    data_dir: Path,
    teacher_dir: Path | None,
    stores: dict[str, Path],
    out_dir: Path,
    extra_cost: dict | None = None,
) -> dict:
    """Trains one student and writes its run directory.

    Args:
        cfg: The config.
        teacher: Teacher name in the config (the grid's teacher, also for the baseline).
        student: timm name of the student.
        label: Method label in the config.
        seed: Seed (model init and batch order).
        data_dir: Data directory.
        teacher_dir: The teacher directory actually distilled from (TAKD: the assistant's run directory);
            needed for live-teacher methods and for agreement; ``None`` for the baseline.
        stores: Tap -> store directory of the cached teacher outputs the method declares.
        out_dir: The run directory.
        extra_cost: Cost entries added to the record (e.g. the assistant's training time).
    """
    wall0 = time.perf_counter()
    device = setup(cfg.runtime)
    manifest = read_manifest(data_dir)
    data = data_info(manifest)
    protocol = cfg.protocol
    image_size = protocol.image_size or data.image_size
    entry = cfg.methods[label]
    method_cls: type[DistillMethod] = METHODS.get(entry.method)
    mcfg = method_cls.make_config(entry.params)
    identity = run_identity(cfg, teacher, student, label, seed)
    teacher_taps = method_cls.teacher_taps(mcfg)
    reqs = method_cls.requirements(mcfg)

    tmeta = read_teacher_metrics(teacher_dir) if teacher_dir else None
    assistant_record = teacher_dir / "record.json" if teacher_dir else None
    if assistant_record is not None and assistant_record.exists():  # distilling from a trained assistant (TAKD)
        extra_cost = {"assistant_time_s": read_json(assistant_record, "assistant run record")["cost"]["wall_time_s"],
                      **(extra_cost or {})}
    seed_everything(seed)
    model = create_model(student, data.num_classes, data.in_chans, image_size).to(device)
    s_info = model_info(model, student, data.in_chans, image_size)
    t_info = None
    t_model = None
    if teacher_taps:
        t_model, tmeta = load_teacher(teacher_dir, data, device)
        t_info = model_info(t_model, tmeta["model"], data.in_chans, tmeta["image_size"])
    reason = method_cls.compatibility(mcfg, t_info, s_info)
    if reason:
        record = {"schema_version": SCHEMA_VERSION, "status": "skipped", "skip_reason": reason, "identity": identity,
                  "protocol": protocol, "protocol_hash": protocol.hash()}
        write_json_atomic(out_dir / "record.json", record)
        _logger.warning("skipped %s: %s", identity, reason)
        return record
    seed_everything(seed)  # adapters are seeded too, independently of the teacher's loading
    method = method_cls(mcfg, teacher=t_info, student=s_info, data=data)

    train = load_split(data_dir, "train")
    val, test = load_split(data_dir, "val"), load_split(data_dir, "test")
    source = None
    store_manifests = {}
    if teacher_taps:
        if reqs.live_teacher:
            method.live_teacher_module(t_model)
        if reqs.live_teacher or not stores:
            renderer = ViewRenderer(protocol.views, train.images, train.ids, train.shard_size, data.mean, data.std)
            source = LiveTeacher(t_model, frozenset(teacher_taps), renderer, tmeta["image_size"])
        else:
            opened = {}
            n_stages = len(t_info.feature_shapes)
            for tap in teacher_taps:
                norm = normalize_tap(tap, n_stages)
                store_dir = stores.get(tap, stores.get(norm))  # keyed by the declared or the normalised tap
                if store_dir is None:
                    raise StoreError(f"method {label!r} reads teacher tap {tap!r} but no store of it was given;"
                                     f" pass --store DIR with a store directory named {tap_dirname(norm)!r}")
                expect = store_identity(tmeta["sha256"], norm, protocol.views, cfg.cache, tmeta["image_size"])
                opened[tap] = TeacherStore.open(store_dir, expect, verify=cfg.cache.verify)
                store_manifests[tap] = sha256_file(Path(store_dir) / "manifest.json")
            source = CachedTeacher(opened)
            del t_model  # the teacher never runs: only its cached outputs are read
    run_name = f"{teacher}/{student}/{label}/seed{seed}"
    result = fit(model, method, train, {"val": val, "test": test}, data, protocol, seed, device, source,
                 out_dir / "epochs.jsonl", label=run_name)

    model_dir_meta, test_logits = save_model_dir(out_dir, model, student, test, val, data, image_size,
                                                 protocol.eval_batch_size, device, {"run": run_name})
    hist = result.history
    best = max(range(len(hist)), key=lambda i: hist[i]["val_top1"])
    t_pred = np.load(teacher_dir / "predictions.npy") if teacher_dir else None
    final = {
        "test_top1": model_dir_meta["test_top1"],
        "test_top5": model_dir_meta["test_top5"],
        "val_top1": hist[-1]["val_top1"],
        "best_epoch": best,
        "best_val_top1": hist[best]["val_top1"],
        "test_top1_at_best_val": hist[best]["test_top1"],
        "teacher_agreement": agreement(test_logits, torch.from_numpy(t_pred).long()) if t_pred is not None else None,
        "teacher_test_top1": tmeta["test_top1"] if tmeta else None,
        "retrieval_map": None,
    }
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "skip_reason": None,
        "identity": identity,
        "protocol": protocol,
        "protocol_hash": protocol.hash(),
        "views": {"count": protocol.views.count, "epochs": protocol.epochs,
                  "repeats": protocol.epochs > protocol.views.count},
        "final": final,
        "cost": {
            "wall_time_s": time.perf_counter() - wall0,
            "train_time_s": result.train_time_s,
            "student_params": s_info.num_params,
            "extra_params": method.extra_parameters(),
            "teacher_forward": result.teacher_forward,
            "student_forward": result.student_forward,
            "cache_bytes_read": result.cache_bytes_read,
            "assistant_time_s": None,
            **(extra_cost or {}),
        },
        "requirements": dataclasses.asdict(reqs),
        "declarations": method_cls.declarations(mcfg),
        "provenance": {
            **provenance(device),
            "config_file": cfg.source,
            "config_hash": stable_hash([protocol, cfg.data, cfg.cache, entry]),
            "teacher_sha256": tmeta["sha256"] if tmeta else None,
            "data_manifest_sha256": sha256_file(Path(data_dir) / "manifest.json"),
            "store_manifests": store_manifests,
            "model_sha256": model_dir_meta["sha256"],
        },
        "inputs": {"data": str(data_dir), "teacher_dir": str(teacher_dir) if teacher_dir else None,
                   "stores": {tap: str(d) for tap, d in stores.items()}},
        "epochs_file": "epochs.jsonl",
    }
    write_json_atomic(out_dir / "record.json", record)
    _logger.info("%s: test top-1 %.2f%% (last epoch), %.0fs", run_name, final["test_top1"], record["cost"]["wall_time_s"])
    return record
