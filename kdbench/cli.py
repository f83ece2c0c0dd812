"""The ``kdbench`` command: one subcommand per workflow step, explicit path flags, no hidden state.

Every workflow rule calls one of these; they can be run by hand just the same. This is the only module
that sets up logging. A user error (:data:`kdbench.errors.USER_ERRORS`) prints one line
``kdbench: error: ...`` and exits with 2; ``--debug`` shows its traceback instead. A training command
(``train-teacher``, ``distill``, ``amd-search``, ``amd-finetune``, ``amd-oracle``) stopped by SIGUSR1 keeps its
epoch checkpoint, requeues its SLURM job and exits with 75; run again, it resumes (:mod:`kdbench.train.checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import kdbench
from kdbench.errors import one_line

if TYPE_CHECKING:
    from kdbench.config import Config

_logger = logging.getLogger("kdbench")
_T = TypeVar("_T")


# --- small helpers ------------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    """Drops reStructuredText markup (``x``, :func:`x`) from a docstring shown in ``--help``."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text).replace("``", "")


def _deprecated(old: str, new: str) -> None:
    """One line on stderr: ``old`` still works for this release, ``new`` is the syntax to use."""
    print(f"kdbench: warning: {old} is deprecated and will be removed in the next release; use {new}",
          file=sys.stderr)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into ``target`` (default: its own dest) and warns once used.

    Args:
        use: The syntax to use instead (for the warning).
        target: The attribute to store the value in.
    """

    def __init__(
        self, option_strings: list[str], dest: str, use: str, target: str | None = None, **kw: Any
    ) -> None:
        super().__init__(option_strings, dest, **kw)
        self.use = use
        self.target = target or dest

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None:  # an absent optional positional
            return
        _deprecated(option_string or f"the positional {self.metavar or self.dest}", self.use)
        setattr(namespace, self.target, values)


def _broken_pipe() -> int:
    """stdout's reader went away (``kdbench methods | head -1``): exit quietly, like a tool killed by SIGPIPE."""
    try:  # the interpreter flushes stdout once more at exit: let that go to /dev/null, not to the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured)
        pass
    return 128 + signal.SIGPIPE


def _config(args: argparse.Namespace) -> Config:
    import dataclasses

    from kdbench.config import load_config

    cfg = load_config(args.config)
    if getattr(args, "threads", None):
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=args.threads))
    return cfg


def store_tap(store: Path) -> str:
    """The tap of a store directory, from its name (stores are named by ``tap_dirname(tap)``).

    Raises:
        StoreError: the name is not the name of a tap's store.
    """
    from kdbench.cache.store import StoreError
    from kdbench.taps import tap_from_dirname

    tap = tap_from_dirname(store.name)
    if not _is_tap(tap):
        raise StoreError(
            f"--store {store}: {store.name!r} is not a store's directory name, which names its tap "
            "(logits, pre_logits, feature_<i>); pass the store directory itself"
        )
    return tap


def _is_tap(name: str) -> bool:
    from kdbench.taps import is_tap

    return is_tap(name)


def _preemptible(train: Callable[[], _T]) -> _T | None:
    """Runs a training job that SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``) stops after its current step.

    A stopped job keeps its last epoch checkpoint, asks SLURM to requeue it (inside a SLURM job) and returns
    ``None``: the command then exits with :data:`kdbench.train.checkpoint.EXIT_PREEMPTED`, and the job's next
    run resumes from the checkpoint.
    """
    from kdbench.train.checkpoint import EXIT_PREEMPTED, Preempted, requeue, stop_on_signal

    try:
        with stop_on_signal():
            return train()
    except Preempted as e:
        _logger.warning("%s", e)
        if e.progressed:
            from kdbench.distributed import env_rank

            if env_rank() == 0:  # one requeue per job, whatever its processes
                requeue()
        else:  # requeued, it would stop at the same point again, and again
            _logger.warning("not requeued: this run saved no new epoch before the signal (an epoch takes longer than"
                            " the time the signal leaves). The job ends with exit %d; Snakemake's retry resubmits it"
                            " with twice the time limit (or raise the rule's runtime in the profile)",
                            EXIT_PREEMPTED)
        return None


# --- commands ----------------------------------------------------------------------------------------------


def _done(line: str) -> None:
    """The one line a workflow step prints on the terminal (its log lines go to stderr, the job's log file);
    rank 0's only, in a data-parallel job."""
    from kdbench.distributed import env_rank

    if env_rank() == 0:
        print(line, flush=True)


def cmd_prepare_data(args) -> None:
    from kdbench.data.prepare import prepare, write_group
    from kdbench.data.sources import check_data_config
    from kdbench.errors import ConfigError

    cfg = _config(args)
    if args.teacher:
        _check_cell(cfg, args.teacher, None)
    own = cfg.teachers[args.teacher].data if args.teacher else None
    data, where = (own, f"teachers.{args.teacher}.data") if own else (cfg.data, "data")
    try:
        check_data_config(data, where)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    if args.group is not None:
        part = write_group(data, Path(args.out), args.group)
        _done(f"data {data.source}: group {args.group}: {len(part['shards'])} shards,"
              f" {sum(s['count'] for s in part['shards'])} images -> {args.out}")
        return
    manifest = prepare(data, Path(args.out))
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    _done(f"data {data.source}: {counts} images -> {args.out}")


def cmd_train_teacher(args) -> int | None:
    from kdbench.teacher import train_teacher
    from kdbench.train.checkpoint import EXIT_PREEMPTED

    cfg = _config(args)
    m = _preemptible(lambda: train_teacher(cfg, args.teacher, Path(args.data), Path(args.out), args.checkpoint_every))
    if m is None:
        return EXIT_PREEMPTED
    _done(f"teacher {args.teacher} ({m['model']}): test top-1 {m['test_top1']:.2f}% -> {args.out}")


def cmd_verify_teacher(args) -> None:
    from kdbench.teacher import verify_teacher

    cfg = _config(args)
    _check_cell(cfg, args.teacher, None)
    v = verify_teacher(cfg, args.teacher, Path(args.data), Path(args.out))
    _done(f"teacher {args.teacher} ({v['model']}): test top-1 {v['measured_top1']:.2f}%, expected"
          f" {v['expected_top1']:.2f}% ± {v['top1_tolerance']:.2f}: {v['verdict']} -> {args.out}")


def cmd_cache(args) -> None:
    from kdbench.cache.build import build_shard
    from kdbench.plan import shard_file

    out = Path(args.out) if args.out else Path(args.store) / shard_file(args.shard)
    tap = args.tap or store_tap(out.parent)
    stats = build_shard(_config(args), Path(args.teacher_dir), Path(args.data), tap, args.shard, out)
    _done(f"store {tap}, shard {args.shard}: {stats['views_per_s']:.0f} views/s -> {out}")


def cmd_cache_manifest(args) -> None:
    from kdbench.cache.build import finalize_store

    store = Path(args.store)
    tap = args.tap or store_tap(store)
    finalize_store(_config(args), Path(args.teacher_dir), Path(args.data), tap, store)
    _done(f"store {tap}: manifest written -> {store}")


def cmd_check_cache(args) -> None:
    from kdbench.cache.check import check_store
    from kdbench.cache.store import StoreError

    report = check_store(_config(args), Path(args.store), Path(args.teacher_dir), Path(args.data), args.samples, args.seed)
    print(report.render())
    if not report.ok:
        raise StoreError(report.failure())


def _stores(items: list[str] | None) -> dict[str, Path]:
    """Tap -> store of distill's ``--store DIR`` flags (and of the deprecated ``--store TAP=DIR``)."""
    from kdbench.cache.store import StoreError

    stores: dict[str, Path] = {}
    for item in items or []:
        tap, sep, path = item.partition("=")
        if sep and _is_tap(tap):
            _deprecated(f"--store {tap}=DIR", "--store DIR (the tap is read from the directory name)")
            if not path:
                raise StoreError(f"--store {item}: no directory after '='")
        else:
            path, tap = item, store_tap(Path(item))
        if tap in stores:
            raise StoreError(f"--store: two stores of tap {tap!r} ({stores[tap]} and {path}); pass one")
        stores[tap] = Path(path)
    return stores


def _check_cell(cfg: Config, teacher: str, label: str | None) -> None:
    from kdbench.config import ConfigError

    for flag, name, choices in (("--teacher", teacher, cfg.teachers), ("--method-label", label, cfg.methods)):
        if name is not None and name not in choices:
            raise ConfigError(
                f"{cfg.source}: {flag} {name!r} is not in the config; valid choices: {', '.join(choices)}"
            )


def cmd_distill(args) -> int | None:
    from kdbench.distill import run_distill
    from kdbench.train.checkpoint import EXIT_PREEMPTED

    cfg = _config(args)
    _check_cell(cfg, args.teacher, args.label)
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else None
    stores = _stores(args.store)
    tuning = None
    if args.tuned:  # a final run of a tuned table: the cell's selected values
        from kdbench.tuning import apply_selection

        cfg, tuning = apply_selection(cfg, args.teacher, args.student, args.label, Path(args.tuned))
    record = _preemptible(lambda: run_distill(
        cfg, args.teacher, args.student, args.label, args.seed, Path(args.data), teacher_dir, stores,
        Path(args.out), checkpoint_every=args.checkpoint_every, tuning=tuning,
    ))
    if record is None:
        return EXIT_PREEMPTED
    run = f"{cfg.name}: {args.teacher}/{args.student}/{args.label}/seed{args.seed}"
    if record.status == "ok":
        _done(f"{run}: test top-1 {record.final.test_top1:.2f}% in {record.cost.wall_time_s:.0f} s")
    else:
        _done(f"{run}: skipped ({record.skip_reason})")


def cmd_trial(args) -> int | None:
    from kdbench.distill import run_trial
    from kdbench.train.checkpoint import EXIT_PREEMPTED

    cfg = _config(args)
    _check_cell(cfg, args.teacher, args.label)
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else None
    trial = _preemptible(lambda: run_trial(
        cfg, args.teacher, args.student, args.label, args.trial, args.seed, Path(args.data), teacher_dir,
        _stores(args.store), Path(args.out), checkpoint_every=args.checkpoint_every,
    ))
    if trial is None:
        return EXIT_PREEMPTED
    _done(f"{cfg.name}: {args.teacher}/{args.student}/{args.label} trial {args.trial} seed {args.seed}:"
          f" {trial['metric']} {trial['score']:.2f} in {trial['wall_time_s']:.0f} s")


def cmd_tune_select(args) -> None:
    from kdbench.tuning import select_cell

    cfg = _config(args)
    _check_cell(cfg, args.teacher, args.label)
    sel = select_cell(cfg, args.teacher, args.student, args.label, args.trials, Path(args.out))
    _done(f"{cfg.name}: {args.teacher}/{args.student}/{args.label}: trial {sel['selected_trial']} of"
          f" {sel['trials']} selected ({sel['metric']} {sel['selected_score']:.2f}, configured values"
          f" {sel['default_score']:.2f}) -> {args.out}")


def _amd_args(args):
    cfg = _config(args)
    _check_cell(cfg, args.teacher, args.label)
    return cfg


def cmd_amd_search(args) -> int | None:
    from kdbench.tasearch import run_search
    from kdbench.train.checkpoint import EXIT_PREEMPTED

    cfg = _amd_args(args)
    stores = _stores(args.store)
    summary = _preemptible(lambda: run_search(cfg, args.teacher, args.label, Path(args.data), Path(args.teacher_dir),
                                              stores, Path(args.out), checkpoint_every=args.checkpoint_every))
    if summary is None:
        return EXIT_PREEMPTED
    accs = ", ".join(f"{c['ratio']:.2f}: {c['val_top1']:.1f}%" for c in summary["candidates"])
    _done(f"{cfg.name}: {args.teacher}/{args.label}: {len(summary['candidates'])} candidates trained jointly in"
          f" {summary['wall_time_s']:.0f} s (scale: val top-1 {accs})")


def cmd_amd_select(args) -> None:
    from kdbench.tasearch import run_select

    sel = run_select(Path(args.search))
    _done(f"{args.search}: {sel['criterion']} selects candidate {sel['selected']} ({sel['name']}, {sel['ratio']:.2f} of"
          " the teacher)")


def cmd_amd_finetune(args) -> int | None:
    from kdbench.tasearch import run_finetune
    from kdbench.train.checkpoint import EXIT_PREEMPTED

    cfg = _amd_args(args)
    stores = _stores(args.store)
    record = _preemptible(lambda: run_finetune(cfg, args.teacher, args.label, Path(args.data), Path(args.teacher_dir),
                                               stores, Path(args.search), Path(args.out)))
    if record is None:
        return EXIT_PREEMPTED
    _done(f"{cfg.name}: {args.teacher}/{args.label}: assistant {record.identity.student} fine-tuned, test top-1"
          f" {record.final.test_top1:.2f}% in {record.cost.wall_time_s:.0f} s")


def cmd_amd_oracle(args) -> int | None:
    from kdbench.tasearch import run_oracle
    from kdbench.train.checkpoint import EXIT_PREEMPTED

    cfg = _amd_args(args)
    candidate = Path(args.search) / "candidates" / str(args.candidate)
    record = _preemptible(lambda: run_oracle(cfg, args.teacher, args.label, args.student, candidate, Path(args.data),
                                             Path(args.out), args.seed))
    if record is None:
        return EXIT_PREEMPTED
    _done(f"{cfg.name}: oracle candidate {args.candidate} -> {args.student}, seed {args.seed}: val top-1"
          f" {record.final.val_top1:.2f}% in {record.cost.wall_time_s:.0f} s")


def cmd_amd_audit(args) -> None:
    from kdbench._util import read_json, write_json_atomic
    from kdbench.errors import ConfigError
    from kdbench.modeldir import CANDIDATES_FILE, SELECTION_FILE
    from kdbench.report.audit import audit, audit_markdown

    oracle = {}
    for item in args.oracle or []:
        student, _, files = item.partition("=")
        if not files:
            raise ConfigError(f"--oracle {item!r}: expected STUDENT=RECORD[,RECORD...]")
        oracle[student] = [read_json(Path(f), "AMD oracle run record") for f in files.split(",")]
    search = Path(args.search)
    result = audit(read_json(search / CANDIDATES_FILE, "AMD search summary"),
                   read_json(search / SELECTION_FILE, "AMD selection"), oracle)
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), result)
    out.write_text(audit_markdown(result))
    picks = "; ".join(
        f"{s}: " + (f"oracle best {st['best']}" if st["best"] is not None else f"not separable ({st['top']})")
        for s, st in result["students"].items()
    )
    _done(f"AMD audit: {result['criterion']} selected candidate {result['selected']}; {picks or 'no oracle'} ({out})")


def _selection(text: str, cfg: Config):
    """``--selection``: a table's ``select:`` as YAML or JSON (the workflow passes JSON), checked against it."""
    import yaml

    from kdbench.config import ConfigError
    from kdbench.selection import parse_selection

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--selection {text!r} is not valid YAML or JSON ({str(e).splitlines()[0]})") from None
    return parse_selection(raw, cfg, f"{cfg.source}: --selection")


def cmd_leaderboard(args) -> None:
    from kdbench._util import to_jsonable
    from kdbench.config import config_hash
    from kdbench.distill import run_identity
    from kdbench.plan import Plan
    from kdbench.record import RunRecord
    from kdbench.report.leaderboard import write_leaderboard

    cfg = _config(args)
    title = f"{cfg.name} (config {config_hash(cfg)})"
    selection = _selection(args.selection, cfg) if args.selection else None
    seeds = [s for s in cfg.seeds if selection is None or selection.seeds is None or s in selection.seeds]
    unscheduled = [
        to_jsonable(RunRecord(status="skipped", skip_reason=reason, identity=run_identity(cfg, t, s, m, seed),
                              protocol=cfg.protocol, protocol_hash=cfg.protocol.hash()))
        for (_, t, s, m), reason in Plan.of_config(cfg, selection).skipped.items()
        for seed in seeds
    ]
    shows = {"selection": selection.render()} if selection else {}  # only then: the keyword is new
    summary = write_leaderboard([Path(p) for p in args.runs], Path(args.out), title=title, unscheduled=unscheduled,
                                **shows)
    _done(f"leaderboard {title}: {summary['cells']} cells from {summary['runs']} runs -> {args.out}")


def cmd_study(args) -> None:
    from kdbench.report.study import write_study

    study = write_study([Path(p) for p in args.runs], Path(args.out), args.name)
    for check in study.checks:
        _done(f"lossless check: {check.render()}")
    _done(f"study {args.name}: {len(study.rows)} rows from {len(args.runs)} runs -> {args.out}")


def cmd_site(args) -> int:
    from kdbench.report.site import snapshot_entries, stale_pages, workflow_entries, write_site

    published = Path(args.published)
    if args.tables or args.studies:  # the workflow's site of the tables it made
        if not args.out:
            raise SystemExit("kdbench: error: kdbench site --tables/--studies needs --out DIR (e.g. results/site)")
        out = Path(args.out)
        entries = workflow_entries([Path(t) for t in args.tables], [Path(s) for s in args.studies], published)
    else:  # the committed snapshots, rebuilt in place
        out = Path(args.out) if args.out else published
        if not published.is_dir():
            raise SystemExit(f"kdbench: error: --published {published}: no such folder (run from the repository's top)")
        entries = snapshot_entries(published)
    if not args.check:
        write_site(entries, out)
        _done(f"site of {len(entries)} tables and studies -> {out}/index.html")
    stale = stale_pages(out)
    for line in stale:
        print(line)
    return 1 if stale else 0


def cmd_plan(args) -> None:
    from kdbench.plan import Plan, resolve_study

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"kdbench: error: --config takes KEY=VALUE, got {item!r}")
        overrides[key] = value  # read as YAML by the plan, as the workflow reads snakemake --config
    plan = Plan.resolve(args.configfile or [], overrides)
    from kdbench import preflight

    preflight.check(plan)  # what the workflow checks before its DAG: a plan it would refuse is refused here too
    print(plan.render())
    from kdbench.tuning import render_tuning

    for name in plan.tables:
        if plan.tables[name].cfg.tune is not None:
            print(render_tuning(plan, name))
    if args.estimate:
        from kdbench.estimate import DEFAULT_GPU_TFLOPS, assumptions, estimate, render

        from kdbench.resources import render_limits

        print(render(estimate(plan), args.gpu_tflops or DEFAULT_GPU_TFLOPS, assumptions(plan)))
        print(render_limits(plan))
    study = resolve_study(args.configfile or [], list(plan.tables.values()))
    if study:
        print(f"study {study.name} over {len(study.tables)} tables -> {study.dir}/study.md")


def cmd_verify(args) -> int:
    from kdbench.verify import verify

    report = verify(Path(args.run_dir), Path(args.config) if args.config else None)
    print(report.render(Path(args.run_dir)))
    return 0 if report.ok else 1


def cmd_compare(args) -> int:
    from kdbench._util import atomic_path
    from kdbench.report.compare import compare_leaderboards

    report = compare_leaderboards(Path(args.new), Path(args.published))
    text = f"{report.render().rstrip()}\n{report.summary()}"
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    return 0 if report.ok or args.exit_zero else 1


def method_rows() -> list[dict[str, Any]]:
    """Every registered method: name, default parameters, declarations and reference (JSON types)."""
    from kdbench._util import to_jsonable
    from kdbench.methods import METHODS

    rows = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        cfg = cls.Config()
        space = {k: {"distribution": type(d).__name__, **to_jsonable(d)} for k, d in cls.search_space.items()}
        rows.append({"name": name, "source": method_origin(name), "parameters": to_jsonable(cfg),
                     **cls.declarations(cfg), "search_space": space, "reference": cls.reference})
    return rows


def method_origin(name: str) -> dict[str, str]:
    """Where a registered method comes from: ``{"package": "kdbench"}`` for a built-in, else its plugin's
    package, version and entry point."""
    from kdbench.methods.base import method_source

    plugin = method_source(name)
    if plugin is None:
        return {"package": "kdbench", "version": kdbench.__version__, "built_in": True}
    return {"package": plugin.package, "version": plugin.version, "entry_point": plugin.entry_point,
            "built_in": False}


def _origin_text(source: dict[str, Any]) -> str:
    if source["built_in"]:
        return "built-in"
    return f"{source['package']} {source['version']} ({source['entry_point']})"


def render_methods(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`method_rows` as a readable table, one block per method."""
    blocks = []
    for r in rows:
        fields = [
            ("source", _origin_text(r["source"])),
            ("parameters", ", ".join(f"{k}={json.dumps(v)}" for k, v in r["parameters"].items())),
            ("teacher taps", ", ".join(r["teacher_taps"])),
            ("student taps", ", ".join(r["student_taps"])),
            ("teacher view", r["teacher_view"]),
            ("requires", ", ".join(k for k, v in r["requirements"].items() if v)),
            ("assistant", r["assistant"] or ""),
            ("search space", ", ".join(f"{k} {d['distribution']}" + str([v for f, v in d.items() if f != "distribution"])
                                       for k, d in r["search_space"].items())),
            ("reference", r["reference"]),
        ]
        blocks.append("\n".join([r["name"], *(f"  {key:<13} {value or '-'}" for key, value in fields)]))
    return "\n\n".join(blocks)


def cmd_methods(args) -> None:
    rows = method_rows()
    print(json.dumps(rows, indent=2) if args.json else render_methods(rows))


def _registered_method(name: str) -> None:
    """Refuses an unknown method name with the choices and the plugin fix."""
    from kdbench.errors import ConfigError
    from kdbench.methods import METHODS

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(METHODS.names())}. A plugin's method is"
                          " registered once its package is installed (pip install -e DIR)")


def render_check(name: str, results: list) -> str:
    """The outcome of ``kdbench check-method``: one line per failing check (what it asks, and what is wrong),
    then the counts."""
    failed = [r for r in results if r.status == "fail"]
    skipped = [r for r in results if r.status == "n/a"]
    lines = []
    for r in failed:
        lines += [f"FAIL {r.case.id}", f"  the contract: {r.case.description}", f"  what is wrong: {r.message}"]
    passed = len(results) - len(failed) - len(skipped)
    verdict = "breaks the contract" if failed else "passes the contract"
    lines.append(f"method {name!r} {verdict}: {passed} checks passed, {len(failed)} failed,"
                 f" {len(skipped)} not applicable (pairs it declares it cannot run)")
    return "\n".join(lines)


def cmd_check_method(args) -> int:
    from kdbench.contract import check_method

    _registered_method(args.name)
    results = check_method(args.name)
    print(render_check(args.name, results))
    return 1 if any(r.status == "fail" for r in results) else 0


def cmd_new_method(args) -> None:
    from kdbench.methods import METHODS
    from kdbench.scaffold import new_method

    taken = {n: _origin_text(method_origin(n)) for n in METHODS.names()}
    files = new_method(args.name, Path(args.out), taken)
    out = Path(args.out)
    print("\n".join(str(f) for f in files))
    print(f"next: edit {files[4]}, then pip install -e {out}, kdbench check-method {args.name},"
          f" and name it in a config: methods: {{{args.name}: {{}}}}")


# --- the parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``kdbench`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="kdbench", description=_plain(__doc__.splitlines()[0]))
    parser.add_argument("--version", action="version", version=f"%(prog)s {kdbench.__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error instead of the one-line message")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run a data-parallel command (" + ", ".join(DATA_PARALLEL) + ") in N processes on"
                             " this node: kdbench starts them under torchrun itself (default 1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="the step to run ('kdbench COMMAND --help' lists its options)")

    def add(name: str, fn, help: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=_plain(help), description=_plain(help))
        if config:
            p.add_argument("--config", required=True, help="the experiment matrix (YAML)")
            p.add_argument("--threads", type=int, help="torch threads (overrides runtime.threads)")
        p.set_defaults(fn=fn)
        return p

    def store_option(p: argparse.ArgumentParser, help: str, **kw: Any) -> None:
        p.add_argument("--store", metavar="DIR", help=help, **kw)

    def checkpoint_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                       help="write a checkpoint.pt into --out every N epochs (default 1; 0: never); a rerun resumes"
                            " from it, SIGUSR1 stops the job (exit 75) and requeues it under SLURM; no result"
                            " depends on N")

    named = "; its directory name names the tap (logits, pre_logits, feature_<i>)"
    no_tap = "deprecated: the tap is read from the store's directory name"

    p = add("prepare-data", cmd_prepare_data, "raw dataset -> webdataset shards + manifest")
    p.add_argument("--teacher", help="prepare this teacher's own training data (teachers.<name>.data)")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--group", type=int, metavar="K",
                   help="write only shard group K (data.shards_per_job shards) and its part file parts/group-K.json;"
                        " without it: write every group that has no part file, then merge all parts into"
                        " manifest.json")

    p = add("plan", cmd_plan, "resolve config files + overrides as the workflow does and print the tables,"
            " jobs and paths", config=False)
    p.add_argument("--configfile", nargs="+", metavar="FILE",
                   help="config files merged in order, or one suite file (default: workflow/config/config.yaml)")
    p.add_argument("--config", dest="set", nargs="+", metavar="KEY=VALUE",
                   help="overrides as snakemake --config takes them (values read as YAML); dotted keys reach nested values")
    p.add_argument("--estimate", action="store_true",
                   help="also print each table's jobs, FLOPs and GPU-hours per stage (each model's FLOPs per image are"
                        " counted on one forward pass; needs the data's sizes, so the raw data must be on disk), and"
                        " the largest memory and time limit a job of each stage asks a cluster for")
    p.add_argument("--gpu-tflops", type=float, default=None, metavar="T",
                   help="sustained TFLOP/s per GPU of the estimate (default 10)")

    p = add("train-teacher", cmd_train_teacher, "train (or load) one teacher of the config")
    p.add_argument("--teacher", required=True, help="teacher name in the config")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--out", required=True, help="teacher directory to write")
    checkpoint_option(p)

    p = add("verify-teacher", cmd_verify_teacher, "check a checkpoint teacher's test top-1 against its config's"
            " expected_top1 (exit 2, writing nothing, when it is off by more than top1_tolerance)")
    p.add_argument("--teacher", required=True, help="teacher name in the config (with checkpoint and expected_top1)")
    p.add_argument("--data", required=True, help="the teacher's data directory (its test split is evaluated)")
    p.add_argument("--out", required=True, help="the verification JSON to write when the check passes")

    p = add("cache", cmd_cache, "teacher outputs of one tap for every view of one data shard")
    p.add_argument("--teacher-dir", required=True, help="teacher directory")
    p.add_argument("--data", required=True, help="data directory")
    group = p.add_mutually_exclusive_group(required=True)
    store_option(group, f"the store directory to write the shard's file into{named}")
    group.add_argument("--out", metavar="FILE", action=_DeprecatedAlias, use="--store DIR",
                       help="deprecated: the shard's .h5 file (now named by --store DIR and --shard)")
    p.add_argument("--shard", required=True, type=int, help="index of the data shard")
    p.add_argument("--tap", action=_DeprecatedAlias, use="--store DIR alone (the tap is read from its name)",
                   help=no_tap)

    p = add("cache-manifest", cmd_cache_manifest, "check a store's shards and write its manifest (last)")
    p.add_argument("--teacher-dir", required=True, help="teacher directory")
    p.add_argument("--data", required=True, help="data directory")
    store_option(p, f"the store directory{named}", required=True)
    p.add_argument("--tap", action=_DeprecatedAlias, use="--store DIR alone (the tap is read from its name)",
                   help=no_tap)

    p = add("check-cache", cmd_check_cache, "verify a store's checksums and re-run the live teacher on a sample of"
            " its views (exit 2 if a shard is corrupt or a value differs beyond its stored dtype's rounding)")
    group = p.add_mutually_exclusive_group(required=True)
    store_option(group, "the store directory")
    group.add_argument("old_store", nargs="?", metavar="STORE", action=_DeprecatedAlias, use="--store DIR",
                       target="store", help="deprecated: use --store DIR")
    p.add_argument("--teacher-dir", required=True, help="teacher directory the store was built from")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--samples", type=int, default=256, help="(view, sample) pairs to re-run (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")

    p = add("distill", cmd_distill, "train one (teacher, student, method, seed) cell -> run record")
    p.add_argument("--teacher", required=True, help="teacher name in the config")
    p.add_argument("--student", required=True, help="timm model name")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--method-label", dest="label", metavar="LABEL",
                       help="method label in the config's 'methods'")
    group.add_argument("--method", dest="label", metavar="LABEL", action=_DeprecatedAlias, use="--method-label",
                       help="deprecated alias of --method-label")
    p.add_argument("--seed", required=True, type=int, help="seed of the run")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--teacher-dir", help="teacher (or assistant) directory; not needed by the baseline")
    store_option(p, f"a store of a cached teacher tap the method reads (repeatable){named}", action="append")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--tuned", metavar="SELECTED", help="a tuned table's final run: the cell's selected.json"
                   " (kdbench tune-select), whose values replace the configured ones")
    checkpoint_option(p)

    p = add("trial", cmd_trial, "one trial of a tuned cell: its values, the tuning budget, scored on val only")
    p.add_argument("--teacher", required=True, help="teacher name in the config")
    p.add_argument("--student", required=True, help="timm model name")
    p.add_argument("--method-label", dest="label", required=True, metavar="LABEL", help="method label")
    p.add_argument("--trial", required=True, type=int, help="trial index (0: the configured values)")
    p.add_argument("--seed", required=True, type=int, help="one of tune.budget.seeds")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--teacher-dir", help="teacher (or assistant) directory; not needed by the baseline")
    store_option(p, f"a store of a cached teacher tap the method reads (repeatable){named}", action="append")
    p.add_argument("--out", required=True, help="trial directory")
    checkpoint_option(p)

    p = add("tune-select", cmd_tune_select, "a tuned cell's winner from its trials -> selected.json, study.journal")
    p.add_argument("--teacher", required=True, help="teacher name in the config")
    p.add_argument("--student", required=True, help="timm model name")
    p.add_argument("--method-label", dest="label", required=True, metavar="LABEL", help="method label")
    p.add_argument("--trials", required=True, nargs="+", help="the cell's trial.json files")
    p.add_argument("--out", required=True, help="the cell's tuning directory")

    def amd_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--teacher", required=True, help="teacher name in the config")
        p.add_argument("--method-label", dest="label", required=True, metavar="LABEL", help="the 'amd' method label")
        p.add_argument("--data", required=True, help="data directory")

    p = add("amd-search", cmd_amd_search, "AMD: prune the teacher into nested candidates and train them jointly")
    amd_common(p)
    p.add_argument("--teacher-dir", required=True, help="teacher directory")
    store_option(p, f"a store of the teacher's logits or last feature stage (repeatable){named}", action="append")
    p.add_argument("--out", required=True, help="search directory to write")
    checkpoint_option(p)

    p = add("amd-select", cmd_amd_select, "AMD: select a candidate by npsd-approx from the search's logged accuracies",
            config=False)
    p.add_argument("--search", required=True, help="search directory (candidates.json)")

    p = add("amd-finetune", cmd_amd_finetune, "AMD: fine-tune the selected candidate into the assistant")
    amd_common(p)
    p.add_argument("--teacher-dir", required=True, help="teacher directory")
    store_option(p, f"a store of the teacher's logits or last feature stage (repeatable){named}", action="append")
    p.add_argument("--search", required=True, help="search directory (selection.json)")
    p.add_argument("--out", required=True, help="assistant directory to write")

    p = add("amd-oracle", cmd_amd_oracle, "AMD's audit: a short run from one candidate (live) to a student")
    amd_common(p)
    p.add_argument("--student", required=True, help="timm model name")
    p.add_argument("--search", required=True, help="search directory")
    p.add_argument("--candidate", required=True, type=int, help="candidate index on the grid")
    p.add_argument("--seed", type=int, default=0, help="the student's seed (the same for every candidate: paired)")
    p.add_argument("--out", required=True, help="run directory")

    p = add("amd-audit", cmd_amd_audit, "AMD's audit table: the selection against the oracle runs", config=False)
    p.add_argument("--search", required=True, help="search directory")
    p.add_argument("--oracle", action="append", metavar="STUDENT=RECORDS",
                   help="a student and its oracle records, comma-separated, candidate-major (candidate 0's seeds,"
                        " then candidate 1's, ...; repeatable; none: no oracle runs)")
    p.add_argument("--out", required=True, help="the audit's Markdown file (the .json beside it)")

    p = add("leaderboard", cmd_leaderboard, "run records -> leaderboard tables, page and plots")
    p.add_argument("--runs", nargs="+", required=True, help="record.json files")
    p.add_argument("--out", required=True, help="leaderboard directory to write")
    p.add_argument("--selection", metavar="MAPPING",
                   help="the part of the table the runs are (its 'select:', as YAML or JSON, e.g. '{methods: [kd],"
                   " seeds: [0]}'): the leaderboard says it shows a selection, and lists only the selected cells"
                   " that cannot run")

    p = add("study", cmd_study, "a suite's study: the run records of all its tables -> one table (study.md, .csv),"
            " one plot of accuracy vs store bytes (study.png) and the live-vs-cache lossless check", config=False)
    p.add_argument("--runs", nargs="+", required=True, help="record.json files of every table of the study")
    p.add_argument("--name", required=True, help="the study's name (the suite's study.name)")
    p.add_argument("--out", required=True, help="study directory to write")

    p = add("site", cmd_site, "the results site: rebuild every published snapshot's page and the front page"
            " results/published/index.html from the committed runs.csv / study.csv (or, with --tables, a"
            " workflow's site of the tables it made); exit 1 if a page is stale", config=False)
    p.add_argument("--published", default="results/published", metavar="DIR",
                   help="the published snapshots (default: results/published)")
    p.add_argument("--tables", nargs="*", default=[], metavar="DIR", help="leaderboard folders (runs.csv) of a run")
    p.add_argument("--studies", nargs="*", default=[], metavar="DIR", help="study folders (study.csv) of a run")
    p.add_argument("--out", metavar="DIR", help="the site's folder (default: --published, rebuilt in place)")
    p.add_argument("--check", action="store_true", help="write nothing: list the pages written by older code"
                   " than their records need (exit 1 if any)")

    p = add("verify", cmd_verify, "re-run one cell from its record and compare (bit-identical on the same CPU"
            " model and ISA, not across CPUs)", config=False)
    p.add_argument("run_dir", help="a run directory (holding record.json)")
    p.add_argument("--config", help="config file (default: the one named in the record)")

    p = add("compare", cmd_compare, "compare a new leaderboard with a published one (exit 1 if they disagree)",
            config=False)
    p.add_argument("new", metavar="NEW", help="the new leaderboard")
    p.add_argument("published", metavar="PUBLISHED", help="the published leaderboard")
    p.add_argument("--out", metavar="FILE", help="also write the comparison table and summary to FILE")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 even if the leaderboards disagree")

    p = add("check-method", cmd_check_method, "run the method contract's checks on an installed method (built-in or"
            " plugin); exit 1 and say what fails", config=False)
    p.add_argument("name", metavar="NAME", help="a registered method (kdbench methods lists them)")

    p = add("new-method", cmd_new_method, "write a new method as a plugin package (pyproject.toml with its entry"
            " point, the method file, a golden test) into a new directory", config=False)
    p.add_argument("name", metavar="NAME", help="the method's name (a lowercase Python identifier)")
    p.add_argument("--out", required=True, metavar="DIR", help="the plugin's directory (new or empty)")

    p = add("methods", cmd_methods, "list registered methods: parameters (defaults), declarations, reference",
            config=False)
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    return parser


#: The commands that run data parallel under torchrun (``runtime.processes`` > 1, :mod:`kdbench.distributed`);
#: every other command refuses more than one process.
DATA_PARALLEL = ("distill", "trial", "train-teacher", "cache")


def _single_process(command: str) -> None:
    """Refuses a command that runs in one process only when torchrun started it in several."""
    from kdbench.distributed import env_world_size
    from kdbench.errors import ConfigError

    if command not in DATA_PARALLEL and env_world_size() > 1:
        raise ConfigError(f"kdbench {command} runs in one process (runtime.processes applies to"
                          f" {', '.join(DATA_PARALLEL)} jobs only); run it without torchrun")


def _torchrun_argv(argv: list[str], processes: int) -> list[str]:
    """The command line that runs ``kdbench argv`` (its ``--processes`` left out) in ``processes`` processes:
    torchrun on this node, a free port of its own (``--standalone``), every process this Python's ``kdbench``."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={processes}", "-m", "kdbench.cli", *rest]


def _launch(args: argparse.Namespace, argv: list[str]) -> None:
    """``--processes N``: outside torchrun, replaces this process by torchrun starting N of this command (N > 1);
    inside it, checks that torchrun started N. A command that runs in one process refuses N > 1."""
    from kdbench.distributed import env_world_size
    from kdbench.errors import ConfigError

    n = args.processes
    if n < 1:
        raise ConfigError(f"--processes {n}: give a positive number of processes")
    if n > 1 and args.command not in DATA_PARALLEL:
        raise ConfigError(f"kdbench --processes {n} {args.command}: {args.command} runs in one process"
                          f" (--processes applies to {', '.join(DATA_PARALLEL)} jobs only)")
    world = env_world_size()
    if world > 1 and n not in (1, world):
        raise ConfigError(f"kdbench --processes {n} under torchrun with {world} processes: drop --processes, or"
                          " run kdbench without torchrun (it starts torchrun itself)")
    if n > 1 and world == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        command = _torchrun_argv(argv, n)
        os.execv(command[0], command)


def main(argv: list[str] | None = None) -> int:
    from kdbench.distributed import env_rank, shutdown

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    rank = env_rank()  # under torchrun: only rank 0 logs progress; the others log warnings and errors, named
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0
        else f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kdbench.errors import USER_ERRORS

    try:
        _single_process(args.command)
        _launch(args, argv)
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return _broken_pipe()
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"kdbench: error: {one_line(e)}" if rank == 0 else f"kdbench: error: rank {rank}: {one_line(e)}",
              file=sys.stderr)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
