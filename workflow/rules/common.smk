# Load and validate the config, expand the grid, input functions. No rules here.
import shlex
from pathlib import Path

import yaml
from snakemake.utils import validate

from kdbench.config import ConfigError, parse_config, config_slice_hash
from kdbench.data.shards import shard_counts, shard_name
from kdbench.plan import Plan
from kdbench.cache.store import tap_from_dirname


def _config_file():
    files = [str(f) for f in workflow.configfiles]
    if len(files) != 1:
        raise ConfigError(f"kdbench reads one config file; got {files or 'none'}. Pass exactly one --configfile")
    path = files[0]
    on_disk = yaml.safe_load(Path(path).read_text())
    if on_disk != config:
        raise ConfigError(
            f"{path}: --config overrides are not supported (every kdbench job reads the file itself); "
            "copy the file, edit it and pass it with --configfile"
        )
    return path


CONFIG_FILE = _config_file()
# kdbench's own checks first: their messages name the file and the dotted key; the schema is the second layer.
CFG = parse_config(config, source=CONFIG_FILE)
validate(config, workflow.source_path("../schemas/config.schema.yaml"))
PLAN = Plan(CFG)
RES = f"results/{CFG.name}"
LOGS = f"{RES}/logs"
LEADERBOARD = expand("results/leaderboard/{name}/{f}", name=CFG.name, f=["leaderboard.md", "leaderboard.csv"])
DATA = f"{RES}/data"
N_TRAIN_SHARDS = shard_counts(CFG.data)["train"]
CONF = f"--config {shlex.quote(CONFIG_FILE)}"


wildcard_constraints:
    teacher=r"[^/.]+",
    tkey=r"[^/]+",
    tapdir=r"[^/]+",
    student=r"[^/]+",
    label=r"[^/]+",
    seed=r"\d+",
    shard=r"\d{5}",


def teacher_hash(teacher):
    """Rerun trigger of a teacher job: its model, checkpoint, protocol and the data config."""
    return config_slice_hash(CFG.teachers[teacher], CFG.data)


def tkey_dir(tkey):
    return f"{RES}/{PLAN.teacher_dir(tkey)}"


def store_shards(wildcards):
    return expand(
        "{res}/cache/{tkey}/{tapdir}/shard-{i:05d}.h5", res=RES, tkey=wildcards.tkey, tapdir=wildcards.tapdir,
        i=range(N_TRAIN_SHARDS),
    )


def store_args(stores):
    """``--store TAP=DIR`` flags for a tap -> store mapping."""
    return " ".join(f"--store {shlex.quote(tap + '=' + RES + '/' + d)}" for tap, d in stores.items())


def cell_of(wildcards):
    from kdbench.plan import Cell

    return Cell(wildcards.teacher, wildcards.student, wildcards.label, int(wildcards.seed))


def distill_inputs(wildcards):
    cell = cell_of(wildcards)
    tkey = PLAN.tkey(cell.teacher, cell.method)
    inputs = {"data": f"{DATA}/manifest.json"}
    if tkey is not None:
        inputs["teacher"] = f"{tkey_dir(tkey)}/metrics.json"
    for tap, d in PLAN.cell_stores(cell).items():
        inputs[f"store_{d.split('/')[-1]}"] = f"{RES}/{d}/manifest.json"
    return inputs


def distill_args(wildcards):
    cell = cell_of(wildcards)
    tkey = PLAN.tkey(cell.teacher, cell.method)
    args = f"--teacher-dir {shlex.quote(tkey_dir(tkey))} " if tkey else ""
    return args + store_args(PLAN.cell_stores(cell))


def distill_hash(wildcards):
    """Rerun trigger of a cell: protocol, cache policy, data, its method entry and its teacher."""
    return config_slice_hash(CFG.protocol, CFG.cache, CFG.data, CFG.methods[wildcards.label], CFG.teachers[wildcards.teacher])


def all_records():
    return [f"{RES}/{cell.path}/record.json" for cell in PLAN.cells]
