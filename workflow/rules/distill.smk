rule distill:
    # One (teacher, student, method, seed) cell under the config's protocol.
    input:
        unpack(distill_inputs),
    output:
        f"{RES}/runs/{{teacher}}/{{student}}/{{label}}/seed{{seed}}/record.json",
    params:
        spec=distill_hash,
        args=distill_args,
        out=lambda w: f"{RES}/runs/{w.teacher}/{w.student}/{w.label}/seed{w.seed}",
    resources:
        mem_mb=3000,
        runtime=120,
    log:
        f"{LOGS}/distill/{{teacher}}/{{student}}/{{label}}/seed{{seed}}.log",
    shell:
        "kdbench distill {CONF} --threads {threads} --teacher {wildcards.teacher} --student {wildcards.student} --method {wildcards.label}"
        " --seed {wildcards.seed} --data {DATA} {params.args} --out {params.out} 2>&1 | tee {log}"
