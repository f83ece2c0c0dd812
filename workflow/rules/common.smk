# Resolve the config once into the plan (kdbench.plan) and expose it to the rules. No rules here, and no
# path is built here: every output path, key and rerun trigger comes from the plan.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

from kdbench import preflight, tuning
from kdbench.errors import USER_ERRORS, one_line
from kdbench.plan import Layout as L, Plan, resolve_study, resolve_tables, write_resolved
from kdbench.resources import Needs, gpu_request
from kdbench.tuning import SELECTED_FILE, STUDY_FILE, TRIAL_FILE

# `--configfile` files (default: workflow/config/config.yaml) and `--config` overrides, resolved once. The
# Snakefile has no `configfile:` directive on purpose: Snakemake would deep-merge the default into every other
# config (a copy's `methods` would gain the default's), so kdbench reads the files itself.
DEFAULT_CONFIG = Path(workflow.basedir) / "workflow" / "config" / "config.yaml"
CONFIGFILES = [str(f) for f in workflow.config_settings.configfiles] or [str(DEFAULT_CONFIG)]
try:
    TABLES = resolve_tables(CONFIGFILES, dict(workflow.config_settings.config))
    PLAN = Plan(TABLES)
    NEEDS = Needs(PLAN)  # each compute job's mem_mb and runtime
    STUDY = resolve_study(CONFIGFILES, TABLES)  # a suite's `study:` (one report over all its tables), or None
    if not (workflow.remote_exec or workflow.subprocess_exec):  # (a job on a node: its main Snakemake checked)
        preflight.check(PLAN)  # every input function's and param's work, for every job, before the DAG
except USER_ERRORS as _error:
    # A config that cannot be planned stops every command (-n, a run, the SLURM profile) here, whatever outputs
    # exist, with the one line that names the file and the key (`snakemake --verbose`: with its traceback). Raised
    # later, in an input function, it would come with a traceback, or be hidden by an old output.
    if workflow.output_settings.verbose:
        raise
    print(f"kdbench: error: {one_line(_error)}", file=sys.stderr)
    sys.exit(1)
if not workflow.output_settings.dryrun:  # a dry run writes nothing
    for _table in TABLES:
        write_resolved(_table)  # every job of a table reads this file


wildcard_constraints:
    table=r"[^/]+",
    dkey=r"[^/]+",
    tkey=r"[^/.]+",
    akey=r"[^/.]+\.[^/]+",
    key=r"[^/]+",
    spec=r"[a-f0-9]+",
    tapdir=r"[^/]+",
    teacher=r"[^/]+",
    student=r"[^/]+",
    label=r"[^/]+",
    seed=r"\d+",
    shard=r"\d{5}",
    group=r"\d{5}",
    study=r"[^/]+",
    cand=r"\d+",


def q(text):
    """Shell-quoted, for paths and values passed to `kdbench` on the command line."""
    return shlex.quote(str(text))


def config_of(table):
    return q(PLAN.tables[table].resolved_path)


def data_owner_args(wildcards, output):
    """`--config` (and `--teacher` for a teacher's own data) of the table that defines a data directory."""
    table, teacher = PLAN.data[wildcards.dkey]
    return f"--config {config_of(table)}" + (f" --teacher {q(teacher)}" if teacher else "")


def data_dir(wildcards):
    return PLAN.data_dir(wildcards.dkey)


def data_parts(wildcards):
    """The part files of a data directory's shard groups (none when one job writes every shard)."""
    return PLAN.data_parts(wildcards.dkey)


def teacher_inputs(wildcards):
    tk = PLAN.teachers[wildcards.tkey]
    inputs = {"data": f"{PLAN.teacher_data_dir(tk.key)}/manifest.json"}
    weights = PLAN.tables[tk.table].cfg.teachers[tk.teacher].checkpoint  # ("checkpoint" is a Snakemake keyword)
    if weights:
        inputs["checkpoint"] = weights
    verified = PLAN.teacher_verification(tk.key)
    if verified:  # a checkpoint that states its accuracy: checked first, so a wrong one stops everything after it
        inputs["verified"] = ancient(verified)  # re-checked (new expected_top1): nothing downstream reruns
    return inputs


def verify_inputs(wildcards):
    """A teacher's verification reads what its teacher job reads, before it runs."""
    inputs = teacher_inputs(wildcards)
    inputs.pop("verified")
    return inputs


def verify_args(wildcards, output):
    tk = PLAN.teachers[wildcards.tkey]
    return (f"--config {config_of(tk.table)} --teacher {q(tk.teacher)}"
            f" --data {q(PLAN.teacher_data_dir(tk.key))}")


def assistant_inputs(wildcards):
    ak = PLAN.teachers[wildcards.akey]
    teacher = PLAN.teacher_key(ak.table, ak.teacher)
    stores = PLAN.assistant_stores(ak.table, ak.teacher, ak.label)
    inputs = {
        "data": f"{PLAN.teacher_data_dir(ak.key)}/manifest.json",
        "teacher": f"{teacher.dir}/metrics.json",
        "stores": [f"{s.dir}/manifest.json" for s in stores.values()],
    }
    if PLAN.searched(ak.table, ak.label):  # AMD: fine-tune the selected candidate
        inputs["selection"] = f"{PLAN.search_dir(ak.key)}/selection.json"
    return inputs


def assistant_common(ak):
    """Arguments shared by every step that trains an assistant or its candidates from the teacher."""
    stores = PLAN.assistant_stores(ak.table, ak.teacher, ak.label)
    return " ".join([
        f"--config {config_of(ak.table)} --teacher {q(ak.teacher)} --method-label {q(ak.label)}",
        f"--data {q(PLAN.teacher_data_dir(ak.key))} --teacher-dir {q(PLAN.teacher_key(ak.table, ak.teacher).dir)}",
        *(f"--store {q(s.dir)}" for s in stores.values()),
    ])


def assistant_command(wildcards, output):
    """`kdbench distill` of TAKD's assistant, or `kdbench amd-finetune` of AMD's selected candidate."""
    ak = PLAN.teachers[wildcards.akey]
    if PLAN.searched(ak.table, ak.label):
        return f"amd-finetune {assistant_common(ak)} --search {q(PLAN.search_dir(ak.key))}"
    return f"distill {assistant_common(ak)} --student {q(PLAN.assistant_model(ak.table, ak.teacher, ak.label))} --seed 0"


def search_inputs(wildcards):
    inputs = assistant_inputs(wildcards)
    inputs.pop("selection", None)
    return inputs


def search_args(wildcards, output):
    return assistant_common(PLAN.teachers[wildcards.akey])


def oracle_inputs(wildcards):
    ak = PLAN.teachers[wildcards.akey]
    return {
        "data": f"{PLAN.data_dir(PLAN.data_key(ak.table))}/manifest.json",
        "search": f"{PLAN.search_dir(ak.key)}/candidates.json",
    }


def oracle_args(wildcards, output):
    ak = PLAN.teachers[wildcards.akey]
    return " ".join([
        f"--config {config_of(ak.table)} --teacher {q(ak.teacher)} --method-label {q(ak.label)}",
        f"--student {q(wildcards.student)} --data {q(PLAN.data_dir(PLAN.data_key(ak.table)))}",
        f"--search {q(PLAN.search_dir(ak.key))} --candidate {wildcards.cand} --seed {wildcards.seed}",
    ])


def audit_inputs(wildcards):
    ak = PLAN.assistant_key(wildcards.table, wildcards.teacher, wildcards.label)
    return {
        "selection": f"{PLAN.search_dir(ak.key)}/selection.json",
        "oracle": [f"{d}/record.json" for runs in PLAN.oracle_runs(ak.key).values() for d in runs],
    }


def audit_args(wildcards, input, output):
    ak = PLAN.assistant_key(wildcards.table, wildcards.teacher, wildcards.label)
    oracle = " ".join(f"--oracle {q(s)}={q(','.join(f'{d}/record.json' for d in runs))}"
                      for s, runs in PLAN.oracle_runs(ak.key).items())
    return f"--search {q(PLAN.search_dir(ak.key))} {oracle}"


def needs(of):
    """A compute rule's ``resources``: the job's memory and time limits (kdbench.resources; ``of(wildcards)`` is
    its Need), times the attempt (a retried job gets twice both)."""
    return dict(mem_mb=lambda wildcards, attempt: attempt * of(wildcards).mem_mb,
                runtime=lambda wildcards, attempt: attempt * of(wildcards).runtime)


def processes(table):
    """The processes of a data-parallel job of ``table`` (``runtime.processes``; kdbench.distributed)."""
    return PLAN.tables[table].cfg.runtime.processes


def distill_geometry(wildcards):
    """``(processes, CPUs per process)`` of a distill or trial job (CPUs: + streamed data's workers)."""
    return processes(wildcards.table), PLAN.job_threads(PLAN.data_key(wildcards.table))


def teacher_geometry(wildcards):
    """``(processes, CPUs per process)`` of a teacher job: a trained teacher in its table's processes, a
    checkpoint teacher (loaded and evaluated) in one."""
    tk = PLAN.teachers[wildcards.tkey]
    trained = not PLAN.tables[tk.table].cfg.teachers[tk.teacher].checkpoint
    return (processes(tk.table) if trained else 1), PLAN.job_threads(PLAN.teacher_data_key(wildcards.tkey), 2)


def store_geometry(wildcards):
    """``(processes, CPUs per process)`` of a cache job: its table's processes (each takes whole teacher batches of
    the shard; rank 0 writes it)."""
    table = store_of(wildcards).table
    return processes(table), PLAN.job_threads(PLAN.data_key(table))


def assistant_geometry(wildcards):
    """``(processes, CPUs per process)`` of an assistant job: TAKD's (a distill job) in its table's processes,
    AMD's fine-tuning (its own loop, kdbench.tasearch) in one."""
    ak = PLAN.teachers[wildcards.akey]
    n = 1 if PLAN.searched(ak.table, ak.label) else processes(ak.table)
    return n, PLAN.job_threads(PLAN.teacher_data_key(wildcards.akey))


def launch(geometry):
    """A model rule's ``processes`` (kdbench starts torchrun itself when N > 1: ``kdbench --processes N``; one node,
    a free port of its own; a failing rank ends the job, named) and ``process_threads`` (CPUs per process: the
    rule's ``threads``, which Snakemake may lower to ``--cores``, over the processes). Resources, not params: a
    changed N is no rerun trigger (no hash has it: a run resumes or is reused under any N)."""
    return dict(processes=lambda wildcards: geometry(wildcards)[0],
                process_threads=lambda wildcards, threads: max(1, threads // geometry(wildcards)[0]))


def job_threads(geometry):
    """A rule's ``threads``: every process's CPUs."""
    return lambda wildcards: geometry(wildcards)[0] * geometry(wildcards)[1]


def job_gpus(geometry):
    """A model rule's GPU and CPU resources (kdbench.resources.gpu_request): one process, ``gres`` =
    $KDBENCH_GRES (as the profile gives the model rules that run in one process); N processes: ``gpu`` N and
    ``cpus_per_gpu``, never ``tasks``."""

    def request(wildcards):
        return gpu_request(*geometry(wildcards), os.environ.get("KDBENCH_GRES", ""))

    return {key: (lambda wildcards, key=key: request(wildcards)[key])
            for key in ("gres", "gpu", "gpu_model", "cpus_per_gpu")}


def store_of(wildcards):
    return PLAN.store(wildcards.key, wildcards.spec, wildcards.tapdir)


def store_inputs(wildcards):
    sk = store_of(wildcards)
    return {
        "data": f"{PLAN.data_dir(PLAN.data_key(sk.table))}/manifest.json",
        "teacher": f"{sk.teacher.dir}/metrics.json",
    }


def store_args(wildcards, output):
    sk = store_of(wildcards)
    return (f"--config {config_of(sk.table)} --teacher-dir {q(sk.teacher.dir)}"
            f" --data {q(PLAN.data_dir(PLAN.data_key(sk.table)))}")


def store_shards(wildcards):
    return PLAN.store_shards(store_of(wildcards).dir)


def job_of(wildcards):
    return PLAN.job(wildcards.table, wildcards.teacher, wildcards.student, wildcards.label, wildcards.seed)


def distill_inputs(wildcards):
    job = job_of(wildcards)
    inputs = {"data": f"{PLAN.data_dir(PLAN.data_key(job.table))}/manifest.json"}
    tk = PLAN.job_teacher(job)
    if tk is not None:
        inputs["teacher"] = f"{tk.dir}/metrics.json"
    inputs["stores"] = [f"{s.dir}/manifest.json" for s in PLAN.job_stores(job).values()]
    return inputs


def distill_args(wildcards, output):
    job = job_of(wildcards)
    tk = PLAN.job_teacher(job)
    return " ".join([
        f"--config {config_of(job.table)} --teacher {q(job.teacher)} --student {q(job.student)}",
        f"--method-label {q(job.label)} --seed {job.seed} --data {q(PLAN.data_dir(PLAN.data_key(job.table)))}",
        *([f"--teacher-dir {q(tk.dir)}"] if tk else []),
        *(f"--store {q(s.dir)}" for s in PLAN.job_stores(job).values()),
    ])


def cell_job(wildcards):
    """The first-seed job of a tuned cell: a trial reads what the cell's jobs read."""
    return PLAN.job(wildcards.table, wildcards.teacher, wildcards.student, wildcards.label,
                    PLAN.tables[wildcards.table].cfg.seeds[0])


def trial_inputs(wildcards):
    return distill_inputs(cell_job(wildcards))


def cell_args(wildcards):
    """The cell's distill arguments without the seed (a trial takes its own)."""
    job = cell_job(wildcards)
    return distill_args(job, None).replace(f" --seed {job.seed} ", " ")


def select_inputs(wildcards):
    return tuning.trial_files(PLAN, wildcards.table, wildcards.teacher, wildcards.student, wildcards.label)


def tuned_inputs(wildcards):
    return {**distill_inputs(wildcards),
            "selected": tuning.selected_file(wildcards.table, wildcards.teacher, wildcards.student, wildcards.label)}


def leaderboard_config(wildcards):
    """`--config` of a table's leaderboard, and, when the table is planned in part (`select:`), its `--selection`:
    the leaderboard then says that it shows a selection (in this param, not a new one, so a full table's params are
    those of before and its leaderboard is not rerun for it)."""
    sel = PLAN.tables[wildcards.table].selection
    return config_of(wildcards.table) + (f" --selection {q(json.dumps(sel.to_raw()))}" if sel else "")


def table_records(wildcards):
    """A table's run records: its runs with the configured values and, when it tunes, its final tuned runs."""
    return PLAN.records(wildcards.table) + tuning.tuned_records(PLAN, wildcards.table)


def compare_inputs(wildcards):
    return {
        "new": f"{PLAN.leaderboard_dir(wildcards.table)}/leaderboard.csv",
        "published": f"{PLAN.published_dir(wildcards.table)}/leaderboard.csv",
    }


def study_records(wildcards):
    """Every run record of the study's tables."""
    return [r for t in STUDY.tables for r in PLAN.records(t)]


def site_inputs(wildcards):
    """The site's sources: every table's runs table and the study's table."""
    return {
        "tables": [f"{PLAN.leaderboard_dir(t)}/runs.csv" for t in PLAN.tables],
        "studies": [f"{STUDY.dir}/study.csv"] if STUDY else [],
    }


def final_targets():
    """Per table: the check against its published snapshot where one exists, else its leaderboard; the
    audit of every searched assistant (AMD); a suite's study; and the run's results site."""
    return [
        PLAN.compare_file(t) if Path(f"{PLAN.published_dir(t)}/leaderboard.csv").exists()
        else f"{PLAN.leaderboard_dir(t)}/leaderboard.md"
        for t in PLAN.tables
    ] + [a for t in PLAN.tables for a in PLAN.audits(t)] + ([f"{STUDY.dir}/study.md"] if STUDY else []) + [
        f"{L.SITE}/index.html"
    ]


for _table in TABLES:  # the second layer after kdbench's own checks (which name the file and the key)
    validate(dict(_table.raw), workflow.source_path("../schemas/config.schema.yaml"))
