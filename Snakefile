# kdbench: regenerate every leaderboard table from raw data.
#   snakemake --cores 2                                   # the default matrix (Fashion-MNIST, CPU-sized)
#   snakemake --cores 2 --configfile workflow/config/fashion-mnist-full.yaml
#   snakemake --workflow-profile workflow/profiles/slurm  # on a SLURM cluster
from snakemake.utils import min_version

min_version("9.0")

if not config:

    configfile: "workflow/config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        LEADERBOARD,
    default_target: True
