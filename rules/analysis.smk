rule landscape:
    """Each task's loss on the plane through models A, B and one merge, with the pair's other merges on it."""
    input:
        data=PLAN["data"]["path"],
        split=field("landscape", "split"),
        models=field("landscape", "models"),
        merges=lambda wc: list(job("landscape")(wc)["merges"].values()),
    output:
        f"{RESULTS}/landscape/{{name}}.json",
    log:
        stage_log("landscape"),
    benchmark:
        stage_benchmark("landscape")
    # long, and last before the report: started as soon as its merges exist, so no core idles at the end
    priority: 2
    conda:
        "../envs/hetmerge.yaml"
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    params:
        args=field("landscape", "args"),
        rows=lambda wc: list(job("landscape")(wc)["merges"]),
        code=field("landscape", "code"),
        device=COMPUTE["device"],
    shell:
        "python -m hetmerge landscape --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--merges {input.merges:q} --keys {params.rows:q} --plane {params.args[plane]:q} "
        "--steps {params.args[steps]:q} --per-task {params.args[per_task]:q} "
        "--batch-size {params.args[batch_size]:q} --device {params.device:q} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"
