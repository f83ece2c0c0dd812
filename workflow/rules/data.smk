rule prepare_data:
    """Raw dataset -> webdataset shards + manifest (one directory per data config, shared by every table)."""
    output:
        f"{L.DATA}/manifest.json",
    params:
        args=data_owner_args,
        out=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{L.LOGS}/data/{{dkey}}.log",
    shell:
        "kdbench prepare-data {params.args} --out {params.out} 2> {log}"
