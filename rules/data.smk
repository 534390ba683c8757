rule dataset:
    """Find the dataset locally (configured roots) or download it with checksums; store it prepared."""
    output:
        data_path(),
    params:
        dataset=DATASET,
        roots=config["dataset"]["roots"],
        download="--download" if config["dataset"]["download"] else "--no-download",
        download_root=config["dataset"]["download_root"],
        verify="" if config["dataset"]["verify"] else "--no-verify",
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/dataset/{DATASET}.log",
    shell:
        "python -m hetmerge data --dataset {params.dataset:q} --roots {params.roots:q} "
        "{params.download:q} {params.verify:q} --download-root {params.download_root:q} --out {output:q} > {log:q} 2>&1"


rule split:
    """Class-disjoint tasks and a held-out merge slice, drawn from one seed."""
    input:
        data_path(),
    output:
        split_path("{ntasks}", "{seed}"),
    params:
        merge_per_class=config["split"]["merge_per_class"],
        train_per_task=as_json(config["split"]["train_per_task"]),
        test_per_task=as_json(config["split"]["test_per_task"]),
    conda:
        "../envs/hetmerge.yaml"
    log:
        f"{RESULTS}/logs/split/{DATASET}/t{{ntasks}}-s{{seed}}.log",
    shell:
        "python -m hetmerge split --data {input:q} --seed {wildcards.seed:q} --num-tasks {wildcards.ntasks:q} "
        "--merge-per-class {params.merge_per_class:q} --train-per-task {params.train_per_task:q} "
        "--test-per-task {params.test_per_task:q} --out {output:q} > {log:q} 2>&1"
