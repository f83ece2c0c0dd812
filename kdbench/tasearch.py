"""AMD's teacher-assistant search, one function per workflow rule (:mod:`kdbench.methods.amd` has the method).

* :func:`run_search`: prune the teacher into nested candidates (:mod:`kdbench.prune`) and train them jointly
  with shared weights (sandwich rule: the largest candidate plus ``sandwich`` random ones per step, each with
  AMD's loss against the frozen teacher, whose outputs come from the per-view stores); then recompute each
  candidate's BatchNorm statistics and save it as a model directory (``candidates/<k>/``) with its validation
  accuracy. Writes ``candidates.json`` last. Preemption-safe: a killed or stopped search resumes at its last
  joint epoch, or after its last saved candidate (``checkpoint.pt``, :mod:`kdbench.train.checkpoint`).
* :func:`run_select`: ``npsd-approx`` (:func:`npsd_approx`), a pure function of the logged accuracies ->
  ``selection.json``.
* :func:`run_finetune`: the selected candidate, from its searched weights, trained further with AMD's loss
  against the teacher -> the assistant directory (an ordinary teacher for the stores and the students).
* :func:`run_oracle`: a short candidate -> student run (live candidate) with one seed, for the audit
  (:mod:`kdbench.report.audit`: the search's numbers next to the oracle's, the verdict, the pick's stability).
* :func:`pick_stability`: how often ``npsd-approx`` keeps its pick under the joint accuracies' evaluation noise
  (written into ``selection.json`` by :func:`run_select`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from kdbench._util import read_json, write_json_atomic
from kdbench.cache.inputs import open_inputs
from kdbench.config import Config
from kdbench.distill import cached_teacher, config_hash, run_distill
from kdbench.errors import ConfigError, NonFiniteLossError
from kdbench.methods.amd import FEATURE, AMDConfig, amd_terms
from kdbench.methods.base import METHODS
from kdbench.modeldir import CANDIDATES_FILE, SELECTION_FILE, save_model_dir
from kdbench.models import create_model
from kdbench.prune import CLASSIFIER_INPUT, Candidate, assistant_grid, param_count, slice_state, sort_channels
from kdbench.runtime import seed_everything
from kdbench.taps import compute_taps
from kdbench.train.checkpoint import (
    CHECKPOINT_FILE,
    Checkpointing,
    Preempted,
    rng_state,
    set_rng_state,
    stop_requested,
    stopped,
)
from kdbench.train.loop import epoch_order, view_targets
from kdbench.train.optim import build_optimizer, lr_factor

_logger = logging.getLogger(__name__)

CRITERION = "npsd-approx"


def amd_config(cfg: Config, label: str) -> AMDConfig:
    entry = cfg.methods[label]
    if entry.method != "amd":
        raise ConfigError(f"{cfg.source}: method label {label!r} is {entry.method!r}, not 'amd'")
    return METHODS.get("amd").make_config(entry.params)


def with_epochs(cfg: Config, epochs: int) -> Config:
    """The config with the protocol's epochs replaced (a search stage's own budget)."""
    return dataclasses.replace(cfg, protocol=dataclasses.replace(cfg.protocol, epochs=epochs))


def grid(
    cfg: Config, teacher: str, label: str, num_classes: int, in_chans: int, image_size: int
) -> list[Candidate]:
    """The table's candidate grid (:func:`kdbench.prune.assistant_grid`)."""
    return assistant_grid(
        cfg.teachers[teacher].model,
        list(cfg.students_of(teacher)),
        num_classes,
        in_chans,
        image_size,
        amd_config(cfg, label).grid_step,
    )


class _Tapped(nn.Module):
    """A model whose forward returns its logits and last feature stage (for :func:`functional_call`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return compute_taps(self.model, x, {"logits", FEATURE})


# --- joint training ----------------------------------------------------------------------------------------


def run_search(
    cfg: Config,
    teacher: str,
    label: str,
    data_dir: Path,
    teacher_dir: Path,
    stores: dict[str, Path],
    out_dir: Path,
    checkpoint_every: int = 1,
) -> dict:
    """Prunes the teacher into the grid's candidates, trains them jointly and writes ``out_dir``.

    The search keeps its progress in ``out_dir/checkpoint.pt`` with :mod:`kdbench.train.checkpoint`'s machinery
    (atomic writes, the job's fingerprint, SIGUSR1), in two units: the joint training's epochs (every
    ``checkpoint_every``-th one, 0: none; the shared weights, the candidates' buffers, the optimiser, the step,
    the sandwich's and the global RNG states, the cost counters), then each candidate's recalibration,
    evaluation and model directory (its row is added to the checkpoint once ``candidates/<k>/`` is complete).
    A rerun resumes at the last joint epoch and skips the candidates saved; the candidate step draws no random
    numbers, so the result is the uninterrupted search's (on CPU bit for bit, the wall time apart). A checkpoint
    of another search (config, teacher, data or grid) is deleted with a warning naming the file and what differs,
    and the search starts over. A stop request stops it after the current step or candidate
    (:class:`~kdbench.train.checkpoint.Preempted`). The checkpoint is deleted once ``candidates.json`` is written.

    Returns:
        The summary written to ``candidates.json``.
    """
    wall0 = time.perf_counter()
    mcfg = amd_config(cfg, label)
    job = open_inputs(cfg, data_dir, teacher_dir)
    if job.streaming:
        raise ConfigError(
            f"{cfg.source}: method '{label}' searches its assistant with a joint-training loop that needs the training"
            f" split in memory, but key 'data.stream' makes the jobs on {data_dir} stream it (variable-size images,"
            " or stream: true). Fix: set 'data.stream' to false on fixed-size data, or remove the method"
        )
    device, data, p = job.device, job.data, cfg.protocol
    image_size = p.image_size or data.image_size
    cands = grid(cfg, teacher, label, data.num_classes, data.in_chans, image_size)
    shared = copy.deepcopy(job.teacher).eval()
    for q in shared.parameters():
        q.requires_grad_(True)
    orders = sort_channels(shared, torch.zeros(1, data.in_chans, image_size, image_size, device=device))
    feature_order = orders[CLASSIFIER_INPUT]  # the teacher's last-stage channels, most important first
    seed_everything(0)
    models = []
    for c in cands:
        m = _Tapped(_init_candidate(c.name, shared, data, image_size)).to(device)
        models.append(m)
    train = job.split("train")
    n_stages = len(job.teacher.feature_info)
    source, manifests = cached_teacher(
        job, {"logits", FEATURE}, stores, n_stages, f"AMD's search ({label!r})"
    )
    epochs = mcfg.epochs("joint", p.epochs)
    checkpoint = Checkpointing(
        out_dir / CHECKPOINT_FILE,
        {
            "job": "amd_search",
            "config_hash": config_hash(cfg, label),
            "teacher": teacher,
            "method": label,
            "teacher_sha256": job.tmeta["sha256"],
            "data_manifest_sha256": job.data_manifest_sha256(),
            "candidates": [c.name for c in cands],
        },
        checkpoint_every,
    )
    saved = checkpoint.load()
    rows = list(saved.get("rows", [])) if saved is not None else []  # the candidates saved, in grid order
    if saved is not None:
        wall0 -= saved["wall_time_s"]  # earlier runs' time, up to their last checkpoint
        _logger.info(
            "%s/%s/search: resuming after joint epoch %d/%d and %d of %d candidates from %s",
            teacher,
            label,
            saved["epochs_done"],
            epochs,
            len(rows),
            len(cands),
            checkpoint.path,
        )
    joint = _joint_train(
        shared,
        models,
        feature_order,
        train,
        job.renderer(train),
        source,
        with_epochs(cfg, epochs).protocol,
        mcfg,
        image_size,
        device,
        f"{teacher}/{label}/search",
        checkpoint,
        saved,
        wall0,
    )
    val, test = job.split("val"), job.split("test")
    for c, m in list(zip(cands, models))[len(rows) :]:
        if stop_requested():
            where = (
                f"{checkpoint.path} holds them; run the job again to resume"
                if checkpoint.every > 0
                else "no checkpoint holds them; run the job again to start over"
            )
            raise Preempted(
                f"{teacher}/{label}/search: stopped on request after the joint training and"
                f" {len(rows)} of {len(cands)} candidates; {where}"
            )
        model = m.model
        with torch.no_grad():
            for name, v in slice_state(
                dict(shared.named_parameters()), dict(model.named_parameters())
            ).items():
                model.get_parameter(name).copy_(v)
        _recalibrate_bn(model, train, job.renderer(train), mcfg.bn_batches, p.batch_size, image_size, device)
        cdir = out_dir / "candidates" / str(c.index)
        metrics, _ = save_model_dir(
            cdir,
            model,
            c.name,
            test,
            val,
            data,
            image_size,
            p.eval_batch_size,
            device,
            {"candidate": c.to_dict()},
        )
        rows.append(
            {
                **c.to_dict(),
                "val_top1": metrics["val_top1"],
                "test_top1": metrics["test_top1"],
                "dir": f"candidates/{c.index}",
            }
        )
        _logger.info(
            "candidate %d (%s, %.1f%% of the teacher): val top-1 %.2f%%",
            c.index,
            c.name,
            100 * c.ratio,
            metrics["val_top1"],
        )
        if checkpoint.every > 0:
            checkpoint.save({**joint, "rows": rows, "wall_time_s": time.perf_counter() - wall0})
    summary = {
        "teacher": job.tmeta["model"],
        "teacher_params": param_count(job.tmeta["model"], data.num_classes, data.in_chans, image_size),
        "teacher_val_top1": job.tmeta["val_top1"],
        "val_images": len(val),
        "teacher_sha256": job.tmeta["sha256"],
        "grid_step": mcfg.grid_step,
        "joint": {
            "epochs": epochs,
            "steps": joint["step"],
            "sandwich": mcfg.sandwich,
            "teacher_forward": joint["teacher_forward"],
            "cache_bytes_read": joint["cache_bytes_read"],
            "store_manifests": manifests,
        },
        "candidates": rows,
        "wall_time_s": time.perf_counter() - wall0,
    }
    write_json_atomic(out_dir / CANDIDATES_FILE, summary)
    checkpoint.discard()
    return summary


def _init_candidate(name: str, shared: nn.Module, data, image_size: int) -> nn.Module:
    """A candidate module holding the shared model's leading slices (its own copies of the BN buffers)."""
    model = create_model(name, data.num_classes, data.in_chans, image_size)
    model.load_state_dict(
        {k: v.detach().clone() for k, v in slice_state(shared.state_dict(), model.state_dict()).items()}
    )
    for q in model.parameters():
        q.requires_grad_(False)  # the trained weights are the shared ones, passed in by functional_call
    return model


def _joint_train(
    shared,
    models,
    feature_order,
    train,
    renderer,
    source,
    protocol,
    mcfg: AMDConfig,
    image_size,
    device,
    label,
    checkpoint: Checkpointing,
    saved: dict | None,
    wall0: float,
) -> dict:
    """The sandwich rule over shared weights, resumed from ``saved`` (a checkpoint of this search) if given.

    Saves ``checkpoint`` when due and stops when asked (:mod:`kdbench.train.checkpoint`), as
    :func:`~kdbench.train.loop.fit` does; ``wall0`` is the search's start (earlier runs' time included).

    Returns:
        The training's state at its end, as the checkpoint holds it (``step``: the number of steps).
    """
    params = dict(shared.named_parameters())
    optimizer = build_optimizer(params.values(), protocol)
    n = len(train)
    spe = math.ceil(n / protocol.batch_size)
    rng = random.Random(0)
    largest, others = len(models) - 1, list(range(len(models) - 1))
    step, first, base = 0, 0, (0, 0)
    if saved is not None:
        shared.load_state_dict(saved["shared"])
        for m, buffers in zip(models, saved["candidate_buffers"]):
            for name, v in buffers.items():
                m.get_buffer(name).copy_(v)
        optimizer.load_state_dict(saved["optimizer"])
        rng.setstate(saved["sandwich_rng"])
        set_rng_state(saved["rng"])
        step, first = saved["step"], saved["epochs_done"]
        base = (saved["teacher_forward"], saved["cache_bytes_read"])
    kept = first if saved is not None else None  # the epochs the checkpoint on disk holds

    def state(epochs_done: int) -> dict:
        return {
            "epochs_done": epochs_done,
            "step": step,
            "shared": shared.state_dict(),
            "candidate_buffers": [dict(m.named_buffers()) for m in models],
            "optimizer": optimizer.state_dict(),
            "sandwich_rng": rng.getstate(),
            "rng": rng_state(),
            "teacher_forward": base[0] + source.forward_count,
            "cache_bytes_read": base[1] + source.bytes_read(),
            "wall_time_s": time.perf_counter() - wall0,
        }

    for epoch in range(first, protocol.epochs):
        view = epoch % protocol.views.count
        order = epoch_order(n, 0, epoch)
        for m in models:
            m.train()
        t0, total = time.perf_counter(), 0.0
        for b in range(spe):
            rows = np.sort(order[b * protocol.batch_size : (b + 1) * protocol.batch_size])
            x, vp = renderer.render(view, rows, image_size, device)
            targets = view_targets(train, rows, vp, device)
            t = source.outputs(view, rows, device)
            picks = [largest, *rng.sample(others, min(mcfg.sandwich, len(others)))]
            loss = torch.zeros((), device=device)
            for k in picks:
                m = models[k]
                sliced = {
                    f"model.{name}": v
                    for name, v in slice_state(params, dict(m.model.named_parameters())).items()
                }
                out = functional_call(m, sliced, (x,))
                c = out[FEATURE].shape[1]
                t_feat = t[FEATURE][:, feature_order[:c].to(device)]
                loss = loss + sum(
                    amd_terms(out["logits"], out[FEATURE], t["logits"], t_feat, targets, mcfg).values()
                )
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{label}: joint loss is {loss.item()} at epoch {epoch} step {step}; lower"
                    " the learning rate or check the method's parameters"
                )
            for group in optimizer.param_groups:
                group["lr"] = protocol.lr * lr_factor(protocol, step, spe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if protocol.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), protocol.grad_clip_norm)
            optimizer.step()
            total += loss.item()
            step += 1
            if stop_requested() and b + 1 < spe:  # at the epoch's end, the checkpoint comes first
                raise stopped(label, epoch, protocol.epochs, checkpoint, kept, first)
            if (b + 1) % max(1, spe // 4) == 0 and b + 1 < spe:
                _logger.info(
                    "%s epoch %d/%d step %d/%d joint loss %.4f | %.0f samples/s",
                    label,
                    epoch + 1,
                    protocol.epochs,
                    b + 1,
                    spe,
                    total / (b + 1),
                    (b + 1) * protocol.batch_size / (time.perf_counter() - t0),
                )
        _logger.info(
            "%s epoch %d/%d view %d joint loss %.4f | %.0f samples/s",
            label,
            epoch + 1,
            protocol.epochs,
            view,
            total / spe,
            n / (time.perf_counter() - t0),
        )
        if checkpoint.due(epoch + 1, protocol.epochs):
            checkpoint.save(state(epoch + 1))
            kept = epoch + 1
        if stop_requested() and epoch + 1 < protocol.epochs:
            raise stopped(label, epoch + 1, protocol.epochs, checkpoint, kept, first)
    return state(protocol.epochs)


@torch.no_grad()
def _recalibrate_bn(model, train, renderer, batches: int, batch_size: int, image_size: int, device) -> None:
    """Recomputes BatchNorm statistics as the exact average over ``batches`` training batches of view 0."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    order = epoch_order(len(train), 0, 0)
    for b in range(min(batches, math.ceil(len(train) / batch_size))):
        rows = np.sort(order[b * batch_size : (b + 1) * batch_size])
        x, _ = renderer.render(0, rows, image_size, device)
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


# --- selection, fine-tuning, oracle, audit -----------------------------------------------------------------


def npsd_approx(scales: list[float], accuracies: list[float], teacher_accuracy: float) -> dict:
    """``npsd-approx``: AMD's selection as methods.md §1.3 specifies it (the paper's exact NPSD was not found).

    With candidates sorted by scale ``s_1 < ... < s_m`` (accuracies ``P_k``) and the teacher at ``s = 1``
    (``P_T``), the slope from candidate k+1 down to k is ``D_k = (P_{k+1} - P_k) / (s_{k+1} - s_k)`` (the
    teacher is candidate m+1), the grid's average slope is ``D = (P_T - P_1) / (1 - s_1)``, and the selected
    candidate is the smallest whose ``D_k <= D`` (the knee: below it, accuracy falls faster than on average).

    Returns:
        ``{"criterion", "slopes": [D_k], "mean_slope": D, "selected": k (0-based), "rank": [candidate indices in
        the rule's order of preference]}``. The preference order is the eligible candidates (``D_k <= D``) from
        the smallest, then the others by increasing ``D_k``.
    """
    if len(scales) != len(accuracies) or not scales:
        raise ValueError("npsd_approx needs one accuracy per scale")
    if any(b <= a for a, b in itertools.pairwise(scales)) or scales[-1] >= 1:
        raise ValueError(f"scales must increase strictly and stay below 1, got {scales}")
    s = [*scales, 1.0]
    acc = [*accuracies, teacher_accuracy]
    slopes = [(acc[k + 1] - acc[k]) / (s[k + 1] - s[k]) for k in range(len(scales))]
    mean = (teacher_accuracy - accuracies[0]) / (1 - scales[0])
    eligible = [k for k, d in enumerate(slopes) if d <= mean + 1e-12]
    rest = sorted((k for k in range(len(scales)) if k not in eligible), key=lambda k: (slopes[k], k))
    rank = eligible + rest
    return {"criterion": CRITERION, "slopes": slopes, "mean_slope": mean, "selected": rank[0], "rank": rank}


def run_select(search_dir: Path) -> dict:
    """Applies :func:`npsd_approx` to ``candidates.json`` and writes ``selection.json``, with the pick's
    stability (:func:`pick_stability`)."""
    summary = read_json(search_dir / CANDIDATES_FILE, "AMD search summary (the search step did not finish)")
    cands = summary["candidates"]
    result = npsd_approx(
        [c["scale"] for c in cands], [c["val_top1"] for c in cands], summary["teacher_val_top1"]
    )
    chosen = cands[result["selected"]]
    stability = (  # a search from before it logged its val size has none
        pick_stability([c["scale"] for c in cands], [c["val_top1"] for c in cands], summary["teacher_val_top1"],
                       summary["val_images"]) if "val_images" in summary else None
    )
    selection = {
        **result,
        "stability": stability,
        "name": chosen["name"],
        "dir": chosen["dir"],
        "params": chosen["params"],
        "ratio": chosen["ratio"],
    }
    write_json_atomic(search_dir / SELECTION_FILE, selection)
    return selection


def run_finetune(
    cfg: Config,
    teacher: str,
    label: str,
    data_dir: Path,
    teacher_dir: Path,
    stores: dict[str, Path],
    search_dir: Path,
    out_dir: Path,
):
    """Fine-tunes the selected candidate from its searched weights with AMD's loss against the teacher."""
    sel = read_json(search_dir / SELECTION_FILE, "AMD selection (the select step did not finish)")
    epochs = amd_config(cfg, label).epochs("finetune", cfg.protocol.epochs)
    return run_distill(
        with_epochs(cfg, epochs),
        teacher,
        sel["name"],
        label,
        0,
        data_dir,
        teacher_dir,
        stores,
        out_dir,
        init=search_dir / sel["dir"] / "model.pt",
    )


def run_oracle(
    cfg: Config, teacher: str, label: str, student: str, candidate_dir: Path, data_dir: Path, out_dir: Path,
    seed: int = 0,
):
    """A short run of AMD's loss from one candidate (live) to a student with one seed: what the oracle prefers.
    Seed k is the student's init and data order for every candidate, so the candidates are paired by seed."""
    epochs = amd_config(cfg, label).epochs("oracle", cfg.protocol.epochs)
    return run_distill(
        with_epochs(cfg, epochs), teacher, student, label, seed, data_dir, candidate_dir, {}, out_dir
    )


STABILITY_DRAWS = 1000


def pick_stability(
    scales: list[float], accuracies: list[float], teacher_accuracy: float, val_images: int,
    draws: int = STABILITY_DRAWS, seed: int = 0,
) -> dict:
    """How often :func:`npsd_approx` keeps its pick when the joint accuracies move within their evaluation noise.

    Each accuracy ``p`` (%, the teacher's included) measured on ``val_images`` images is redrawn ``draws`` times
    from a normal with its binomial standard error ``100 * sqrt(p/100 * (1 - p/100) / val_images)``
    (independently: OUR CHOICE; the candidates share the val images, so this over-states the noise of their
    differences a little), and the rule is re-applied to each draw.

    Returns:
        ``{"draws", "val_images", "share": the fraction that picks the same candidate, "picks": [count per
        candidate]}`` (the audit and the leaderboard judge the share: :data:`kdbench.report.audit.STABLE_SHARE`).
    """
    picked = npsd_approx(scales, accuracies, teacher_accuracy)["selected"]
    acc = np.asarray([*accuracies, teacher_accuracy], dtype=np.float64)
    p = np.clip(acc / 100.0, 0.0, 1.0)
    se = 100.0 * np.sqrt(p * (1.0 - p) / val_images)
    noisy = np.random.default_rng(seed).normal(acc, se, size=(draws, len(acc)))
    picks = [0] * len(scales)
    for row in noisy:
        picks[npsd_approx(scales, row[:-1].tolist(), float(row[-1]))["selected"]] += 1
    share = picks[picked] / draws
    return {"draws": draws, "val_images": val_images, "share": share, "picks": picks}
