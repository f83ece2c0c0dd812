rule train_teacher:
    """Train (or load from its checkpoint) one teacher; shared by every table that names the same teacher."""
    input:
        unpack(teacher_inputs),
    output:
        f"{L.TEACHER}/metrics.json",
    params:
        config=lambda wildcards, output: config_of(PLAN.teachers[wildcards.tkey].table),
        teacher=lambda wildcards, output: q(PLAN.teachers[wildcards.tkey].teacher),
        data=lambda wildcards, input: Path(input.data).parent,
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: job_threads(teacher_geometry)  # 2 per process, + streamed data's workers
    resources:
        **launch(teacher_geometry),
        **needs(lambda wildcards: NEEDS.teacher(PLAN.teachers[wildcards.tkey])),
        **job_gpus(teacher_geometry),
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{L.LOGS}/teachers/{{tkey}}.log",
    shell:
        "kdbench --processes {resources.processes} train-teacher --config {params.config}"
        " --threads {resources.process_threads} --teacher {params.teacher}"
        " --data {params.data} --out {params.out} 2> {log}"


rule verify_teacher:
    """Check a checkpoint teacher's test top-1 against its config's expected_top1 (within top1_tolerance) before
    its teacher job runs; a wrong checkpoint stops the workflow before any store or distill job of the teacher."""
    input:
        unpack(verify_inputs),
    output:
        L.TEACHER_VERIFIED,
    params:
        spec=lambda wildcards: PLAN.verification_spec(wildcards.tkey),  # rerun trigger: the expected accuracy
        args=verify_args,
    threads: 2
    resources:
        **needs(lambda wildcards: NEEDS.verify(PLAN.teachers[wildcards.tkey])),
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{L.LOGS}/teachers/{{tkey}}.verify.log",
    shell:
        "kdbench verify-teacher {params.args} --threads {threads} --out {output} 2> {log}"


rule train_assistant:
    """A multi-step method's teacher-assistant: TAKD's distilled from the teacher with the method's own loss,
    AMD's selected candidate fine-tuned from its searched weights; then an ordinary teacher for the cache and the
    distill stage."""
    input:
        unpack(assistant_inputs),
    output:
        f"{L.ASSISTANT}/metrics.json",
    params:
        command=assistant_command,
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: job_threads(assistant_geometry)  # + streamed data's workers
    resources:
        **launch(assistant_geometry),
        **needs(lambda wildcards: NEEDS.teacher(PLAN.teachers[wildcards.akey])),
        **job_gpus(assistant_geometry),
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{L.LOGS}/assistants/{{akey}}.log",
    shell:
        "kdbench --processes {resources.processes} {params.command} --threads {resources.process_threads}"
        " --out {params.out} 2> {log}"


rule amd_search:
    """AMD: prune the teacher into nested candidates and train them jointly (shared weights, teacher outputs
    from the stores); every candidate's weights and validation accuracy, candidates.json last."""
    input:
        unpack(search_inputs),
    output:
        f"{L.SEARCH}/candidates.json",
    params:
        args=search_args,
        out=lambda wildcards, output: Path(output[0]).parent,
    # 1 (+ streamed data's workers): the search runs while single-thread trial and distill jobs fill the cores, and
    # a 2-thread job waits until two cores are free at once, which on a small machine is never (the zoo's search
    # started 60 min into a 65 min run); a GPU job gains nothing from a second CPU
    threads: lambda wildcards: PLAN.job_threads(PLAN.teacher_data_key(wildcards.akey))
    resources:
        **needs(lambda wildcards: NEEDS.search(PLAN.teachers[wildcards.akey])),
    priority: 10
    log:
        f"{L.LOGS}/assistants/{{akey}}.search.log",
    shell:
        "kdbench amd-search {params.args} --threads {threads} --out {params.out} 2> {log}"


rule amd_select:
    """AMD: npsd-approx over the logged candidate accuracies (a pure function of candidates.json)."""
    input:
        f"{L.SEARCH}/candidates.json",
    output:
        f"{L.SEARCH}/selection.json",
    params:
        search=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{L.LOGS}/assistants/{{akey}}.select.log",
    shell:
        "kdbench amd-select --search {params.search} 2> {log}"


rule amd_oracle:
    """AMD's audit: a short run from one candidate (live) to one student, one seed (paired across candidates)."""
    input:
        unpack(oracle_inputs),
    output:
        f"{L.ORACLE}/record.json",
    params:
        args=oracle_args,
        out=lambda wildcards, output: Path(output[0]).parent,
    threads: lambda wildcards: PLAN.job_threads(PLAN.teacher_data_key(wildcards.akey))  # + streamed data's workers
    resources:
        **needs(lambda wildcards: NEEDS.oracle(PLAN.teachers[wildcards.akey], wildcards.student)),
    log:
        f"{L.LOGS}/assistants/{{akey}}.oracle.{{student}}.c{{cand}}.seed{{seed}}.log",
    shell:
        "kdbench amd-oracle {params.args} --threads {threads} --out {params.out} 2> {log}"


rule amd_audit:
    """AMD's audit table: per candidate the search's numbers and the oracle's (seeds), the verdict, Spearman,
    regret and the pick's stability."""
    input:
        unpack(audit_inputs),
    output:
        md=f"{L.AUDIT}.md",
        json=f"{L.AUDIT}.json",
    params:
        args=audit_args,
    log:
        f"{L.TABLE_LOGS}/audit.{{teacher}}.{{label}}.log",
    shell:
        "kdbench amd-audit {params.args} --out {output.md} 2> {log}"
