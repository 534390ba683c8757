rule merge:
    """Merge one experiment's models of one split seed with one configured method."""
    input:
        data=data_path(),
        split=split_path("{seed}"),
        models=experiment_models,
    output:
        f"{RESULTS}/merges/{DATASET}/seed{{seed}}/{{experiment}}/{{method}}.safetensors",
    params:
        method=lambda wc: config["methods"][wc.method]["method"],
        params=lambda wc: as_json(config["methods"][wc.method]["params"]),
        batch_size=COMPUTE["merge_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    log:
        f"{RESULTS}/logs/merge/{DATASET}/seed{{seed}}/{{experiment}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge/{DATASET}/seed{{seed}}/{{experiment}}/{{method}}.tsv"
    shell:
        "hetmerge merge --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--method {params.method} --params {params.params:q} --batch-size {params.batch_size} "
        "--seed {wildcards.seed} --device {params.device} --threads {threads} --out {output:q} > {log:q} 2>&1"
