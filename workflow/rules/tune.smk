# Equal tuning budget (kdbench.tuning): a table with `tune:` runs K trials per (teacher, student, method) cell on
# val, a local select step freezes each cell's winner, and the final runs use it on test. The untuned runs
# (rule distill) stay as they are; the leaderboard shows both.


rule trial:
    """One trial of a tuned cell: its proposed values under the tuning budget, scored on val only."""
    input:
        unpack(trial_inputs),
    output:
        f"{L.TRIAL}/{TRIAL_FILE}",
    params:
        spec=lambda wildcards: tuning.trial_hash(PLAN, wildcards.table, wildcards.teacher, wildcards.student,
                                                 wildcards.label, int(wildcards.trial)),  # rerun trigger
        args=lambda wildcards, output: cell_args(wildcards),
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: job_threads(distill_geometry)
    resources:
        **launch(distill_geometry),
        **needs(lambda wildcards: NEEDS.trial(job_of(wildcards))),
        **job_gpus(distill_geometry),
    priority: 5  # before the untuned runs: a cell's tuned runs wait for all its trials, the untuned runs for nothing
    log:
        f"{L.TABLE_LOGS}/tune/{{teacher}}/{{student}}/{{label}}/trial{{trial}}-seed{{seed}}.log",
    shell:
        "kdbench --processes {resources.processes} trial {params.args} --trial {wildcards.trial}"
        " --seed {wildcards.seed}"
        " --threads {resources.process_threads}"
        " --out {params.out} 2> {log}"


rule tune_select:
    """A tuned cell's winner: the best mean val score over its trials (ties: the configured values)."""
    input:
        trials=select_inputs,
    output:
        selected=f"{L.TUNE}/{SELECTED_FILE}",
        study=f"{L.TUNE}/{STUDY_FILE}",
    params:
        spec=lambda wildcards: tuning.selection_hash(PLAN, wildcards.table, wildcards.teacher, wildcards.student,
                                                     wildcards.label),
        config=lambda wildcards: config_of(wildcards.table),
        cell=lambda wildcards: f"--teacher {q(wildcards.teacher)} --student {q(wildcards.student)}"
        f" --method-label {q(wildcards.label)}",
        out=lambda wildcards, output: Path(output.selected).parent,
    log:
        f"{L.TABLE_LOGS}/tune/{{teacher}}/{{student}}/{{label}}/select.log",
    shell:
        "kdbench tune-select --config {params.config} {params.cell} --trials {input.trials} --out {params.out}"
        " 2> {log}"


rule distill_tuned:
    """A final run of a tuned table: one seed of a cell with the cell's selected values, on test."""
    input:
        unpack(tuned_inputs),
    output:
        f"{L.TUNED_RUN}/record.json",
    params:
        spec=lambda wildcards: PLAN.job_hash(job_of(wildcards)),  # (the selection is an input)
        args=distill_args,
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: job_threads(distill_geometry)
    resources:
        **launch(distill_geometry),
        **needs(lambda wildcards: NEEDS.distill(job_of(wildcards))),
        **job_gpus(distill_geometry),
    priority: 5  # likewise: the untuned runs, which nothing waits for, fill the cores last
    log:
        f"{L.TABLE_LOGS}/tuned/{{teacher}}/{{student}}/{{label}}/seed{{seed}}.log",
    shell:
        "kdbench --processes {resources.processes} distill {params.args} --tuned {input.selected}"
        " --threads {resources.process_threads} --out {params.out}"
        " 2> {log}"
