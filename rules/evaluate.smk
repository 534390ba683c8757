rule evaluate:
    """Joint and per-task test accuracy, parameters and FLOPs of every row of one experiment and split seed.

    One job per experiment: a job's start-up (importing torch) costs more than evaluating a small model.
    """
    input:
        data=data_path(),
        split=experiment_split,
        models=evaluated_models,
    output:
        eval_path("{seed}", "{experiment}"),
    params:
        records=eval_records,
        batch_size=COMPUTE["eval_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/evaluate/{DATASET}/s{{seed}}/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{DATASET}/s{{seed}}/{{experiment}}.tsv"
    shell:
        "python -m hetmerge evaluate --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--records {params.records:q} --batch-size {params.batch_size:q} --device {params.device:q} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"
