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
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{L.LOGS}/teachers/{{tkey}}.log",
    shell:
        "kdbench train-teacher --config {params.config} --threads {threads} --teacher {params.teacher}"
        " --data {params.data} --out {params.out} 2> {log}"


rule train_assistant:
    """A multi-step method's teacher-assistant (TAKD): distilled from the teacher with the method's own loss,
    then an ordinary teacher for the cache and the distill stage."""
    input:
        unpack(assistant_inputs),
    output:
        f"{L.ASSISTANT}/metrics.json",
    params:
        args=assistant_args,
        out=lambda wildcards, output: Path(output[0]).parent,
    resources:
        mem_mb=4000,
        runtime=120,
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{L.LOGS}/assistants/{{akey}}.log",
    shell:
        "kdbench distill {params.args} --threads {threads} --out {params.out} 2> {log}"
