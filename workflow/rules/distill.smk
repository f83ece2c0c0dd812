rule distill:
    """One (teacher, student, method, seed) job of a table under the table's protocol -> a run record."""
    input:
        unpack(distill_inputs),
    output:
        f"{L.RUN}/record.json",
    params:
        spec=lambda wildcards: PLAN.job_hash(job_of(wildcards)),  # rerun trigger
        args=distill_args,
        launch=launch,
        threads=lambda wildcards, threads: max(1, threads // processes(wildcards.table)),  # per process
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: lambda wildcards: processes(wildcards.table) * process_threads(wildcards.table)
    resources:
        **needs(lambda wildcards: NEEDS.distill(job_of(wildcards))),
        **job_gpus(),
    log:
        f"{L.TABLE_LOGS}/distill/{{teacher}}/{{student}}/{{label}}/seed{{seed}}.log",
    shell:
        "{params.launch} distill {params.args} --threads {params.threads} --out {params.out} 2> {log}"
