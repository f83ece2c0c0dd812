rule cache_shard:
    """The teacher's outputs of one tap for every view of one data shard."""
    input:
        unpack(store_inputs),
    output:
        L.SHARD,
    params:
        args=store_args,
        store=lambda wildcards, output: Path(output[0]).parent,
    threads: job_threads(store_geometry)  # every process's CPUs (+ streamed data's workers)
    resources:
        **launch(store_geometry),
        **needs(lambda wildcards: NEEDS.store_shard(store_of(wildcards))),
        **job_gpus(store_geometry),
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{L.LOGS}/cache/{{key}}/{{spec}}/{{tapdir}}/{{shard}}.log",
    shell:
        "kdbench --processes {resources.processes} cache {params.args} --threads {resources.process_threads}"
        " --store {params.store}"
        " --shard $((10#{wildcards.shard})) 2> {log}"


rule cache_manifest:
    """Gather: check every shard of a store and write its manifest (last)."""
    input:
        store_shards,
    output:
        f"{L.STORE}/manifest.json",
    params:
        args=store_args,
        store=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{L.LOGS}/cache/{{key}}/{{spec}}/{{tapdir}}/manifest.log",
    shell:
        "kdbench cache-manifest {params.args} --threads {threads} --store {params.store} 2> {log}"
