def evaluated_model(wc):
    """A merge output, or for the model_a/model_b/... rows the source model itself."""
    if wc.entry.startswith("model_"):
        task = wc.entry.removeprefix("model_").upper()
        arch = config["experiments"][wc.experiment]["models"][TASKS.index(task)]
        return model_path(wc.seed, arch, task)
    return f"{RESULTS}/merges/{DATASET}/seed{wc.seed}/{wc.experiment}/{wc.entry}.safetensors"


def eval_record(wc):
    """Fields the report needs, plus this row's config slice (so a label edit re-labels the row)."""
    exp = config["experiments"][wc.experiment]
    if wc.entry.startswith("model_"):
        task = wc.entry.removeprefix("model_").upper()
        kind, label, slice_ = "base", f"Model {task}", {"architecture": exp["models"][TASKS.index(task)]}
    else:
        entry = config["methods"][wc.entry]
        kind, label, slice_ = "merge", entry.get("label", wc.entry), entry
    return as_json(
        {
            "dataset": DATASET,
            "arch": wc.experiment,
            "arch_label": experiment_label(wc.experiment),
            "pair": int(wc.seed),
            "method": wc.entry,
            "label": label,
            "kind": kind,
            "config": slice_,
        }
    )


rule evaluate:
    """Joint and per-task test accuracy, parameters and FLOPs of one model or merge."""
    input:
        data=data_path(),
        split=split_path("{seed}"),
        model=evaluated_model,
    output:
        f"{RESULTS}/eval/{DATASET}/seed{{seed}}/{{experiment}}/{{entry}}.json",
    params:
        record=eval_record,
        batch_size=COMPUTE["eval_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate/{DATASET}/seed{{seed}}/{{experiment}}/{{entry}}.log",
    shell:
        "hetmerge evaluate --data {input.data:q} --split {input.split:q} --model {input.model:q} "
        "--record {params.record:q} --batch-size {params.batch_size} --device {params.device} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"
