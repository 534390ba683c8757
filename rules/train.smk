rule train:
    """One base model on one task. Claims a free GPU itself when several are visible (see devices.py).

    Training state is kept next to the output (`<output>.resume`, not an output: a failed job keeps it and the
    rerun resumes) and deleted once the model is saved."""
    input:
        data=data_path(),
        split=split_path("{ntasks}", "{seed}"),
    output:
        model_path("{ntasks}", "{seed}", "{arch}", "{task}"),
    params:
        model=lambda wc: as_json(
            {"family": config["architectures"][wc.arch]["family"], "spec": config["architectures"][wc.arch]["spec"]}
        ),
        train=lambda wc: as_json(train_settings(wc.arch)),
        seed=lambda wc: 1000 * int(wc.seed) + 100 * int(wc.ntasks) + string.ascii_uppercase.index(wc.task),
        device=COMPUTE["device"],
    threads: COMPUTE["train_threads"]
    resources:
        gpu=COMPUTE["train_gpus"],
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/train/{DATASET}/t{{ntasks}}-s{{seed}}/{{arch}}-{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{DATASET}/t{{ntasks}}-s{{seed}}/{{arch}}-{{task}}.tsv"
    shell:
        "python -m hetmerge train --data {input.data:q} --split {input.split:q} --task {wildcards.task:q} "
        "--model {params.model:q} --train {params.train:q} --seed {params.seed:q} "
        "--device {params.device:q} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"
