rule cache_shard:
    # The teacher's outputs of one tap for every view of one data shard.
    input:
        data=f"{DATA}/manifest.json",
        teacher=lambda w: f"{tkey_dir(w.tkey)}/metrics.json",
    output:
        f"{RES}/cache/{{tkey}}/{{tapdir}}/shard-{{shard}}.h5",
    params:
        spec=lambda w: config_slice_hash(CFG.protocol.views, CFG.cache),
        teacher_dir=lambda w: tkey_dir(w.tkey),
        tap=lambda w: shlex.quote(tap_from_dirname(w.tapdir)),
    resources:
        mem_mb=3000,
        runtime=60,
    priority: 10  # on the critical path: everything downstream waits for it
    log:
        f"{LOGS}/cache/{{tkey}}/{{tapdir}}/{{shard}}.log",
    shell:
        "kdbench cache {CONF} --threads {threads} --teacher-dir {params.teacher_dir} --data {DATA} --tap {params.tap}"
        " --shard $((10#{wildcards.shard})) --out {output} 2>&1 | tee {log}"


rule cache_manifest:
    # Gather: check every shard of a store and write its manifest last.
    input:
        store_shards,
    output:
        f"{RES}/cache/{{tkey}}/{{tapdir}}/manifest.json",
    params:
        teacher_dir=lambda w: tkey_dir(w.tkey),
        tap=lambda w: shlex.quote(tap_from_dirname(w.tapdir)),
        store=lambda w: f"{RES}/cache/{w.tkey}/{w.tapdir}",
    log:
        f"{LOGS}/cache/{{tkey}}/{{tapdir}}/manifest.log",
    shell:
        "kdbench cache-manifest {CONF} --threads {threads} --teacher-dir {params.teacher_dir} --data {DATA} --tap {params.tap}"
        " --store {params.store} 2> {log}"
