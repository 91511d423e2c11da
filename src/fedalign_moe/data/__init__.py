"""Data: labelled text sources, global train/test splits and federated partitions."""

from fedalign_moe.data.partition import (
    label_counts,
    partition,
    plot_partition,
    skew_summary,
    split_client,
)
from fedalign_moe.data.sources import (
    LEXNAMES,
    MMLU_CATEGORIES,
    MMLU_CATEGORY_NAMES,
    DataError,
    LabeledText,
    domains,
    load_source,
    public_split,
    stratified_sample,
    train_test_split,
)

__all__ = [
    "LEXNAMES",
    "MMLU_CATEGORIES",
    "MMLU_CATEGORY_NAMES",
    "DataError",
    "LabeledText",
    "domains",
    "label_counts",
    "load_source",
    "partition",
    "plot_partition",
    "public_split",
    "skew_summary",
    "split_client",
    "stratified_sample",
    "train_test_split",
]
