rule train:
    """One base model on one task, evaluated on the test set (result JSON next to it). Claims a free GPU itself
    when several are visible (see devices.py).

    Training state is kept next to the output (`<output>.resume`, not an output: a failed job keeps it and the
    rerun resumes) and deleted once the model is saved."""
    input:
        data=PLAN["data"]["path"],
        split=field("train", "split"),
    output:
        model=f"{RESULTS}/models/{{name}}.safetensors",
        result=f"{RESULTS}/models/{{name}}.json",
    log:
        stage_log("train"),
    benchmark:
        stage_benchmark("train")
    # training first: everything else waits for models, and the long jobs must not be left for the end
    priority: 1
    conda:
        "../envs/hetmerge.yaml"
    threads: COMPUTE["train_threads"]
    resources:
        gpu=COMPUTE["train_gpus"],
    params:
        args=field("train", "args"),
        model=as_json("train", "args", "model"),
        train=as_json("train", "args", "train"),
        options=train_options,
        code=field("train", "code"),
        device=COMPUTE["device"],
    shell:
        "python -m hetmerge train --data {input.data:q} --split {input.split:q} --task {params.args[task]:q} "
        "{params.options:q} --model {params.model:q} --train {params.train:q} --seed {params.args[seed]:q} "
        "--eval-batch-size {params.args[eval_batch_size]:q} --device {params.device:q} --threads {threads} "
        "--out {output.model:q} --result {output.result:q} > {log:q} 2>&1"
