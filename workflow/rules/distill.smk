rule distill:
    """One (teacher, student, method, seed) job of a table under the table's protocol -> a run record."""
    input:
        unpack(distill_inputs),
    output:
        f"{L.RUN}/record.json",
    params:
        spec=lambda wildcards: PLAN.job_hash(job_of(wildcards)),  # rerun trigger
        args=distill_args,
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: job_threads(distill_geometry)
    resources:
        **launch(distill_geometry),
        **needs(lambda wildcards: NEEDS.distill(job_of(wildcards))),
        **job_gpus(distill_geometry),
    log:
        f"{L.TABLE_LOGS}/distill/{{teacher}}/{{student}}/{{label}}/seed{{seed}}.log",
    shell:
        "kdbench --processes {resources.processes} distill {params.args} --threads {resources.process_threads}"
        " --out {params.out} 2> {log}"
