"""The ``kdbench`` command: one subcommand per workflow step, explicit path flags, no hidden state.

Every workflow rule calls one of these; they can be run by hand just the same. This is the only module
that sets up logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

_logger = logging.getLogger("kdbench")


def _config(args):
    import dataclasses

    from kdbench.config import load_config

    cfg = load_config(args.config)
    if getattr(args, "threads", None):
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=args.threads))
    return cfg


def cmd_prepare_data(args) -> None:
    from kdbench.data.shards import prepare

    prepare(_config(args).data, Path(args.out))


def cmd_train_teacher(args) -> None:
    from kdbench.teacher import train_teacher

    train_teacher(_config(args), args.teacher, Path(args.data), Path(args.out))


def cmd_cache(args) -> None:
    from kdbench.cache.build import build_shard

    build_shard(_config(args), Path(args.teacher_dir), Path(args.data), args.tap, args.shard, Path(args.out))


def cmd_cache_manifest(args) -> None:
    from kdbench.cache.build import finalize_store

    finalize_store(_config(args), Path(args.teacher_dir), Path(args.data), args.tap, Path(args.store))


def cmd_check_cache(args) -> None:
    from kdbench.cache.check import check_store
    from kdbench.cache.store import StoreError

    report = check_store(_config(args), Path(args.store), Path(args.teacher_dir), Path(args.data), args.samples, args.seed)
    print(report.render())
    if not report.ok:
        raise StoreError(report.failure())


def _stores(items: list[str]) -> dict[str, Path]:
    stores = {}
    for item in items or []:
        tap, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"kdbench: error: --store takes TAP=DIR, got {item!r}")
        stores[tap] = Path(path)
    return stores


def cmd_distill(args) -> None:
    from kdbench.distill import run_distill

    run_distill(
        _config(args), args.teacher, args.student, args.method, args.seed, Path(args.data),
        Path(args.teacher_dir) if args.teacher_dir else None, _stores(args.store), Path(args.out),
    )


def cmd_leaderboard(args) -> None:
    from kdbench.report.leaderboard import write_leaderboard

    cfg = _config(args)
    write_leaderboard([Path(p) for p in args.runs], Path(args.out), title=cfg.name)


def cmd_verify(args) -> int:
    from kdbench.verify import GPU_TOLERANCE_PP, verify

    report = verify(Path(args.run_dir), Path(args.config) if args.config else None)
    if report.status == "identical":
        print(f"identical: {args.run_dir} re-ran bit for bit on {report.device} (timings excluded)")
    elif report.status == "within_tolerance":
        print(f"within tolerance: {args.run_dir} re-ran on {report.device} within {GPU_TOLERANCE_PP} points; "
              "GPU kernels are nondeterministic, so the run is not bit-reproducible")
    else:
        print(f"DIFFERS: {args.run_dir} re-ran on {report.device} with {len(report.differences)} differences:")
    for line in report.differences[:20]:
        print(f"  {line}")
    return 0 if report.ok else 1


def cmd_methods(args) -> None:
    from kdbench.methods import METHODS

    rows = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        cfg = cls.Config()
        rows.append({"name": name, "reference": cls.reference, **cls.declarations(cfg)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        reqs = ",".join(k for k, v in r["requirements"].items() if v) or "-"
        print(f"{r['name']:<14} teacher={','.join(r['teacher_taps']) or '-':<28} student={','.join(r['student_taps']):<28}"
              f" requires={reqs:<24} {r['reference']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdbench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if config:
            p.add_argument("--config", required=True, help="the experiment matrix (YAML)")
            p.add_argument("--threads", type=int, help="torch threads (overrides runtime.threads)")
        p.set_defaults(fn=fn)
        return p

    p = add("prepare-data", cmd_prepare_data, "raw dataset -> webdataset shards + manifest")
    p.add_argument("--out", required=True, help="data directory to write")
    p = add("train-teacher", cmd_train_teacher, "train (or load) one teacher of the config")
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--out", required=True, help="teacher directory to write")
    p = add("cache", cmd_cache, "teacher outputs of one tap for every view of one data shard")
    p.add_argument("--teacher-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tap", required=True, help="logits, pre_logits or feature[i]")
    p.add_argument("--shard", required=True, type=int)
    p.add_argument("--out", required=True, help="the shard's .h5 file")
    p = add("cache-manifest", cmd_cache_manifest, "check a store's shards and write its manifest (last)")
    p.add_argument("--teacher-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tap", required=True)
    p.add_argument("--store", required=True, help="store directory")
    p = add("check-cache", cmd_check_cache, "verify a store's checksums and re-run the live teacher on a sample of"
            " its views (exit 2 if a shard is corrupt or a value differs beyond its stored dtype's rounding)")
    p.add_argument("store", help="store directory")
    p.add_argument("--teacher-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--samples", type=int, default=256, help="(view, sample) pairs to re-run (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p = add("distill", cmd_distill, "train one (teacher, student, method, seed) cell -> run record")
    p.add_argument("--teacher", required=True, help="teacher name in the config")
    p.add_argument("--student", required=True, help="timm model name")
    p.add_argument("--method", required=True, help="method label in the config")
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher-dir", help="teacher (or assistant) directory; not needed by the baseline")
    p.add_argument("--store", action="append", metavar="TAP=DIR", help="a cached tap's store (repeatable)")
    p.add_argument("--out", required=True, help="run directory")
    p = add("leaderboard", cmd_leaderboard, "run records -> leaderboard tables, page and plots")
    p.add_argument("--runs", nargs="+", required=True, help="record.json files")
    p.add_argument("--out", required=True)
    p = add("verify", cmd_verify, "re-run one cell from its record and compare (bit-identical on CPU)", config=False)
    p.add_argument("run_dir", help="a run directory (holding record.json)")
    p.add_argument("--config", help="config file (default: the one named in the record)")
    p = add("methods", cmd_methods, "list registered methods with their declarations", config=False)
    p.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kdbench.errors import USER_ERRORS

    try:
        return int(args.fn(args) or 0)
    except USER_ERRORS as e:
        _logger.error("%s", e)
        print(f"kdbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
