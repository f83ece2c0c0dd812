rule leaderboard:
    input:
        all_records(),
    output:
        LEADERBOARD,
    params:
        out=f"results/leaderboard/{CFG.name}",
    log:
        f"{LOGS}/leaderboard.log",
    shell:
        "kdbench leaderboard {CONF} --threads {threads} --runs {input} --out {params.out} 2> {log}"
