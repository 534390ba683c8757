rule evaluate:
    """Joint and per-task test accuracy, parameters and FLOPs of one model or merge."""
    input:
        data=data_path(),
        split=experiment_split,
        model=evaluated_model,
    output:
        eval_path("{seed}", "{experiment}", "{entry}"),
    params:
        record=eval_record,
        batch_size=COMPUTE["eval_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/evaluate/{DATASET}/s{{seed}}/{{experiment}}/{{entry}}.log",
    shell:
        "python -m hetmerge evaluate --data {input.data:q} --split {input.split:q} --model {input.model:q} "
        "--record {params.record:q} --batch-size {params.batch_size} --device {params.device} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"
