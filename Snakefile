# kdbench: regenerate every leaderboard table from raw data.
#   snakemake --cores 2                                                 # the default table (Fashion-MNIST)
#   snakemake --cores 2 --configfile workflow/config/all-tables.yaml    # every table that fits a 2-core machine
#   snakemake --cores 2 --config seeds=[0,1,2,3,4]                      # overrides (dotted keys too)
#   snakemake --cores 2 --config 'select={methods: [kd], seeds: [0]}'   # part of a table: its own jobs, reused later
#   snakemake --workflow-profile workflow/profiles/slurm                # on a SLURM cluster
#
# `snakemake --lint` asks for a conda environment or container per rule. kdbench deliberately has none: every
# rule runs the `kdbench` command of the environment that runs Snakemake (one `pip install -e .`, pinned torch),
# so all jobs use the same build of the code that provenance records; a per-rule environment would install a
# second, unpinned copy. On a cluster, make that environment visible on every node (see README, SLURM).
from snakemake.utils import min_version

min_version("9.0")

# Preemption on SLURM (profile: `--signal=USR1@300`): SLURM sends SIGUSR1 to every process of the job's step,
# the Snakemake that runs the rule included. Python's default action for SIGUSR1 is to terminate, and a step
# whose task (that Snakemake) has ended is over: SLURM kills what is left of it, the training job before it
# could checkpoint. So the Snakemake processes that run jobs on a node (`--mode remote`) ignore it; the
# `kdbench` commands that train install their own handler (checkpoint, `scontrol requeue`, exit 75).
if workflow.remote_exec:
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# Snakemake 9's scheduler starts one more everlasting re-evaluation timer per job event, a CPU cost that grows with
# every finished job: kdbench/scheduler_timers.py keeps one pending timer per scheduler.
from kdbench import scheduler_timers

scheduler_timers.apply()


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/report.smk"


# Gather jobs are cheap: never queue them on a cluster.
localrules:
    all,
    cache_manifest,
    leaderboard,
    compare,
    study,
    site,
    amd_select,
    amd_audit,
    tune_select,


rule all:
    """Every table of the config: its leaderboard, checked against its published snapshot where there is one."""
    input:
        final_targets(),
    default_target: True


onsuccess:
    for _table in PLAN.tables:
        _check = Path(PLAN.compare_file(_table))
        if _check.exists():
            print(f"{_table}: {_check.read_text().strip().splitlines()[-1]} (details: {_check})")
