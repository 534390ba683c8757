"""Datasets, task splits and batching: everything between the raw files and a model's input tensors."""

from hetmerge.data.batches import iterate_batches, make_label_map, normalize
from hetmerge.data.datasets import (
    DATASETS,
    DatasetCorruptError,
    DatasetInfo,
    DatasetUnavailableError,
    ImageDataset,
    dataset_info,
    load_dataset,
    load_prepared,
    save_prepared,
)
from hetmerge.data.few_shot import (
    FewShot,
    TaskImages,
    assemble_few_shot,
    augment_copies,
    draw_few_shot,
    few_shot_indices,
)
from hetmerge.data.splits import (
    SAME_TASK_KINDS,
    SAME_TASK_NAME,
    SPLIT_KINDS,
    Task,
    TaskSplit,
    load_split,
    make_class_disjoint_split,
    make_same_task_split,
    save_split,
)

__all__ = [
    "DATASETS",
    "SAME_TASK_KINDS",
    "SAME_TASK_NAME",
    "SPLIT_KINDS",
    "DatasetCorruptError",
    "DatasetInfo",
    "DatasetUnavailableError",
    "FewShot",
    "ImageDataset",
    "Task",
    "TaskImages",
    "TaskSplit",
    "assemble_few_shot",
    "augment_copies",
    "dataset_info",
    "draw_few_shot",
    "few_shot_indices",
    "iterate_batches",
    "load_dataset",
    "load_prepared",
    "load_split",
    "make_class_disjoint_split",
    "make_label_map",
    "make_same_task_split",
    "normalize",
    "save_prepared",
    "save_split",
]
