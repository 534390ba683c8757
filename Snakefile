# hetmerge: dataset → base models → merges → evaluation → paper tables and figures, as one DAG.
# Run:  snakemake all --cores 8 --resources gpu=2     (see README.md)
from snakemake.utils import min_version, validate

min_version("9.0")


# A --configfile given on the command line replaces the default instead of being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "config/schema.yaml", set_default=True)


# `snakemake --report results/report.html`: this text opens the report; captions: each report layout declares its own.
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/analysis.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT_FILES,
