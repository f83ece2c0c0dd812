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
    threads: lambda wildcards: PLAN.job_threads(PLAN.data_key(wildcards.table))  # + loader workers if streamed
    resources:
        **needs(lambda wildcards: NEEDS.distill(job_of(wildcards))),
    log:
        f"{L.TABLE_LOGS}/distill/{{teacher}}/{{student}}/{{label}}/seed{{seed}}.log",
    shell:
        "kdbench distill {params.args} --threads {threads} --out {params.out} 2> {log}"
