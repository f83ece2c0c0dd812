"""One distillation job: (teacher, student, method, seed) under the config's protocol -> a run record.

The job reads as its steps: open the inputs (data, teacher, method) -> build the student and check the pair
-> connect the teacher's outputs (stores, or the live teacher) -> :func:`~kdbench.train.loop.fit` -> evaluate
(top-1; retrieval mAP when the protocol asks for it, :func:`_retrieval`) and write the record. The record
(``record.json``, a :class:`~kdbench.record.RunRecord`, written last) holds identity, protocol, final metrics
(last-epoch test top-1 is the headline; the best epoch is selected on val only), cost and provenance;
``epochs.jsonl`` beside it holds the per-epoch metrics, and ``model.pt`` / ``predictions.npy`` /
``metrics.json`` make the run directory usable as a teacher directory (TAKD's assistant).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kdbench import distributed
from kdbench._util import read_json, sha256_file, stable_hash, write_json_atomic
from kdbench.cache.inputs import JobInputs, open_inputs
from kdbench.cache.source import CachedTeacher, LiveTeacher
from kdbench.cache.store import ShardedTeacherStore, StoreError, TeacherStore
from kdbench.config import Config, hashed_entry
from kdbench.errors import ConfigError
from kdbench.evaluate import agreement, embed
from kdbench.methods.base import METHODS, DistillMethod
from kdbench.modeldir import CANDIDATES_FILE, SEARCH_DIR, SELECTION_FILE, load_checkpoint, save_model_dir
from kdbench.models import ModelInfo, create_model, model_info
from kdbench.record import Cost, Final, Identity, RunRecord, Views, write_record
from kdbench.retrieval import METRICS, retrieval_map
from kdbench.runtime import plugin_provenance, provenance, seed_everything
from kdbench.taps import normalize_tap, tap_dirname
from kdbench.train.checkpoint import CHECKPOINT_FILE, Checkpointing
from kdbench.train.loop import FitResult, TeacherSource, fit
from kdbench.tuning import TRIAL_FILE, trial_config, trial_rows

_logger = logging.getLogger(__name__)


def run_identity(cfg: Config, teacher: str, student: str, label: str, seed: int) -> Identity:
    entry = cfg.methods[label]
    method_cls = METHODS.get(entry.method)
    return Identity(
        config=cfg.name,
        dataset=cfg.data.source,
        teacher=teacher,
        teacher_model=cfg.teachers[teacher].model,
        student=student,
        method=label,
        method_name=entry.method,
        params=dataclasses.asdict(method_cls.make_config(entry.params)),
        seed=seed,
    )


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
    init: Path | None = None,
    checkpoint_every: int = 1,
    tuning: dict | None = None,
) -> RunRecord:
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
        stores: Tap (declared or normalised) -> store directory of the cached teacher outputs.
        out_dir: The run directory.
        init: A state dict the student starts from instead of its seeded initialisation (AMD's fine-tuned
            assistant starts from its searched weights).
        checkpoint_every: Write ``out_dir/checkpoint.pt`` every this many epochs (0: never); a job that finds
            its own checkpoint resumes from it (:mod:`kdbench.train.checkpoint`), and deletes it once the
            record is written.
        tuning: A final tuned run's selection summary (:func:`kdbench.tuning.tuning_summary`): ``cfg`` then
            carries the selected values, and the record keeps the summary (its ``tuning``).
    """
    wall0 = time.perf_counter()
    run = _prepare(cfg, teacher, student, label, seed, data_dir, teacher_dir, stores, out_dir, init, checkpoint_every,
                   "distill")
    if isinstance(run, RunRecord):
        return run
    job = run.job
    result = fit(run.model, run.method, run.train, {"val": job.split("val"), "test": job.split("test")}, job.data,
                 cfg.protocol.for_student(student), seed, job.device, run.source, out_dir / "epochs.jsonl",
                 label=f"{teacher}/{student}/{label}/seed{seed}", checkpoint=run.checkpoint)
    record = _record(job, run.identity, run.method, run.model, run.s_info, result, teacher_dir, run.store_manifests,
                     stores, out_dir, wall0, tuning)
    if distributed.is_writer():  # one writer (kdbench.distributed); the record is the job's last write
        write_record(out_dir / "record.json", record)
        run.checkpoint.discard()
    _logger.info("%s/%s/%s/seed%d: test top-1 %.2f%% (last epoch), %.0fs", teacher, student, label, seed,
                 record.final.test_top1, record.cost.wall_time_s)
    return record


@dataclasses.dataclass
class _Prepared:
    """A job ready to train: inputs, student, method, teacher source and checkpointing."""

    job: JobInputs
    identity: Identity
    model: nn.Module
    s_info: ModelInfo
    method: DistillMethod
    train: Any
    rows: np.ndarray | None  # a trial's training subset (tune.budget.train_limit), None: every row
    source: TeacherSource | None
    store_manifests: dict[str, str]
    checkpoint: Checkpointing


def _prepare(cfg: Config, teacher: str, student: str, label: str, seed: int, data_dir: Path, teacher_dir: Path | None,
             stores: dict[str, Path], out_dir: Path, init: Path | None, checkpoint_every: int,
             kind: str) -> _Prepared | RunRecord:
    """Everything before :func:`fit`, shared by a distill job and a trial; a skipped cell's record instead."""
    entry = cfg.methods[label]
    method_cls: type[DistillMethod] = METHODS.get(entry.method)
    mcfg = method_cls.make_config(entry.params)
    job = open_inputs(cfg, data_dir, teacher_dir, load_model=bool(method_cls.teacher_taps(mcfg)))
    identity = run_identity(cfg, teacher, student, label, seed)
    model, s_info = _build_student(job, student, seed)
    if init is not None:
        load_checkpoint(model, init, student)
    _check_retrieval_tap(cfg, student, s_info)
    t_info = model_info(job.teacher, job.tmeta["model"], job.data.in_chans, job.tmeta["image_size"]) if job.teacher else None
    reason = method_cls.compatibility(mcfg, t_info, s_info)
    if reason:
        return _skip(out_dir, identity, cfg, reason)
    seed_everything(seed)  # adapters are seeded too, independently of the teacher's loading
    method = method_cls(mcfg, teacher=t_info, student=s_info, data=job.data)
    if job.teacher is not None:
        method.bind_teacher_weights(job.teacher)
    train = job.split("train")
    rows = trial_rows(cfg.tune, len(train)) if kind == "trial" else None
    source, store_manifests = _teacher_source(job, method, label, train, stores, t_info)
    checkpoint = Checkpointing(out_dir / CHECKPOINT_FILE, {
        "job": kind, "config_hash": config_hash(cfg, label), "protocol_hash": cfg.protocol.hash(),
        "teacher": teacher, "student": student, "method": label, "seed": seed,
        "teacher_sha256": job.tmeta["sha256"] if job.tmeta else None,
        "data_manifest_sha256": job.data_manifest_sha256(), "init_sha256": sha256_file(init) if init else None,
        **({} if rows is None else {"train_rows": stable_hash(rows.tolist())}),
    }, checkpoint_every)
    return _Prepared(job, identity, model, s_info, method, train, rows, source, store_manifests, checkpoint)


def run_trial(
    cfg: Config,
    teacher: str,
    student: str,
    label: str,
    trial: int,
    seed: int,
    data_dir: Path,
    teacher_dir: Path | None,
    stores: dict[str, Path],
    out_dir: Path,
    checkpoint_every: int = 1,
) -> dict:
    """One trial of a tuned cell (:mod:`kdbench.tuning`): the cell's job with trial ``trial``'s values and the
    tuning budget's epochs, trained on the training split and scored on val only. It never opens the test
    split: evaluation after every epoch is on val, and a retrieval score uses val as the queries.

    Args:
        cfg: The table's resolved config (with its ``tune`` section).
        trial: The trial's index (0: the configured values).
        seed: One of the budget's seeds.
        Others: as :func:`run_distill`.

    Returns:
        The trial record written to ``out_dir/trial.json``.
    """
    wall0 = time.perf_counter()
    tcfg, values = trial_config(cfg, teacher, student, label, trial)
    where = f"{teacher}/{student}/{label}/trial{trial}/seed{seed}"
    run = _prepare(tcfg, teacher, student, label, seed, data_dir, teacher_dir, stores, out_dir, None,
                   checkpoint_every, "trial")
    if isinstance(run, RunRecord):
        raise ConfigError(f"{cfg.source}: {where}: the cell cannot run ({run.skip_reason}); it is not planned")
    job = run.job
    rows = run.rows
    result = fit(run.model, run.method, run.train, {"val": job.split("val")}, job.data,
                 tcfg.protocol.for_student(student), seed, job.device, run.source, out_dir / "epochs.jsonl",
                 label=where, checkpoint=run.checkpoint, rows=rows)
    scores = {"val_top1": result.history[-1]["val_top1"]}
    if cfg.tune.metric != "val_top1":
        retrieval, _ = _retrieval(job, run.model, queries="val")
        scores.update({f"val_{k}": v for k, v in retrieval.items() if k.startswith("map_")})
    record = {
        "teacher": teacher, "student": student, "label": label, "trial": trial, "seed": seed, "values": values,
        "metric": cfg.tune.metric, "score": scores[cfg.tune.metric], **scores, "epochs": tcfg.protocol.epochs,
        "train_images": len(run.train) if rows is None else len(rows),
        "history": result.history, "wall_time_s": time.perf_counter() - wall0 + result.resumed_train_s,
        "train_time_s": result.train_time_s,
        "provenance": {**provenance(job.device, job.numerics), "config_file": cfg.source,
                       "data_manifest_sha256": job.data_manifest_sha256(),
                       "teacher_sha256": job.tmeta["sha256"] if job.tmeta else None,
                       "store_manifests": run.store_manifests,
                       "parallel": distributed.describe(tcfg.protocol.batch_size, tcfg.protocol.sync_batchnorm),
                       "plugins": plugin_provenance(cfg.methods[label].method,
                                                    [cfg.teachers[teacher].model, student])},
    }
    if distributed.is_writer():
        write_json_atomic(out_dir / TRIAL_FILE, record)
        run.checkpoint.discard()
    _logger.info("%s: %s %.2f with %s, %.0fs", where, cfg.tune.metric, record["score"], values,
                 record["wall_time_s"])
    return record


def config_hash(cfg: Config, label: str) -> str:
    """The hash of everything in the config a run's numbers depend on (the record's ``config_hash``)."""
    return stable_hash([cfg.protocol, cfg.data, cfg.cache, hashed_entry(cfg.methods[label])])


def _build_student(job: JobInputs, student: str, seed: int) -> tuple[nn.Module, ModelInfo]:
    image_size = job.cfg.protocol.image_size or job.data.image_size
    seed_everything(seed)
    model = create_model(student, job.data.num_classes, job.data.in_chans, image_size).to(job.device)
    return model, model_info(model, student, job.data.in_chans, image_size)


def _check_retrieval_tap(cfg: Config, student: str, s_info: ModelInfo) -> None:
    """Refuses, before training, a ``protocol.retrieval_tap`` whose feature index the student does not have."""
    tap = cfg.protocol.retrieval_tap
    if tap is not None:
        try:
            normalize_tap(tap, len(s_info.feature_shapes))
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: key 'protocol.retrieval_tap': {e} (student {student}); choose"
                              " 'pre_logits', 'logits' or a feature index every student has") from None


def _skip(out_dir: Path, identity: Identity, cfg: Config, reason: str) -> RunRecord:
    record = RunRecord(status="skipped", skip_reason=reason, identity=identity, protocol=cfg.protocol,
                       protocol_hash=cfg.protocol.hash())
    if distributed.is_writer():
        write_record(out_dir / "record.json", record)
    _logger.warning("skipped %s: %s", identity, reason)
    return record


def _teacher_source(
    job: JobInputs, method: DistillMethod, label: str, train, stores: dict[str, Path], t_info: ModelInfo | None
) -> tuple[TeacherSource | None, dict[str, str]]:
    """Where the method's teacher taps come from: the stores (the teacher never runs) or the live teacher.

    ``t_info`` is the teacher's metadata (its stage count normalises the declared taps to store names).
    """
    taps = method.teacher_taps(method.cfg)
    if not taps:
        return None, {}
    reqs = method.requirements(method.cfg)
    if reqs.live_teacher or reqs.live_teacher_tail:  # the tail alone still reads its taps from the stores
        method.live_teacher_module(job.teacher)
    if reqs.live_teacher or not stores:
        renderer = None if job.streaming else job.renderer(train)  # streaming: the stream renders its inputs
        return LiveTeacher(job.teacher, frozenset(taps), renderer, job.tmeta["image_size"], job.numerics), {}
    return cached_teacher(job, taps, stores, len(t_info.feature_shapes), f"method {label!r}")


def cached_teacher(
    job: JobInputs, taps, stores: dict[str, Path], n_stages: int, reader: str
) -> tuple[CachedTeacher, dict[str, str]]:
    """Opens (and checks against the job's teacher, views and cache policy) the store of every tap.

    Args:
        job: The job's inputs.
        taps: Declared teacher taps.
        stores: Tap (declared or normalised) -> store directory.
        n_stages: The teacher's feature stages (normalises negative feature indices).
        reader: Who reads them, for the error message.

    Returns:
        ``(source, tap -> sha256 of the store's manifest)``.
    """
    opened, manifests = {}, {}
    for tap in taps:
        norm = normalize_tap(tap, n_stages)
        store_dir = stores.get(tap, stores.get(norm))  # keyed by the declared or the normalised tap
        if store_dir is None:
            raise StoreError(f"{reader} reads teacher tap {tap!r} but no store of it was given;"
                             f" pass --store DIR with a store directory named {tap_dirname(norm)!r}")
        expect, verify = job.store_identity(norm), job.cfg.cache.verify
        if job.streaming:  # read shard by shard, in step with the streamed data shards
            opened[tap] = ShardedTeacherStore.open(store_dir, expect, verify, cache_shards=2 * job.cfg.data.workers + 2)
        else:
            opened[tap] = TeacherStore.open(store_dir, expect, verify=verify)
        manifests[tap] = sha256_file(Path(store_dir) / "manifest.json")
    return CachedTeacher(opened), manifests


RETRIEVAL_TOP_K = 100  # the official top-100 precision


def _retrieval(job: JobInputs, model: nn.Module, queries: str = "test") -> tuple[dict[str, float | None], float | None]:
    """Retrieval mAP and top-100 precision of the trained student, when the protocol asks for them.

    The embedding is the student's output at ``protocol.retrieval_tap`` (a feature map globally
    average-pooled, :func:`kdbench.evaluate.embed`) on whole, un-augmented images rendered as evaluation
    renders them. Database = the training split (the images the student trained on, val held out), queries =
    the test split in its order; each metric (cosine, Euclidean) is InDistill's official protocol, exact and
    chunked (:func:`kdbench.retrieval.retrieval_map`, default chunk), on the job's device.

    Returns:
        ``({"map_cosine", "map_euclidean", "p100_cosine", "p100_euclidean"}, seconds)``: the :class:`Final`
        fields (all ``None`` and no time when the protocol does not measure retrieval; ``p100_*`` ``None``
        when the database has fewer than 100 images) and the step's wall time.
    """
    tap = job.cfg.protocol.retrieval_tap
    fields: dict[str, float | None] = {f"{k}_{m}": None for k in ("map", "p100") for m in METRICS}
    if tap is None:
        return fields, None
    t0 = time.perf_counter()
    protocol = job.cfg.protocol
    image_size = protocol.image_size or job.data.image_size
    db, queries = job.split("train"), job.split(queries)  # a trial's queries are val
    db_emb = embed(model, db, job.data, image_size, protocol.eval_batch_size, job.device, tap, job.numerics).to(job.device)
    q_emb = embed(model, queries, job.data, image_size, protocol.eval_batch_size, job.device, tap, job.numerics)
    top_k = min(RETRIEVAL_TOP_K, len(db))
    for metric in METRICS:
        result = retrieval_map(q_emb, queries.labels, db_emb, db.labels, metric=metric, top_k=top_k)
        fields[f"map_{metric}"] = result.map
        fields[f"p100_{metric}"] = result.precision_at_k if top_k == RETRIEVAL_TOP_K else None
    seconds = time.perf_counter() - t0
    _logger.info("retrieval at %s (%d queries x %d database images, %d-d): mAP cosine %.2f, Euclidean %.2f"
                 " in %.2f s", tap, len(queries), len(db), db_emb.shape[1], fields["map_cosine"],
                 fields["map_euclidean"], seconds)
    return fields, seconds


def _assistant_cost(teacher_dir: Path | None) -> tuple[float | None, int | None]:
    """``(seconds, candidates)`` the job's own assistant cost: its training run (TAKD, AMD's fine-tuning) plus,
    for a searched assistant (AMD), the search that produced it and how many candidates it trained;
    ``(None, None)`` when the job distils from a teacher, not an assistant."""
    if teacher_dir is None or not (teacher_dir / "record.json").exists():
        return None, None
    seconds = read_json(teacher_dir / "record.json", "assistant run record")["cost"]["wall_time_s"]
    search = teacher_dir / SEARCH_DIR / CANDIDATES_FILE
    if not search.exists():
        return seconds, None
    summary = read_json(search, "assistant search summary")
    return seconds + summary["wall_time_s"], len(summary["candidates"])


def _assistant_pick(teacher_dir: Path | None) -> dict:
    """For a searched assistant (AMD): the provenance of its pick, the share of noisy re-selections that keep it
    (:func:`kdbench.tasearch.pick_stability`; the leaderboard notes a pick that is not stable); else nothing."""
    path = teacher_dir / SEARCH_DIR / SELECTION_FILE if teacher_dir else None
    if path is None or not path.exists():
        return {}
    stability = read_json(path, "assistant selection").get("stability")
    return {"assistant_pick_share": stability["share"]} if stability else {}


def _record(
    job: JobInputs, identity: Identity, method: DistillMethod, model: nn.Module, s_info: ModelInfo,
    result: FitResult, teacher_dir: Path | None, store_manifests: dict[str, str], stores: dict[str, Path],
    out_dir: Path, wall0: float, tuning: dict | None = None,
) -> RunRecord:
    """Evaluates the trained student (saving it as a model directory) and assembles the run record."""
    cfg, protocol = job.cfg, job.cfg.protocol
    image_size = protocol.image_size or job.data.image_size
    run = f"{identity.teacher}/{identity.student}/{identity.method}/seed{identity.seed}"
    meta, test_logits = save_model_dir(out_dir, model, identity.student, job.split("test"), job.split("val"),
                                       job.data, image_size, protocol.eval_batch_size, job.device, {"run": run},
                                       job.numerics)
    retrieval, retrieval_time = _retrieval(job, model)
    hist = result.history
    best = max(range(len(hist)), key=lambda i: hist[i]["val_top1"])
    t_pred = np.load(teacher_dir / "predictions.npy") if teacher_dir else None
    tmeta = job.tmeta
    t_top1 = tmeta["test_top1"] if tmeta else None
    if t_pred is not None and len(t_pred) != len(test_logits):
        # The teacher was evaluated on another test_limit (a teacher shared from a table with all test images):
        # test keys are the source's test positions, so both saw a prefix; compare them on the shorter one.
        n = min(len(t_pred), len(test_logits))
        t_pred, test_logits = t_pred[:n], test_logits[:n]
        t_top1 = 100.0 * float(np.mean(t_pred == np.asarray(job.split("test").labels[:n])))
    assistant_time, candidates = _assistant_cost(teacher_dir)
    return RunRecord(
        status="ok",
        identity=identity,
        protocol=protocol,
        protocol_hash=tuning["protocol_hash"] if tuning else protocol.hash(),  # tuned: the table's, as its rows
        views=Views(count=protocol.views.count, epochs=protocol.epochs, repeats=protocol.epochs > protocol.views.count),
        final=Final(
            test_top1=meta["test_top1"],
            test_top5=meta["test_top5"],
            val_top1=hist[-1]["val_top1"],
            best_epoch=best,
            best_val_top1=hist[best]["val_top1"],
            test_top1_at_best_val=hist[best]["test_top1"],
            teacher_agreement=agreement(test_logits, torch.from_numpy(t_pred).long()) if t_pred is not None else None,
            teacher_test_top1=t_top1,
            **retrieval,
        ),
        cost=Cost(
            wall_time_s=time.perf_counter() - wall0 + result.resumed_train_s,
            train_time_s=result.train_time_s,
            student_params=s_info.num_params,
            extra_params=method.extra_parameters(),
            teacher_forward=result.teacher_forward,
            student_forward=result.student_forward,
            cache_bytes_read=result.cache_bytes_read,
            assistant_time_s=assistant_time,
            assistant_candidates=candidates,
            retrieval_time_s=retrieval_time,
        ),
        requirements=dataclasses.asdict(method.requirements(method.cfg)),
        declarations=type(method).declarations(method.cfg),
        provenance={
            **provenance(job.device, job.numerics),
            "config_file": cfg.source,
            "config_hash": config_hash(cfg, identity.method),
            "teacher_sha256": tmeta["sha256"] if tmeta else None,
            "data_manifest_sha256": job.data_manifest_sha256(),
            "store_manifests": store_manifests,
            "model_sha256": meta["sha256"],
            "parallel": distributed.describe(protocol.batch_size, protocol.sync_batchnorm),
            "plugins": plugin_provenance(identity.method_name, [identity.teacher_model, identity.student]),
            **({"method_audit": audit} if (audit := method.audit()) else {}),
            **_assistant_pick(teacher_dir),
            **({"resumed_at_epochs": result.resumed_at} if result.resumed_at else {}),
        },
        inputs={"data": str(job.data_dir), "teacher_dir": str(teacher_dir) if teacher_dir else None,
                "stores": {tap: str(d) for tap, d in stores.items()}},
        epochs_file="epochs.jsonl",
        tuning=tuning,
    )
