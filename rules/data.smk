rule dataset:
    """Find the dataset locally (configured roots) or download it with checksums; store it prepared."""
    output:
        PLAN["data"]["path"],
    log:
        f"{RESULTS}/logs/dataset/{PLAN['data']['dataset']}.log",
    conda:
        "../envs/hetmerge.yaml"
    params:
        dataset=PLAN["data"]["dataset"],
        roots=config["dataset"]["roots"],
        download="--download" if config["dataset"]["download"] else "--no-download",
        download_root=config["dataset"]["download_root"],
        verify="" if config["dataset"]["verify"] else "--no-verify",
    shell:
        "python -m hetmerge data --dataset {params.dataset:q} --roots {params.roots:q} "
        "{params.download:q} {params.verify:q} --download-root {params.download_root:q} --out {output:q} > {log:q} 2>&1"


rule split:
    """Class-disjoint tasks and a held-out merge slice, or N models' partitions of one task and a fusion set, drawn
    from one seed."""
    input:
        PLAN["data"]["path"],
    output:
        f"{RESULTS}/splits/{{name}}.json",
    log:
        stage_log("split"),
    conda:
        "../envs/hetmerge.yaml"
    params:
        options=split_options,
        code=field("split", "code"),
    shell:
        "python -m hetmerge split --data {input:q} {params.options:q} --out {output:q} > {log:q} 2>&1"
