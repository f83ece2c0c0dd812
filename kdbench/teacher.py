"""Teachers: trained under their protocol, or loaded from a local checkpoint; saved as a teacher directory.

A teacher directory holds ``model.pt`` (the state dict), ``predictions.npy`` (its test top-1 classes, for
agreement) and ``metrics.json`` (written last: model name, sha256 of ``model.pt``, val/test top-1). A
distill run directory has the same files, so a distilled student (TAKD's assistant) is a teacher as is.

A checkpoint whose config states its sha256 is refused when the file has another; one that states its test
top-1 (``expected_top1``) is verified first (:func:`verify_teacher`, the workflow's ``verify_teacher`` job).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.nn as nn

from kdbench._util import sha256_file, write_json_atomic
from kdbench.config import Config
from kdbench.data.shards import read_manifest
from kdbench.data.stream import open_split
from kdbench.errors import CheckpointError, ConfigError
from kdbench.evaluate import predict, topk_accuracy
from kdbench.meta import data_info
from kdbench.methods.base import create_method
from kdbench.modeldir import load_checkpoint, save_model_dir
from kdbench.models import create_model, model_info
from kdbench.numerics import Numerics
from kdbench import distributed
from kdbench.runtime import provenance, seed_everything, setup
from kdbench.train.checkpoint import CHECKPOINT_FILE, Checkpointing
from kdbench.train.loop import fit

_logger = logging.getLogger(__name__)



def _prepare(cfg: Config, name: str, data_dir: Path, splits: tuple[str, ...]) -> tuple:
    """What training, loading and verifying teacher ``name`` share, in this order (the random state too).

    Returns:
        ``(device, DataInfo, image size, the DataConfig that says how the data is read, the opened splits,
        the model initialised with seed 0 on the device, its Numerics)``.
    """
    tcfg = cfg.teachers[name]
    device = setup(cfg.runtime)
    data = data_info(read_manifest(data_dir))
    image_size = tcfg.train.image_size or data.image_size
    read = tcfg.data or cfg.data  # how this data is read (streamed or in memory)
    opened = tuple(open_split(data_dir, split, read) for split in splits)
    seed_everything(0)
    model = create_model(tcfg.model, data.num_classes, data.in_chans, image_size).to(device)
    numerics = Numerics.of(tcfg.train)
    numerics.model(model)
    return device, data, image_size, read, opened, model, numerics


def _load_teacher_checkpoint(cfg: Config, name: str, model: nn.Module) -> dict:
    """Loads teacher ``name``'s checkpoint into ``model``, refusing a file whose sha256 is not the one the config
    states (``teachers.<name>.sha256``).

    Returns:
        What the teacher's ``metrics.json`` records of it: source, checkpoint path and its sha256.

    Raises:
        CheckpointError: the digest differs (naming the file, both digests and the fix), the file is missing or
            does not match the model.
    """
    tcfg = cfg.teachers[name]
    path = Path(tcfg.checkpoint)
    digest = sha256_file(path) if path.is_file() else None  # a missing file: load_checkpoint names the fix
    if digest is not None and tcfg.sha256 is not None and digest != tcfg.sha256:
        raise CheckpointError(
            f"{cfg.source}: teacher checkpoint {path} has sha256 {digest}, but key 'teachers.{name}.sha256' states"
            f" {tcfg.sha256}. Fix: make sure {path} is the intended file (not another download, version or an"
            f" overwritten copy: compare with the digest where it was published), or, if this file is the one you"
            f" mean, set 'teachers.{name}.sha256' to {digest}"
        )
    load_checkpoint(model, path, tcfg.model)
    return {"source": "checkpoint", "checkpoint": str(tcfg.checkpoint), "checkpoint_sha256": digest}


def train_teacher(cfg: Config, name: str, data_dir: Path, out_dir: Path, checkpoint_every: int = 1) -> dict:
    """Trains (or loads) teacher ``name`` of the config and writes its teacher directory.

    The teacher trains with cross-entropy on a fresh view in every epoch (view recipe of its protocol with
    ``count = epochs``), initialised with seed 0. Training keeps an epoch checkpoint every ``checkpoint_every``
    epochs (0: none) in ``out_dir``, resumes from it when it exists, and deletes it once ``metrics.json`` is
    written (:mod:`kdbench.train.checkpoint`). Its training and evaluation run in the numerics of its own
    ``train`` protocol (``precision``, ``channels_last``; not inherited from the students' protocol).
    """
    tcfg = cfg.teachers[name]
    protocol = tcfg.train
    device, data, image_size, read, (val, test), model, numerics = _prepare(cfg, name, data_dir, ("val", "test"))
    extra: dict = {"teacher": name}
    checkpoint = None
    if tcfg.checkpoint:
        extra.update(_load_teacher_checkpoint(cfg, name, model))
    else:
        protocol = dataclasses.replace(protocol, views=dataclasses.replace(protocol.views, count=protocol.epochs))
        train = open_split(data_dir, "train", read)
        info = model_info(model, tcfg.model, data.in_chans, image_size)
        ce = create_method("baseline", {}, teacher=None, student=info, data=data)
        checkpoint = Checkpointing(out_dir / CHECKPOINT_FILE, {
            "job": "teacher", "teacher": name, "model": tcfg.model, "protocol_hash": protocol.hash(),
            "data_manifest_sha256": sha256_file(data_dir / "manifest.json"),
        }, checkpoint_every)
        result = fit(model, ce, train, {"val": val}, data, protocol, seed=0, device=device,
                     epochs_log=out_dir / "epochs.jsonl", label=f"teacher {name}", checkpoint=checkpoint,
                     batch_key=f"teachers.{name}.train.batch_size")
        extra.update(source="trained", protocol=protocol, protocol_hash=protocol.hash(), train_time_s=result.train_time_s)
        if distributed.world().size > 1:  # (one process: metrics.json as before)
            extra["parallel"] = distributed.describe(protocol.batch_size, protocol.sync_batchnorm)
    metrics, _ = save_model_dir(out_dir, model, tcfg.model, test, val, data, image_size, protocol.eval_batch_size, device,
                                extra, numerics)
    if checkpoint is not None:
        checkpoint.discard()
    _logger.info("teacher %s: test top-1 %.2f%% (val %.2f%%)", name, metrics["test_top1"], metrics["val_top1"])
    return metrics




VERIFY_SLACK = 1e-9
"""Points added to ``top1_tolerance`` so that a difference of exactly the tolerance passes despite float rounding."""


def verify_teacher(cfg: Config, name: str, data_dir: Path, out: Path) -> dict:
    """Checks teacher ``name``'s checkpoint against the test top-1 its config states (``expected_top1``).

    The checkpoint is loaded exactly as :func:`train_teacher` loads it (same model, input size, numerics and
    sha256 check) and evaluated on the test split as the teacher directory's ``metrics.json`` is. Within
    ``top1_tolerance`` points it writes ``out`` (JSON: expected, measured, tolerance, sha256, verdict,
    provenance); otherwise it writes nothing and raises.

    Returns:
        The verification (what ``out`` holds).

    Raises:
        ConfigError: the teacher has no checkpoint with an ``expected_top1``.
        CheckpointError: the accuracy is off by more than the tolerance (naming the teacher, the file, the
            numbers and the fix), or the checkpoint's sha256 differs from the stated one.
    """
    tcfg = cfg.teachers[name]
    if not tcfg.checkpoint or tcfg.expected_top1 is None:
        raise ConfigError(f"{cfg.source}: teacher {name!r} states no accuracy to verify: it needs 'checkpoint' and"
                          f" 'expected_top1' (key 'teachers.{name}.expected_top1')")
    device, data, image_size, _, (test,), model, numerics = _prepare(cfg, name, data_dir, ("test",))
    loaded = _load_teacher_checkpoint(cfg, name, model)
    logits = predict(model, test, data, image_size, tcfg.train.eval_batch_size, device, numerics)
    measured = topk_accuracy(logits, test.labels, (1,))[1]
    difference = measured - tcfg.expected_top1
    ok = abs(difference) <= tcfg.top1_tolerance + VERIFY_SLACK
    result = {
        "teacher": name, "model": tcfg.model, **loaded, "sha256_stated": tcfg.sha256,
        "expected_top1": tcfg.expected_top1, "top1_tolerance": tcfg.top1_tolerance, "measured_top1": measured,
        "difference": difference, "test_images": len(test), "verdict": "passed" if ok else "failed",
        "config": cfg.source, "provenance": provenance(device),
    }
    if not ok:
        where = f"teachers.{name}"
        raise CheckpointError(
            f"{cfg.source}: teacher {name!r} ({tcfg.model}) from checkpoint {tcfg.checkpoint} (sha256"
            f" {loaded['checkpoint_sha256']}) measures test top-1 {measured:.2f}% on {len(test)} test images, but"
            f" '{where}.expected_top1' is {tcfg.expected_top1:.2f}%: off by {difference:+.2f} points, more than"
            f" '{where}.top1_tolerance' ({tcfg.top1_tolerance:.2f}). Nothing that depends on this teacher runs. Fix:"
            f" check the checkpoint (the intended file? trained on this dataset, its classes in this order?) and"
            f" the preprocessing it expects (normalisation, input size '{where}.train.image_size'; 'data.test_limit'"
            f" evaluates a subset), or, if {measured:.2f}% is right, correct '{where}.expected_top1' (or widen"
            f" '{where}.top1_tolerance') in the config"
        )
    write_json_atomic(out, result)
    _logger.info("teacher %s: test top-1 %.2f%%, expected %.2f%% ± %.2f: passed", name, measured,
                 tcfg.expected_top1, tcfg.top1_tolerance)
    return result
