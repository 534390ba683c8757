rule statistics:
    """Activation extraction: mean and covariance of every feature space of one ordered list of models."""
    input:
        data=PLAN["data"]["path"],
        split=field("statistics", "split"),
        models=field("statistics", "models"),
    output:
        f"{RESULTS}/stats/{{name}}.safetensors",
    log:
        stage_log("statistics"),
    benchmark:
        stage_benchmark("statistics")
    conda:
        "../envs/hetmerge.yaml"
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    params:
        args=field("statistics", "args"),
        code=field("statistics", "code"),
        device=COMPUTE["device"],
    shell:
        "python -m hetmerge statistics --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--batch-size {params.args[batch_size]:q} --device {params.device:q} --threads {threads} "
        "--out {output:q} > {log:q} 2>&1"


rule precompute:
    """An input that methods declare in `precomputed` and read, computed once per ordered list of models and
    seed (the registry's PRECOMPUTE names what computes it)."""
    input:
        data=PLAN["data"]["path"],
        split=field("precompute", "split"),
        models=field("precompute", "models"),
    output:
        f"{RESULTS}/precomputed/{{name}}.json",
    log:
        stage_log("precompute"),
    benchmark:
        stage_benchmark("precompute")
    conda:
        "../envs/hetmerge.yaml"
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    params:
        args=field("precompute", "args"),
        code=field("precompute", "code"),
        device=COMPUTE["device"],
    shell:
        "python -m hetmerge precompute --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--name {params.args[name]:q} --batch-size {params.args[batch_size]:q} --device {params.device:q} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"


rule merge:
    """Merge one ordered list of models with one method and its parameters; evaluate the merge (result JSON)."""
    input:
        unpack(merge_inputs),
    output:
        model=f"{RESULTS}/merges/{{name}}.safetensors",
        result=f"{RESULTS}/merges/{{name}}.json",
    log:
        stage_log("merge"),
    benchmark:
        stage_benchmark("merge")
    conda:
        "../envs/hetmerge.yaml"
    threads: 1
    resources:
        gpu=GPU_SLOTS,
    params:
        args=field("merge", "args"),
        params=as_json("merge", "args", "params"),
        options=merge_options,
        code=field("merge", "code"),
        device=COMPUTE["device"],
    shell:
        "python -m hetmerge merge --data {input.data:q} --split {input.split:q} --models {input.models:q} "
        "--method {params.args[method]:q} --params {params.params:q} {params.options:q} "
        "--curve-values {params.args[curve_values]:q} --batch-size {params.args[batch_size]:q} "
        "--eval-batch-size {params.args[eval_batch_size]:q} --seed {params.args[seed]:q} "
        "--device {params.device:q} --threads {threads} --out {output.model:q} --result {output.result:q} "
        "> {log:q} 2>&1"
