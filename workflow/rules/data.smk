rule prepare_data:
    output:
        manifest=f"{DATA}/manifest.json",
    params:
        spec=config_slice_hash(CFG.data),
    log:
        f"{LOGS}/prepare_data.log",
    shell:
        "kdbench prepare-data {CONF} --threads {threads} --out {DATA} 2> {log}"
