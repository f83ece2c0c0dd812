rule leaderboard:
    """Gather: a table's run records -> leaderboard (md / csv / html) and plots."""
    input:
        table_records,
    output:
        md=report(
            f"{L.LEADERBOARD}/leaderboard.md",
            category="{table}",
            labels={"table": "{table}", "file": "leaderboard (markdown)"},
        ),
        csv=report(
            f"{L.LEADERBOARD}/leaderboard.csv",
            category="{table}",
            labels={"table": "{table}", "file": "leaderboard (csv)"},
        ),
        html=report(
            f"{L.LEADERBOARD}/index.html",
            category="{table}",
            labels={"table": "{table}", "file": "leaderboard with plots"},
        ),
        runs=f"{L.LEADERBOARD}/runs.csv",
    params:
        spec=lambda wildcards: PLAN.table_hash(wildcards.table),  # rerun trigger: protocol, grid, name
        config=leaderboard_config,  # (and --selection, for a selection of the table)
        out=lambda wildcards, output: Path(output.md).parent,
    log:
        f"{L.TABLE_LOGS}/leaderboard.log",
    shell:
        "kdbench leaderboard --config {params.config} --runs {input} --out {params.out} 2> {log}"


rule compare:
    """A table's regenerated leaderboard against its published snapshot (results/published/<table>/)."""
    input:
        unpack(compare_inputs),
    output:
        report(L.COMPARE, category="{table}", labels={"table": "{table}", "file": "reproduction check"}),
    params:
        new=lambda wildcards, input: Path(input.new).parent,
        published=lambda wildcards, input: Path(input.published).parent,
    log:
        f"{L.TABLE_LOGS}/compare.log",
    shell:
        "kdbench compare {params.new} {params.published} --out {output} --exit-zero 2> {log}"


rule study:
    """Gather: the run records of every table of a suite with a `study:` -> one table (md / csv), one plot of
    accuracy against store bytes, and the lossless check of the live teacher against the cache at V = E."""
    input:
        study_records,
    output:
        md=report(f"{L.STUDY}/study.md", category="{study}", labels={"study": "{study}", "file": "study"}),
        csv=f"{L.STUDY}/study.csv",
        png=report(f"{L.STUDY}/study.png", category="{study}", labels={"study": "{study}", "file": "plot"}),
    params:
        spec=lambda wildcards: [PLAN.table_hash(t) for t in STUDY.tables],  # rerun trigger: the tables' grids
        name=lambda wildcards: q(wildcards.study),
        out=lambda wildcards, output: Path(output.md).parent,
    log:
        f"{L.STUDY_LOGS}/study.log",
    shell:
        "kdbench study --name {params.name} --runs {input} --out {params.out} 2> {log}"


rule site:
    """The run's results site (results/site/, never committed): every table's page rebuilt from its runs.csv, the
    study's page, each linked to its neighbours and files, and a front page with the method x table matrix. The
    committed results/published/ site is rebuilt by `kdbench site` (the same code)."""
    input:
        unpack(site_inputs),
    output:
        report(f"{L.SITE}/index.html", category="site", labels={"file": "results site"}),
    params:
        tables=lambda wildcards, input: " ".join(q(str(Path(p).parent)) for p in input.tables),
        studies=lambda wildcards, input: " ".join(q(str(Path(p).parent)) for p in input.studies),
        out=lambda wildcards, output: q(str(Path(output[0]).parent)),
    log:
        f"{L.LOGS}/site.log",
    shell:
        "kdbench site --tables {params.tables} --studies {params.studies} --out {params.out} 2> {log}"
