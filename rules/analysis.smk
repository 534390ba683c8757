rule lambda_sweep:
    """MuDSC at every λ of the figure: merge-slice accuracy (what λ is chosen by) and test accuracy."""
    input:
        unpack(merge_inputs),
    output:
        lambda_sweep_path("{seed}", "{experiment}", "{method}"),
    params:
        method=lambda wc: config["methods"][wc.method]["method"],
        params=lambda wc: as_json(config["methods"][wc.method]["params"]),
        values=config["analysis"]["lambda_values"],
        selectable=lambda wc: list(
            build_method("mudsc", config["methods"][wc.method]["params"]).params.lam_grid
        ),
        record=lambda wc: analysis_record(wc, "lambda_sweep"),
        batch_size=COMPUTE["merge_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/lambda_sweep/{DATASET}/s{{seed}}/{{experiment}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/lambda_sweep/{DATASET}/s{{seed}}/{{experiment}}/{{method}}.tsv"
    shell:
        "python -m hetmerge sweep --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--stats {input.stats:q} --method {params.method:q} --params {params.params:q} --param lam "
        "--values {params.values:q} --selectable {params.selectable:q} --record {params.record:q} "
        "--batch-size {params.batch_size:q} --seed {wildcards.seed:q} --device {params.device:q} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"


rule landscape:
    """Each task's loss on the plane through models A, B and one merge, every merge of the table placed on it."""
    input:
        data=data_path(),
        split=experiment_split,
        models=experiment_models,
        merges=lambda wc: list(landscape_merges(wc).values()),
    output:
        landscape_path("{seed}", "{experiment}"),
    params:
        rows=lambda wc: list(landscape_merges(wc)),
        labels=lambda wc: [config["methods"][m].get("label", m) for m in landscape_merges(wc)],
        plane=lambda wc: config["experiments"][wc.experiment]["landscape"],
        steps=config["analysis"]["landscape_steps"],
        per_task=config["analysis"]["landscape_per_task"],
        record=lambda wc: analysis_record(wc, "landscape"),
        batch_size=COMPUTE["merge_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/landscape/{DATASET}/s{{seed}}/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/landscape/{DATASET}/s{{seed}}/{{experiment}}.tsv"
    shell:
        "python -m hetmerge landscape --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--merges {input.merges:q} --keys {params.rows:q} --labels {params.labels:q} --plane {params.plane:q} "
        "--steps {params.steps:q} --per-task {params.per_task:q} --record {params.record:q} "
        "--batch-size {params.batch_size:q} --device {params.device:q} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"
