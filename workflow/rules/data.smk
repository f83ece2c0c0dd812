rule data_shards:
    """One group of data shards (`data.shards_per_job` of them) and its part file (counts, sha256s, pixel sums)."""
    output:
        L.DATA_PART,
    params:
        args=data_owner_args,
        out=data_dir,
    log:
        f"{L.LOGS}/data/{{dkey}}/group-{{group}}.log",
    shell:
        "kdbench prepare-data {params.args} --out {params.out} --group $((10#{wildcards.group})) 2> {log}"


rule prepare_data:
    """Raw dataset -> webdataset shards + manifest (one directory per data config, shared by every table); with
    `data.shards_per_job` set, the merge of the data_shards jobs' parts into the manifest."""
    input:
        data_parts,
    output:
        f"{L.DATA}/manifest.json",
    params:
        args=data_owner_args,
        out=data_dir,
    log:
        f"{L.LOGS}/data/{{dkey}}.log",
    shell:
        "kdbench prepare-data {params.args} --out {params.out} 2> {log}"
