def evaluated_model(wc):
    """A merge output, or for the model_a/model_b/... rows the source model itself."""
    if wc.entry.startswith("model_"):
        task = wc.entry.removeprefix("model_").upper()
        models = config["experiments"][wc.experiment]["models"]
        return model_path(len(models), wc.seed, models[tasks_of(wc.experiment).index(task)], task)
    return f"{RESULTS}/merges/{DATASET}/s{wc.seed}/{wc.experiment}/{wc.entry}.safetensors"


def eval_record(wc):
    """Fields the report needs, plus this row's config slice (so a label edit re-labels the row)."""
    exp = config["experiments"][wc.experiment]
    if wc.entry.startswith("model_"):
        task = wc.entry.removeprefix("model_").upper()
        kind, label, slice_ = "base", f"Model {task}", {"architecture": exp["models"][tasks_of(wc.experiment).index(task)]}
    else:
        entry = config["methods"][wc.entry]
        kind = "ensemble" if entry["method"] == "ensemble" else "merge"
        label, slice_ = entry.get("label", wc.entry), entry
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
        split=experiment_split,
        model=evaluated_model,
    output:
        eval_path("{seed}", "{experiment}", "{entry}"),
    params:
        record=eval_record,
        batch_size=COMPUTE["eval_batch_size"],
        device=COMPUTE["device"],
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate/{DATASET}/s{{seed}}/{{experiment}}/{{entry}}.log",
    shell:
        "hetmerge evaluate --data {input.data:q} --split {input.split:q} --model {input.model:q} "
        "--record {params.record:q} --batch-size {params.batch_size} --device {params.device} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"
