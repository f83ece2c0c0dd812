"""Teachers: trained under their protocol, or loaded from a local checkpoint; saved as a teacher directory.

A teacher directory holds ``model.pt`` (the state dict), ``predictions.npy`` (its test top-1 classes, for
agreement) and ``metrics.json`` (written last: model name, sha256 of ``model.pt``, val/test top-1). A
distill run directory has the same files, so a distilled student (TAKD's assistant) is a teacher as is.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from kdbench._util import sha256_file
from kdbench.config import Config
from kdbench.data.shards import read_manifest
from kdbench.data.stream import open_split
from kdbench.meta import data_info
from kdbench.methods.base import create_method
from kdbench.modeldir import load_checkpoint, save_model_dir
from kdbench.models import create_model, model_info
from kdbench.runtime import seed_everything, setup
from kdbench.train.checkpoint import CHECKPOINT_FILE, Checkpointing
from kdbench.train.loop import fit

_logger = logging.getLogger(__name__)



def train_teacher(cfg: Config, name: str, data_dir: Path, out_dir: Path, checkpoint_every: int = 1) -> dict:
    """Trains (or loads) teacher ``name`` of the config and writes its teacher directory.

    The teacher trains with cross-entropy on a fresh view in every epoch (view recipe of its protocol with
    ``count = epochs``), initialised with seed 0. Training keeps an epoch checkpoint every ``checkpoint_every``
    epochs (0: none) in ``out_dir``, resumes from it when it exists, and deletes it once ``metrics.json`` is
    written (:mod:`kdbench.train.checkpoint`).
    """
    tcfg = cfg.teachers[name]
    device = setup(cfg.runtime)
    manifest = read_manifest(data_dir)
    data = data_info(manifest)
    protocol = tcfg.train
    image_size = protocol.image_size or data.image_size
    read = tcfg.data or cfg.data  # how this data is read (streamed or in memory)
    val, test = open_split(data_dir, "val", read), open_split(data_dir, "test", read)
    seed_everything(0)
    model = create_model(tcfg.model, data.num_classes, data.in_chans, image_size).to(device)
    extra: dict = {"teacher": name}
    checkpoint = None
    if tcfg.checkpoint:
        load_checkpoint(model, Path(tcfg.checkpoint), tcfg.model)
        extra.update(source="checkpoint", checkpoint=str(tcfg.checkpoint), checkpoint_sha256=sha256_file(tcfg.checkpoint))
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
                     epochs_log=out_dir / "epochs.jsonl", label=f"teacher {name}", checkpoint=checkpoint)
        extra.update(source="trained", protocol=protocol, protocol_hash=protocol.hash(), train_time_s=result.train_time_s)
    metrics, _ = save_model_dir(out_dir, model, tcfg.model, test, val, data, image_size, protocol.eval_batch_size, device, extra)
    if checkpoint is not None:
        checkpoint.discard()
    _logger.info("teacher %s: test top-1 %.2f%% (val %.2f%%)", name, metrics["test_top1"], metrics["val_top1"])
    return metrics


