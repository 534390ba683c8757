rule train:
    """One base model on one task. Claims a free GPU itself when several are visible (see devices.py)."""
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
        resume_dir=f"{RESULTS}/resume",
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
        "python -m hetmerge train --data {input.data:q} --split {input.split:q} --task {wildcards.task} "
        "--model {params.model:q} --train {params.train:q} --seed {params.seed} "
        "--resume-dir {params.resume_dir:q} --device {params.device} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"
