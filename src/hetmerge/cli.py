"""The `hetmerge` command line: one subcommand per pipeline stage, each usable without Snakemake.

Snakemake rules call these with their slice of the config as JSON, so that a config edit reruns exactly
the stages whose arguments changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hetmerge import __version__
from hetmerge.atomic import write_json

if TYPE_CHECKING:  # the methods import torch, which the CLI loads only in the commands that need it
    from hetmerge.methods import MergeMethod


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err


def cmd_data(args: argparse.Namespace) -> None:
    from hetmerge.data import load_dataset, save_prepared

    ds = load_dataset(
        args.dataset,
        [Path(r) for r in args.roots],
        download=args.download,
        download_root=Path(args.download_root),
        verify=not args.no_verify,
    )
    save_prepared(ds, args.out)
    print(f"{ds.name}: {len(ds.train_labels)} train / {len(ds.test_labels)} test images of shape {ds.input_shape}")


def cmd_split(args: argparse.Namespace) -> None:
    from hetmerge.data import load_prepared, make_class_disjoint_split, make_same_task_split, save_split

    ds = load_prepared(args.data)
    if args.kind == "class_disjoint":
        if args.merge_per_class is None:
            raise ValueError("split kind 'class_disjoint' needs --merge-per-class")
        split = make_class_disjoint_split(
            ds.train_labels,
            ds.test_labels,
            ds.num_classes,
            args.num_tasks,
            args.seed,
            merge_per_class=args.merge_per_class,
            train_per_task=args.train_per_task,
            test_per_task=args.test_per_task,
            dataset=ds.name,
        )
    else:
        if args.fusion_size is None:
            raise ValueError(f"split kind {args.kind!r} needs --fusion-size")
        split = make_same_task_split(
            ds.train_labels,
            ds.test_labels,
            ds.num_classes,
            args.num_tasks,
            args.kind,
            args.seed,
            fusion_size=args.fusion_size,
            train_total=args.train_per_task,
            test_total=args.test_per_task,
            dataset=ds.name,
            concentration=tuple(args.concentration),
        )
    save_split(split, args.out)
    for task in split.tasks:
        print(f"task {task.name}: classes {list(task.classes)}, {len(split.train_indices[task.name])} train images")
    for name, indices in split.partitions.items():
        print(f"model {name}: {len(indices)} train images, class shares {[round(s, 3) for s in split.shares[name]]}")


def _setup(threads: int, device: str) -> Any:
    import torch

    from hetmerge.devices import select_device

    torch.set_num_threads(threads)
    return select_device(device)


def cmd_train(args: argparse.Namespace) -> None:
    from hetmerge.checkpoint import save_model
    from hetmerge.data import load_prepared, load_split
    from hetmerge.models import FAMILIES, build_model
    from hetmerge.params import parse_params
    from hetmerge.provenance import provenance
    from hetmerge.training import (
        TrainSettings,
        make_deterministic,
        resolve_channels_last,
        resolve_precision,
        train_model,
    )

    device = _setup(args.threads, args.device)
    ds, split = load_prepared(args.data), load_split(args.split)
    settings = parse_params(TrainSettings, args.train, "training settings")
    make_deterministic(args.seed, device)
    task = split.task(args.task)
    family = args.model.get("family") if isinstance(args.model, dict) else None
    if not isinstance(family, str) or not set(args.model) <= {"family", "spec"}:
        raise ValueError(
            f"--model needs 'family' (one of {sorted(FAMILIES)}) and optionally 'spec', nothing else; "
            f"got {json.dumps(args.model)}"
        )
    model = build_model(family, args.model.get("spec"), ds.input_shape, {task.name: len(task.classes)})
    # next to the output: keyed by its full path, so jobs of other seeds, task counts or datasets never share it
    resume = Path(args.out).with_name(Path(args.out).name + ".resume")
    t0 = time.perf_counter()
    history = train_model(model, ds, split, task.name, settings, args.seed, device, resume, args.partition)
    info = {
        "dataset": ds.name,
        "split_seed": split.seed,
        "task": task.name,
        **({"partition": args.partition} if args.partition else {}),
        "classes": list(task.classes),
        "seed": args.seed,
        "train": settings.describe(),
        "precision": resolve_precision(settings.precision, device),
        "channels_last": resolve_channels_last(settings.channels_last, model, device),
        "history": history,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "provenance": provenance(device),
    }
    save_model(model, args.out, info)
    resume.unlink(missing_ok=True)
    if args.result:
        # a same-task model's share of each class's data weights its softmax in the paper's ensemble
        share = {"data_share": list(split.shares[args.partition])} if args.partition else {}
        write_result(args.result, "base", model, ds, split, info, device, args.eval_batch_size, **share)


def write_result(
    path: str,
    kind: str,
    model: Any,
    ds: Any,
    split: Any,
    info: dict[str, Any],
    device: Any,
    batch_size: int,
    *,
    tested: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """The small result JSON next to a trained model or merge: test metrics, cost, and what made it.

    A base model also keeps each test image's top logit and correctness, so that ensembles of base models are
    scored without running them again, and on a same-task split (its one task has every class) all its logits,
    for the ensemble that weights members per class. `tested`: the model's test accuracies where the job already
    has them (computed with `batch_size`), so that they are not computed twice."""
    base = kind == "base"
    record = evaluation_record(
        model,
        ds,
        split,
        info,
        device,
        batch_size,
        predictions=base,
        logits=base and bool(split.partitions),
        tested=tested,
    )
    write_json(path, {"kind": kind, "dataset": ds.name, **extra, **record})
    _print_accuracies(path, record["metrics"])


def evaluation_record(
    model: Any,
    ds: Any,
    split: Any,
    info: dict[str, Any],
    device: Any,
    batch_size: int,
    *,
    predictions: bool = False,
    logits: bool = False,
    tested: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test accuracies and cost of `model`, with the split, what made it (from its metadata `info`), timings
    and provenance: the record of `hetmerge evaluate` and of the train and merge jobs' result files."""
    from hetmerge.evaluation import accuracies, cost
    from hetmerge.provenance import provenance

    t0 = time.perf_counter()
    metrics = dict(
        tested
        or accuracies(model.to(device).eval(), ds, split, batch_size, device, predictions=predictions, logits=logits)
    )
    kept_predictions = metrics.pop("predictions", None)
    metrics.update(cost(model, ds.input_shape))
    keep = ("method", "params", "notes", "few_shot", "cut", "units", "seed", "task", "train")
    record = {
        "metrics": metrics,
        "split_seed": split.seed,
        "tasks": {t.name: list(t.classes) for t in split.tasks},
        "source": {k: info[k] for k in keep if k in info},
        "timings": {
            "eval_seconds": round(time.perf_counter() - t0, 3),
            **{k: info[k] for k in ("train_seconds", "merge_seconds") if k in info},
        },
        "provenance": provenance(device),
    }
    if kept_predictions is not None:
        record["predictions"] = kept_predictions
    return record


def _print_accuracies(path: str, metrics: dict[str, Any]) -> None:
    tasks = ", ".join(f"{t} {'--' if a is None else f'{100 * a:.1f}'}" for t, a in metrics["tasks"].items())
    print(f"{path}: joint {100 * metrics['joint']:.1f}; {tasks}")


def _merge_batches(ds: Any, split: Any, batch_size: int, device: Any) -> Any:
    from hetmerge.data import iterate_batches

    def passes() -> Any:
        for x, _ in iterate_batches(
            ds.train_images, ds.train_labels, split.merge_indices, batch_size, ds.mean, ds.std, device=device
        ):
            yield x

    return passes


def _labelled_batches(ds: Any, split: Any, batch_size: int, device: Any) -> Any:
    """Passes over the merge slice's (images, labels) where the split has one task, so that a label is a class
    index of the models' one head (same-task fusion); None for multi-task splits, where no head has every class."""
    from hetmerge.data import iterate_batches, make_label_map

    if len(split.tasks) != 1:
        return None
    label_map = make_label_map(split.tasks[0].label_map, ds.num_classes)

    def passes() -> Any:
        yield from iterate_batches(
            ds.train_images,
            ds.train_labels,
            split.merge_indices,
            batch_size,
            ds.mean,
            ds.std,
            device=device,
            label_map=label_map,
        )

    return passes


def _few_shot(ds: Any, split: Any, args: argparse.Namespace, device: Any) -> Any:
    """Each task's few-shot slice (`--few-shot` originals from the task's training images, `--aug-factor` augmented
    copies, `--val-per-task` held-out images), drawn with the merge's seed; None without `--few-shot`."""
    if args.few_shot is None:
        return None
    import torch

    from hetmerge.data import make_label_map, normalize
    from hetmerge.data.few_shot import assemble_few_shot, few_shot_indices

    generator = torch.Generator().manual_seed(args.seed)
    pools = {task.name: torch.tensor(split.train_indices[task.name]) for task in split.tasks}
    rows = few_shot_indices({t: len(p) for t, p in pools.items()}, args.few_shot, args.val_per_task, generator)
    maps = {task.name: make_label_map(task.label_map, ds.num_classes) for task in split.tasks}
    images, labels = [], []
    for which in (0, 1):
        chosen = {t: pools[t][torch.tensor(rows[t][which], dtype=torch.int64)] for t in pools}
        images.append({t: normalize(ds.train_images[i], ds.mean, ds.std) for t, i in chosen.items()})
        labels.append({t: maps[t][ds.train_labels[i]] for t, i in chosen.items()})
    few = assemble_few_shot(images[0], images[1], args.aug_factor, generator, ds.mean, ds.std, labels[0], labels[1])
    return few.to(device)


def _few_shot_record(few: Any, val_per_task: int) -> dict[str, Any]:
    """What a merge that learns saw: images per task, augmented copies, and the sizes of both slices."""
    return {
        "originals": few.originals,
        "aug_factor": few.aug_factor,
        "val_per_task": val_per_task,
        "train_images": len(few.train.images),
        "val_images": len(few.val.images),
        "tasks": list(few.train.names),
    }


def _class_shares(split: Any, metas: Sequence[dict[str, Any]], device: Any) -> Any:
    """(models, classes) data shares of the models' partitions of a same-task split, in the order the models are
    given; None for models trained on tasks rather than partitions."""
    import torch

    partitions = [meta["info"].get("partition") for meta in metas]
    if None in partitions:
        return None
    return torch.tensor([split.shares[name] for name in partitions], device=device)


def cmd_statistics(args: argparse.Namespace) -> None:
    from hetmerge.checkpoint import load_base_model
    from hetmerge.compatibility import check_models, source_records
    from hetmerge.data import load_prepared, load_split
    from hetmerge.statistics import collect_statistics, save_statistics

    device = _setup(args.threads, args.device)
    ds, split = load_prepared(args.data), load_split(args.split)
    models, metas = zip(*(load_base_model(path) for path in args.models), strict=True)
    check_models(args.models, models, metas, args.split, split, args.data, ds)
    t0 = time.perf_counter()
    stats = collect_statistics([m.to(device) for m in models], _merge_batches(ds, split, args.batch_size, device)())
    save_statistics(stats, args.out, source_records(args.models, metas))
    seconds = time.perf_counter() - t0
    print(f"statistics of {len(stats)} spaces over {len(split.merge_indices)} images in {seconds:.2f}s")


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge, and where the method chooses a parameter on the merge slice, merge at every value of its grid and
    of `--curve-values`, score each on the merge slice and the test set (the row's curve), and keep the choice."""
    from hetmerge.checkpoint import save_model
    from hetmerge.compatibility import merged_origin
    from hetmerge.evaluation import accuracies
    from hetmerge.methods import MergeContext, build_method
    from hetmerge.params import as_dict
    from hetmerge.progress import track
    from hetmerge.provenance import provenance

    method = build_method(args.method, args.params)
    device, ds, split, models, stats, batches, sources, shares = _merge_setup(args)
    few_shot = _few_shot(ds, split, args, device)
    state_dir = Path(f"{args.out}.state")  # the fit state of a merge that learns, so that it resumes
    precomputed = {}
    for entry in args.precomputed:
        name, _, path = entry.partition("=")
        with open(path) as handle:
            precomputed[name] = json.load(handle)

    def score(model: Any, part: str = "merge") -> Any:
        size = args.batch_size if part == "merge" else args.eval_batch_size
        return accuracies(model, ds, split, size, device, part=part)

    def merge(merger: Any) -> tuple[Any, Any]:
        ctx = MergeContext(
            device=device,
            batches=batches,
            labelled=_labelled_batches(ds, split, args.batch_size, device),
            class_shares=shares,
            seed=args.seed,
            stats=stats,
            score=lambda m: score(m)["joint"],
            precomputed=precomputed,
            few_shot=few_shot,
            state_dir=state_dir,
        )
        return merger(models, ctx), ctx

    t0 = time.perf_counter()
    choice = method.choice()
    curve = tested = None
    if choice is None:
        merged, ctx = merge(method)
    else:
        values = list(dict.fromkeys([*choice.grid, *sorted(set(args.curve_values) - set(choice.grid))]))
        points, kept = [], {}
        for value in track(values, desc=f"{args.method} {choice.param} curve", unit="value"):
            try:
                candidate, ctx = merge(build_method(args.method, {**args.params, choice.param: value}))
            except ValueError as err:
                if value in choice.grid:
                    raise
                # a figure's value the method cannot merge at (e.g. MuDSC's weight-only λ = 0 across widths)
                points.append({choice.param: value, "selectable": False, "error": str(err)})
                print(f"{choice.param} {value}: no merge ({err})")
                continue
            scores = {part: score(candidate, part) for part in ("merge", "test")}
            keys = ("joint", "task_avg", "tasks")
            points.append(
                {choice.param: value, "selectable": value in choice.grid}
                | {part: {k: s[k] for k in keys} for part, s in scores.items()}
            )
            if value in choice.grid:
                kept[value] = (candidate, ctx, scores)
            print(
                f"{choice.param} {value}: joint {100 * scores['merge']['joint']:.1f} on the merge slice, "
                f"{100 * scores['test']['joint']:.1f} on the test set"
            )
        chosen = choice.choose({v: scores["merge"]["joint"] for v, (_, _, scores) in kept.items()})
        merged, ctx, scores = kept[chosen]
        tested = scores["test"]  # the kept merge's test accuracies: its result reuses them
        ctx.notes[choice.param] = chosen
        curve = {"param": choice.param, "chosen": chosen, "points": sorted(points, key=lambda p: p[choice.param])}
    info = {
        "method": args.method,
        "params": as_dict(method.params),
        "notes": ctx.notes,
        "seed": args.seed,
        "cut": merged.cut if len(merged.branches) else None,
        "units": len(models[0].body),
        "sources": [str(p) for p in args.models],
        "source_models": sources,
        **merged_origin(split, merged.tasks),
        "few_shot": None if few_shot is None else _few_shot_record(few_shot, args.val_per_task),
        "merge_seconds": round(time.perf_counter() - t0, 3),
        "provenance": provenance(device),
    }
    save_model(merged, args.out, info)
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"{args.method}: merged {len(models)} models in {info['merge_seconds']:.2f}s")
    if args.result:
        write_result(
            args.result, "merge", merged, ds, split, info, device, args.eval_batch_size, tested=tested, curve=curve
        )


def _merge_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, list, Any, Any, list[dict[str, Any]], Any]:
    """What merging needs: device, dataset, split, base models, statistics, merge-slice batches, the models'
    fingerprints and their class shares (same-task partitions), after checking that models, split, dataset and
    statistics belong together."""
    from hetmerge.checkpoint import load_base_model
    from hetmerge.compatibility import check_models, check_sources, source_records
    from hetmerge.data import load_prepared, load_split
    from hetmerge.statistics import load_statistics

    device = _setup(args.threads, args.device)
    ds, split = load_prepared(args.data), load_split(args.split)
    models, metas = zip(*(load_base_model(path) for path in args.models), strict=True)
    check_models(args.models, models, metas, args.split, split, args.data, ds)
    sources = source_records(args.models, metas)
    stats = None
    if getattr(args, "stats", None):
        stats, recorded = load_statistics(args.stats)
        check_sources(f"--stats {args.stats}", recorded, sources)
    batches = _merge_batches(ds, split, args.batch_size, device)
    return device, ds, split, list(models), stats, batches, sources, _class_shares(split, metas, device)


def cmd_precompute(args: argparse.Namespace) -> None:
    """An input some methods read, computed once per model list and seed (e.g. hetero's depth alignment)."""
    from hetmerge.methods import PRECOMPUTE, MergeContext
    from hetmerge.provenance import provenance

    if args.name not in PRECOMPUTE:
        raise ValueError(f"nothing precomputes {args.name!r}; known: {sorted(PRECOMPUTE)}")
    device, ds, split, models, _, batches, _, shares = _merge_setup(args)
    labelled = _labelled_batches(ds, split, args.batch_size, device)
    ctx = MergeContext(device=device, batches=batches, labelled=labelled, class_shares=shares)
    t0 = time.perf_counter()
    record = PRECOMPUTE[args.name]([m.to(device).eval() for m in models], ctx)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["provenance"] = provenance(device)
    write_json(args.out, record)
    print(f"{args.name} of {len(models)} models in {record['seconds']:.2f}s")


def cmd_landscape(args: argparse.Namespace) -> None:
    """Each task's loss on the plane through model A, model B and one merge, with all merges placed on it."""
    import torch

    from hetmerge import landscape as ls
    from hetmerge.checkpoint import load_model
    from hetmerge.compatibility import check_model, check_sources
    from hetmerge.data import iterate_batches
    from hetmerge.methods import build_method
    from hetmerge.provenance import provenance

    device, ds, split, (a, b), _, batches, sources, _ = _merge_setup(args)
    merges = {}
    for key, path in zip(args.keys, args.merges, strict=True):
        merged, meta = load_model(path)
        check_model(path, merged, meta, args.split, split, args.data, ds)
        check_sources(f"merge {path}", meta["info"].get("source_models"), sources)
        if getattr(merged, "branches", None) or getattr(merged, "trunk", None) is None:
            raise ValueError(f"{path}: only fully merged models lie in a weight space (not ensembles or partial zips)")
        trunk = merged.trunk.cpu()
        info = meta["info"]
        if not build_method(info["method"], info["params"]).keeps_first_basis():
            trunk = ls.onto_first_basis(trunk, a)
        merges[key] = (trunk, merged)
    if args.plane not in merges:
        raise ValueError(f"plane merge {args.plane!r} is not among the merges {list(merges)}")
    target = copy.deepcopy(merges[args.plane][0])
    vectors = {"model_a": ls.parameter_vector(a, target), "model_b": ls.parameter_vector(b, target)}
    vectors.update({k: ls.parameter_vector(t, target) for k, (t, _) in merges.items()})
    plane = ls.Plane.through(vectors["model_a"], vectors["model_b"], vectors[args.plane])
    coords = {k: plane.coordinates(v) for k, v in vectors.items()}

    task_batches = {}
    for task in split.tasks:
        idx = torch.as_tensor(split.test_indices[task.name][: args.per_task], dtype=torch.long)
        local = {c: i for i, c in enumerate(task.classes)}
        task_batches[task.name] = [
            (x, torch.as_tensor([local[int(c)] for c in y.tolist()], device=device))
            for x, y in iterate_batches(
                ds.test_images, ds.test_labels, idx, args.batch_size, ds.mean, ds.std, device=device
            )
        ]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in target.modules())
    bn = batches if has_bn else None
    target = target.to(device)

    def losses(model: Any) -> dict[str, float]:
        return ls.task_losses(model, task_batches)

    points = []
    for key, (x, y, off) in coords.items():
        if key in merges:
            own = losses(merges[key][1].to(device).eval())
        else:
            own = ls.loss_grid(plane, target, [x], [y], losses, bn)
            own = {t: v[0][0] for t, v in own.items()}
        points.append({"method": key, "x": x, "y": y, "off_plane": off, "loss": own})
    xs = ls.grid_axis([c[0] for c in coords.values()], args.steps)
    ys = ls.grid_axis([c[1] for c in coords.values()], args.steps)
    t0 = time.perf_counter()
    grid = ls.loss_grid(plane, target, xs, ys, losses, bn)
    record = {
        "kind": "landscape",
        "plane": {"origin": "model_a", "u": "model_b", "v": args.plane},
        "images": f"test ({args.per_task} per task)",
        "bn_reset": has_bn,
        "x": xs,
        "y": ys,
        "loss": grid,
        "points": points,
        "seconds": round(time.perf_counter() - t0, 3),
        "provenance": provenance(device),
    }
    write_json(args.out, record)
    print(f"landscape of {len(xs)}x{len(ys)} points in {record['seconds']:.1f}s")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate one or more models on one split; writes a JSON list with one record per model."""
    from hetmerge.checkpoint import load_model
    from hetmerge.compatibility import check_model, check_split_data
    from hetmerge.data import load_prepared, load_split

    records = args.records if args.records is not None else [{}] * len(args.models)
    if not isinstance(records, list) or len(records) != len(args.models):
        raise ValueError(f"--records must be a JSON list with one object per model ({len(args.models)})")
    device = _setup(args.threads, args.device)
    ds, split = load_prepared(args.data), load_split(args.split)
    check_split_data(args.split, split, args.data, ds)
    results = []
    for path, fields in zip(args.models, records, strict=True):
        model, meta = load_model(path)
        check_model(path, model, meta, args.split, split, args.data, ds)
        record = evaluation_record(model, ds, split, meta["info"], device, args.batch_size)
        results.append({**fields, **record})
        _print_accuracies(path, record["metrics"])
    write_json(args.out, results)


def cmd_report(args: argparse.Namespace) -> None:
    """Tables, figures, CSVs and main.tex from the report spec (the `report` entry of a plan)."""
    from hetmerge.report import build_report

    try:
        with open(args.plan) as handle:
            spec = json.load(handle)["report"]["spec"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{args.plan} is not a plan with a report spec ({err}); run `hetmerge plan` again") from err
    written = build_report(spec, Path(args.out_dir))
    print(f"wrote {len(written)} files under {args.out_dir}")


def cmd_readme_table(args: argparse.Namespace) -> None:
    """README's short results table from a run's results.csv: printed, or written into README's marked block."""
    import pandas as pd

    from hetmerge.report.readme_table import readme_table, update_readme

    experiments = args.experiments or None
    if args.readme:
        update_readme(Path(args.readme), Path(args.results), experiments)
        print(f"wrote the results table of {args.results} into {args.readme}")
    else:
        print(readme_table(pd.read_csv(args.results), experiments), end="")


def cmd_plan(args: argparse.Namespace) -> None:
    """Resolve a validated config into the pipeline's plan (jobs, report spec, outputs); see hetmerge.plan."""
    from hetmerge.plan import plan

    with open(args.config) as handle:
        config = json.load(handle)
    result = plan(config, args.name, args.results)
    write_json(args.out, result)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_methods(args: argparse.Namespace) -> None:
    """One line per registered method: name, the first line of its docstring, and the paper it reproduces; with
    -v, or for the methods named, each parameter with its default too."""
    import dataclasses

    from hetmerge.methods import REGISTRY

    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(REGISTRY))}")
    width = max(map(len, REGISTRY))
    for name in args.names or sorted(REGISTRY):
        cls = REGISTRY[name]
        print(f"{name:<{width}}  {method_summary(cls)} — {_citation(cls)}")
        if args.verbose or args.names:
            fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
            print(f"{'':<{width}}  parameters: {fields}")


def method_summary(cls: type[MergeMethod]) -> str:
    """The first line of a method class's docstring: its one-line description in `hetmerge methods`."""
    return cls.__doc__.strip().splitlines()[0] if cls.__doc__ else "(no description: the class has no docstring)"


def _citation(cls: type[MergeMethod]) -> str:
    """How `hetmerge methods` cites the paper a method reproduces, checked against hetmerge.papers."""
    from hetmerge.papers import PAPERS

    if cls.paper is None:
        return "baseline"
    if cls.paper not in PAPERS:
        raise ValueError(f"method {cls.name!r} cites paper {cls.paper!r}, which hetmerge.papers.PAPERS lacks")
    return PAPERS[cls.paper].cite()


def cmd_inspect(args: argparse.Namespace) -> None:
    """What a checkpoint holds and what produced it, at a glance; with --json, its full metadata and tensor shapes."""
    from hetmerge.checkpoint import load_tensors, model_from_tensors

    tensors, meta = load_tensors(args.file)
    if args.json:
        meta["tensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
        json.dump(meta, sys.stdout, indent=2, sort_keys=True)
        print()
        return
    size = _file_size(os.path.getsize(args.file))
    if meta.get("kind") not in ("model", "merged"):
        what = meta.get("kind") or "hetmerge file"
        print(f"{args.file}: {what} (no model), {len(tensors)} tensors, {size}; --json prints its metadata")
        return
    model = model_from_tensors(tensors, meta, args.file)  # the module its metadata describes, to count parameters
    info, desc = meta["info"], meta["model"]
    merged = meta["kind"] == "merged"
    networks = ([desc["trunk"]] if desc["trunk"] else []) + desc["branches"] if merged else [desc]
    rows = [
        ("architecture", [_merged_architecture(desc) if merged else _architecture(desc)]),
        ("input", [" or ".join(dict.fromkeys("x".join(map(str, n["input_shape"])) for n in networks))]),
        ("heads", [", ".join(f"{t}: {n} classes" for t, n in _heads(desc, merged).items())]),
        ("parameters", [f"{sum(p.numel() for p in model.parameters()):,}"]),
        *(_merge_rows(info) if merged else _training_rows(info)),
        ("made with", [_made_with(info.get("provenance", {}))]),
    ]
    title = f"merge by {info.get('method', 'an unrecorded method')}" if merged else "trained model"
    print(f"{args.file}: {title}, {size}")
    width = max(len(label) for label, _ in rows)
    for label, lines in rows:
        for i, line in enumerate(line for line in lines if line):
            print(f"  {label if i == 0 else '':<{width}}  {line}")


def _file_size(size: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(max(size.bit_length() - 1, 0) // 10, len(units) - 1)
    return f"{size} B" if power == 0 else f"{size / 1024**power:.1f} {units[power]}"


def _value(value: Any) -> str:
    """A metadata value as a config writes it: strings bare, everything else as JSON (true, null, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value)


def _assignments(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in mapping.items())


def _present(record: dict[str, Any], formats: dict[str, str]) -> str:
    """The keys of `formats` that `record` has, each value put into its format, joined by commas: a checkpoint
    saved by library code carries whatever info its caller gave, so any key may be absent."""
    return ", ".join(form.format(_value(record[key])) for key, form in formats.items() if key in record)


def _architecture(desc: dict[str, Any]) -> str:
    """'vgg (batch_norm=true, depth=11, width=0.125)' from a network's description."""
    spec = _assignments(desc["spec"])
    return f"{desc['family']} ({spec})" if spec else desc["family"]


def _merged_architecture(desc: dict[str, Any]) -> str:
    """A merge's layout (see MergedModel): one network, an ensemble, or a partial zip's trunk and branches."""
    branches = desc["branches"]
    if not branches:
        return f"one network: {_architecture(desc['trunk'])}"
    counts = Counter(map(_architecture, branches))
    listed = "; ".join(arch if n == 1 else f"{n} x {arch}" for arch, n in counts.items())
    if desc["trunk"] is None:
        return f"ensemble of {len(branches)} networks: {listed}"
    return f"partial zip: the first {desc['cut']} units merged, then each network's own ({len(branches)}): {listed}"


def _heads(desc: dict[str, Any], merged: bool) -> dict[str, int]:
    """Classes of every task head the model answers with (a merge: its trunk's, or its branches' together)."""
    networks = [desc] if not merged else desc["branches"] or [desc["trunk"]]
    return {task: n for network in networks for task, n in network["heads"].items()}


def _training_rows(info: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """What `cmd_train` records: the data, the seed and settings, the last epoch."""
    trained_on = {"dataset": "{}", "task": "task {}", "classes": "classes {}", "partition": "partition {}"}
    last = info["history"][-1] if info.get("history") else None
    return [
        ("trained on", [_present(info, {**trained_on, "split_seed": "split seed {}"})]),
        ("training", [_present(info, {"seed": "seed {}", "precision": "{}", "train_seconds": "{} s"})]),
        ("settings", [_assignments(info.get("train", {}))]),
        (
            "last epoch",
            [
                f"{last['epoch']}: loss {last['loss']:.4f}, training accuracy {100 * last['train_acc']:.1f}%"
                if last
                else ""
            ],
        ),
    ]


def _merge_rows(info: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """What `cmd_merge` records: the method, its parameters and choices, the models merged, the data it saw."""
    notes = info.get("notes") or {}
    few = info.get("few_shot")
    sources = [
        f"{s['path']} ({_present(s, {'task': 'task {}', 'partition': 'partition {}', 'seed': 'seed {}'})})"
        for s in info.get("source_models", [])
    ]
    tasks = ", ".join(f"{t} {classes}" for t, classes in info.get("tasks", {}).items())
    return [
        ("method", [_present(info, {"method": "{}", "seed": "seed {}", "merge_seconds": "{} s"})]),
        ("params", [_assignments(info.get("params", {}))]),
        ("notes", [", ".join(f"{k}={_value(v)}" if _is_scalar(v) else f"{k} (see --json)" for k, v in notes.items())]),
        ("merged from", sources),
        (
            "data",
            [_present(info, {"dataset": "{}", "split_seed": "split seed {}"}) + (f", tasks {tasks}" if tasks else "")],
        ),
        (
            "few-shot",
            [
                f"{few['originals']} images per task, {few['aug_factor']} augmented copies of each, "
                f"{few['val_per_task']} held out per task"
                if few
                else ""
            ],
        ),
    ]


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _made_with(provenance: dict[str, Any]) -> str:
    """Package versions, commit and device from a checkpoint's provenance record."""
    packages = provenance.get("packages", {})
    git = provenance.get("git") or {}
    commit = (
        f"git {git['commit'][:7]}{' with uncommitted changes' if git['dirty'] else ''}" if git.get("commit") else ""
    )
    device = f"on {provenance['device']}" if "device" in provenance else ""
    versions = [f"{p} {packages[p]}" for p in ("hetmerge", "torch") if p in packages]
    return ", ".join(part for part in (*versions, commit, device) if part)


KNOWN_DATASETS = ("cifar10", "cifar100", "digits", "fashion_mnist", "mnist")
"""hetmerge.data.DATASETS's names, for the help (importing it would import torch); a test keeps them in step."""
KNOWN_FAMILIES = ("mlp", "resnet", "vgg", "vit")
"""hetmerge.models.FAMILIES's names, likewise."""

MERGE_EPILOG = """\
example: ZipIt! of two models from `hetmerge train`, saved and evaluated on the test set:
  hetmerge merge --data digits.safetensors --split split.json \\
    --models a.safetensors b.safetensors --method zipit \\
    --params '{"alpha": 0.3, "beta": 0.125}' --out zipit.safetensors --result zipit.json

`hetmerge methods` lists the methods, `hetmerge methods NAME` a method's parameters and their defaults."""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hetmerge",
        description=__doc__,
        epilog="`hetmerge COMMAND --help` explains a command's options. `python -m hetmerge COMMAND ...` runs the\n"
        "same commands, through a warm worker that has imported torch already (see hetmerge.worker).",
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"hetmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, help="the pipeline stage or tool to run")

    def command(name: str, summary: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, **kwargs)

    def inputs(p: argparse.ArgumentParser, models: str | None = None) -> None:
        """The prepared dataset and task split every model-level stage reads (plus the model files)."""
        p.add_argument("--data", required=True, help="prepared dataset from `hetmerge data`")
        p.add_argument("--split", required=True, help="task split from `hetmerge split`")
        if models == "many":
            p.add_argument("--models", nargs="+", required=True, help="checkpoints, in task order")
        elif models == "one":
            p.add_argument("--model", required=True, help="checkpoint of a model or merge")

    def result_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--result", default=None, help="also evaluate the model on the test set: result JSON")
        p.add_argument(
            "--eval-batch-size",
            type=int,
            default=512,
            help="batch size of that test-set evaluation (default: %(default)s)",
        )

    def device_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto (a free GPU if any, else CPU), cpu, or cuda:N")
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: %(default)s)")

    p = command("data", "find or download a dataset and store it prepared")
    p.add_argument("--dataset", required=True, help=f"dataset name, one of {', '.join(KNOWN_DATASETS)}")
    p.add_argument("--roots", nargs="*", default=[], help="local directories searched before downloading")
    p.add_argument(
        "--download-root", default="data", help="directory that downloads go to, searched last (default: %(default)s)"
    )
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download the dataset where no local copy is found (default: download)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip MD5 checks of the IDX files (MNIST, Fashion-MNIST); refused for CIFAR (torchvision always checks)",
    )
    p.add_argument("--out", required=True, help="prepared dataset to write (safetensors)")
    p.set_defaults(func=cmd_data)

    p = command("split", "draw class-disjoint tasks and a held-out merge slice, or N models' partitions of one task")
    p.add_argument("--data", required=True, help="prepared dataset from `hetmerge data`")
    p.add_argument("--seed", type=int, required=True, help="seed of the draw (classes, images, partitions)")
    p.add_argument(
        "--kind",
        default="class_disjoint",
        choices=["class_disjoint", "full", "iid", "non_iid", "sharded"],
        help="class_disjoint (default): one task per model; the others: N models of one task, each on its partition",
    )
    p.add_argument(
        "--num-tasks",
        type=int,
        default=2,
        help="tasks (class_disjoint) or models (same-task kinds); default: %(default)s",
    )
    p.add_argument("--merge-per-class", type=int, default=None, help="held-out merge images per class")
    p.add_argument("--fusion-size", type=int, default=None, help="same-task: fusion images, from model A's data")
    p.add_argument(
        "--concentration",
        type=float,
        nargs=2,
        default=[1.0, 5.0],
        help="non_iid: Dirichlet alpha from LO to HI (default: 1 5)",
    )
    p.add_argument("--train-per-task", type=_json, default=None, help="integer or null (all) training images per task")
    p.add_argument("--test-per-task", type=_json, default=None, help="integer or null (all) test images per task")
    p.add_argument("--out", required=True, help="task split to write (JSON)")
    p.set_defaults(func=cmd_split)

    p = command("train", "train one model on one task (and evaluate it)")
    inputs(p)
    p.add_argument("--task", required=True, help="the split's task to train on (A, B, ...)")
    p.add_argument("--partition", default=None, help="same-task split: train on this model's partition (A, B, ...)")
    p.add_argument(
        "--model",
        type=_json,
        required=True,
        help=f'JSON object {{"family": F, "spec": {{...}}}}, F one of {", ".join(KNOWN_FAMILIES)}, spec the '
        'family\'s options (hetmerge.models), e.g. \'{"family": "vgg", "spec": {"depth": 11, "width": 0.25}}\'',
    )
    p.add_argument(
        "--train",
        type=_json,
        default={},
        help='JSON object of training settings (hetmerge.training.TrainSettings), e.g. \'{"epochs": 20, '
        '"lr": 0.05}\'; unknown keys refused, defaults filled in',
    )
    p.add_argument("--seed", type=int, required=True, help="seed of the initialisation and the data order")
    p.add_argument("--out", required=True, help="the model; training state is kept in OUT.resume until it is saved")
    result_args(p)
    device_args(p)
    p.set_defaults(func=cmd_train)

    p = command("statistics", "activation mean/covariance of every feature space on the merge slice")
    inputs(p, "many")
    p.add_argument("--batch-size", type=int, default=256, help="merge-slice images per batch (default: %(default)s)")
    p.add_argument("--out", required=True, help="statistics to write (safetensors), for `merge --stats`")
    device_args(p)
    p.set_defaults(func=cmd_statistics)

    p = command("precompute", "an input methods read, once per model list (e.g. depth alignment)")
    inputs(p, "many")
    p.add_argument("--name", required=True, help="what to compute (registered in hetmerge.methods.PRECOMPUTE)")
    p.add_argument("--batch-size", type=int, default=256, help="merge-slice images per batch (default: %(default)s)")
    p.add_argument("--out", required=True, help="the input to write (JSON), for `merge --precomputed NAME=OUT`")
    device_args(p)
    p.set_defaults(func=cmd_precompute)

    p = command(
        "merge",
        "merge trained models with a registered method (and evaluate the merge)",
        epilog=MERGE_EPILOG,
        formatter_class=raw,
    )
    inputs(p, "many")
    p.add_argument("--method", required=True, help="a registered method name, see `hetmerge methods`")
    p.add_argument(
        "--params",
        type=_json,
        default={},
        help='JSON object of the method\'s parameters, e.g. \'{"alpha": 0.3, "beta": 0.125}\'; unknown keys '
        "refused, defaults filled in (default: {}, every parameter at its default)",
    )
    p.add_argument("--stats", default=None, help="statistics file from `hetmerge statistics` (else computed)")
    p.add_argument(
        "--precomputed",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="inputs from `hetmerge precompute` that the method reads (else it computes them)",
    )
    p.add_argument(
        "--curve-values",
        type=float,
        nargs="*",
        default=[],
        help="for a method that chooses a parameter: values scored besides its grid (the figure's)",
    )
    p.add_argument(
        "--few-shot",
        type=int,
        default=None,
        metavar="N",
        help="for the merges that learn (FS-Merge, distill, RegMean): N original training images per task",
    )
    p.add_argument(
        "--aug-factor", type=int, default=8, help="augmented copies of each few-shot image (default: %(default)s)"
    )
    p.add_argument(
        "--val-per-task",
        type=int,
        default=300,
        help="held-out training images per task (validation loss; default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="merge-slice images per batch (statistics, scores; default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the method's random draws and the few-shot slice")
    p.add_argument(
        "--out", required=True, help="the merge (safetensors); a merge that learns keeps its state in OUT.state"
    )
    result_args(p)
    device_args(p)
    p.set_defaults(func=cmd_merge)

    p = command("landscape", "task losses on the plane through model A, model B and a merge")
    inputs(p, "many")
    p.add_argument("--merges", nargs="+", required=True, help="merge checkpoints to place on the plane")
    p.add_argument("--keys", nargs="+", required=True, help="row key of each merge")
    p.add_argument("--plane", required=True, help="key of the merge that spans the plane with A and B")
    p.add_argument("--steps", type=int, default=11, help="grid points per axis (default: %(default)s)")
    p.add_argument("--per-task", type=int, default=500, help="test images per task (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="test images per batch (default: %(default)s)")
    p.add_argument("--out", required=True, help="the landscape to write (JSON)")
    device_args(p)
    p.set_defaults(func=cmd_landscape)

    p = command("evaluate", "joint and per-task accuracy, parameters and FLOPs of models or merges")
    inputs(p, "many")
    p.add_argument(
        "--records",
        type=_json,
        default=None,
        help='JSON list with one object per model, whose fields are copied into its record, e.g. \'[{"key": '
        '"zipit"}]\'',
    )
    p.add_argument("--batch-size", type=int, default=512, help="test images per batch (default: %(default)s)")
    p.add_argument("--out", required=True, help="the records to write (JSON list, one per model)")
    device_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("plan", "resolve a validated config into the pipeline's jobs and report (JSON)")
    p.add_argument("--config", required=True, help="the config as JSON, validated with its schema's defaults")
    p.add_argument("--name", required=True, help="the config's report folder name")
    p.add_argument("--results", default="results", help="folder the planned outputs go under (default: %(default)s)")
    p.add_argument("--out", required=True, help="the plan to write (JSON)")
    p.set_defaults(func=cmd_plan)

    p = command("report", "LaTeX tables, figures, CSVs and main.tex from a plan's report spec")
    p.add_argument("--plan", required=True, help="plan JSON from `hetmerge plan`")
    p.add_argument("--out-dir", required=True, help="folder to write the report's files into")
    p.set_defaults(func=cmd_report)

    p = command("readme-table", "README's short results table, generated from a run's results.csv")
    p.add_argument("results", help="results.csv of a report (e.g. results/paper/default/results.csv)")
    p.add_argument("--readme", default=None, help="write the table between README's results-table markers")
    p.add_argument(
        "--experiments", nargs="+", default=None, metavar="KEY", help="experiment keys (rows), in order (default: all)"
    )
    p.set_defaults(func=cmd_readme_table)

    p = command("methods", "list the registered merge methods: description and paper (and parameters)")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these methods, with their parameters")
    p.add_argument("-v", "--verbose", action="store_true", help="also each parameter with its default")
    p.set_defaults(func=cmd_methods)

    p = command("inspect", "what a checkpoint holds and what produced it")
    p.add_argument("file", help="a model or merge checkpoint (or another file hetmerge wrote as safetensors)")
    p.add_argument("--json", action="store_true", help="print the full metadata and every tensor's shape as JSON")
    p.set_defaults(func=cmd_inspect)
    return parser


def _message(err: Exception) -> str:
    """The error's message, plus what to do about an unusable checkpoint where the message does not say it
    (CheckpointError carries no path, so the advice refers to the file its message names)."""
    from hetmerge.checkpoint import CheckpointError

    message = str(err)
    if isinstance(err, CheckpointError) and "delete it" not in message and "does not exist" not in message:
        message += "; if snakemake made that file, delete it and rerun snakemake, which remakes it"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Bad input (files, arguments, data, diverging training) ends in one line on stderr,
    not a traceback; the project's errors derive from these types (ParameterError, MergeError, CheckpointError
    and DatasetCorruptError from ValueError, DatasetUnavailableError from RuntimeError). Set HETMERGE_DEBUG=1
    for the traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # `hetmerge methods | head`: the reader is gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except (ValueError, RuntimeError, OSError, TimeoutError, FloatingPointError) as err:
        if os.environ.get("HETMERGE_DEBUG"):
            raise
        print(f"hetmerge {args.command}: error: {_message(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
