rule statistics:
    """Activation extraction: mean and covariance of every feature space of an experiment's models."""
    input:
        data=data_path(),
        split=experiment_split,
        models=experiment_models,
    output:
        stats_path("{seed}", "{experiment}"),
    params:
        batch_size=COMPUTE["merge_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/statistics/{DATASET}/s{{seed}}/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/statistics/{DATASET}/s{{seed}}/{{experiment}}.tsv"
    shell:
        "python -m hetmerge statistics --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--batch-size {params.batch_size:q} --device {params.device:q} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"


rule merge:
    """Merge one experiment's models of one split seed with one configured method."""
    input:
        unpack(merge_inputs),
    output:
        f"{RESULTS}/merges/{DATASET}/s{{seed}}/{{experiment}}/{{method}}.safetensors",
    params:
        method=lambda wc: config["methods"][wc.method]["method"],
        params=lambda wc: as_json(config["methods"][wc.method]["params"]),
        stats=lambda wc, input: ["--stats", input.stats] if "stats" in input.keys() else [],
        batch_size=COMPUTE["merge_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/merge/{DATASET}/s{{seed}}/{{experiment}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge/{DATASET}/s{{seed}}/{{experiment}}/{{method}}.tsv"
    shell:
        "python -m hetmerge merge --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--method {params.method:q} --params {params.params:q} {params.stats:q} --batch-size {params.batch_size:q} "
        "--seed {wildcards.seed:q} --device {params.device:q} --threads {threads} --out {output:q} > {log:q} 2>&1"
