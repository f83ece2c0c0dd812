rule train_teacher:
    input:
        f"{DATA}/manifest.json",
    output:
        f"{RES}/teachers/{{teacher}}/metrics.json",
    params:
        spec=lambda w: teacher_hash(w.teacher),
        out=lambda w: f"{RES}/teachers/{w.teacher}",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{LOGS}/teacher/{{teacher}}.log",
    shell:
        "kdbench train-teacher {CONF} --threads {threads} --teacher {wildcards.teacher} --data {DATA} --out {params.out} 2>&1 | tee {log}"


rule train_assistant:
    # A multi-step method's teacher-assistant (TAKD): distilled from the teacher with the method's own
    # loss, then an ordinary teacher for the cache and the distill stage.
    input:
        teacher=f"{RES}/teachers/{{teacher}}/metrics.json",
        stores=lambda w: [f"{RES}/{d}/manifest.json" for d in PLAN.assistant_stores(w.teacher, w.label).values()],
    output:
        f"{RES}/assistants/{{teacher}}/{{label}}/metrics.json",
    params:
        spec=lambda w: distill_hash(w),
        out=lambda w: f"{RES}/assistants/{w.teacher}/{w.label}",
        model=lambda w: PLAN.assistant(w.label),
        stores=lambda w: store_args(PLAN.assistant_stores(w.teacher, w.label)),
    resources:
        mem_mb=4000,
        runtime=120,
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{LOGS}/assistant/{{teacher}}/{{label}}.log",
    shell:
        "kdbench distill {CONF} --threads {threads} --teacher {wildcards.teacher} --student {params.model} --method {wildcards.label} --seed 0"
        " --data {DATA} --teacher-dir {RES}/teachers/{wildcards.teacher} {params.stores} --out {params.out} 2>&1 | tee {log}"
