"""Federated partitions of a training pool, through flwr-datasets, and their skew statistics.

Schemes:

- ``dirichlet``: ``DirichletPartitioner`` over the source's partition key (label or MMLU
  subject); smaller ``alpha`` gives more skew. Resampled (at most 10 times, by flwr-datasets)
  until every client holds ``min_partition_size`` examples.
- ``iid``: a seeded shuffle, then ``IidPartitioner`` (equal contiguous shards; flwr-datasets'
  IID partitioner itself neither shuffles nor takes a seed).
- ``pathological``: ``PathologicalPartitioner`` with ``classes_per_client`` classes per client,
  ``class_assignment_mode="first-deterministic"`` (as in McMahan et al.: client ``i`` gets class
  ``i mod C`` first, the others at random from ``seed``). Classes no client draws are dropped,
  so with fewer clients than classes the partition sizes can sum to less than the pool.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner

from fedalign_moe.data.sources import DataError, LabeledText, column_values, take

SCHEMES = ("dirichlet", "iid", "pathological")

_log = logging.getLogger(__name__)


def _make_partitioner(
    train: LabeledText, scheme: str, num_clients: int, alpha: float, classes_per_client: int,
    seed: int, min_partition_size: int,
) -> tuple[Partitioner, datasets.Dataset]:
    """Build the flwr-datasets partitioner of a scheme and the dataset it should see."""
    ds, key = train.dataset, train.partition_key
    if scheme == "iid":
        shuffled = take(ds, np.random.default_rng(seed).permutation(len(ds)))  # IidPartitioner never shuffles
        return IidPartitioner(num_partitions=num_clients), shuffled
    if scheme == "dirichlet":
        if alpha <= 0:
            raise DataError(f"Dirichlet alpha must be positive, got {alpha}")
        if min_partition_size * num_clients > len(ds):
            raise DataError(f"{num_clients} clients x min_partition_size {min_partition_size} exceeds "
                            f"the {len(ds)} training examples")
        return DirichletPartitioner(
            num_partitions=num_clients, partition_by=key, alpha=float(alpha),
            min_partition_size=min_partition_size, self_balancing=False, shuffle=True, seed=seed,
        ), ds
    num_classes = len(ds.unique(key))
    if not 1 <= classes_per_client <= num_classes:
        raise DataError(f"classes_per_client must be in 1..{num_classes} (distinct {key} values), "
                        f"got {classes_per_client}")
    return PathologicalPartitioner(
        num_partitions=num_clients, partition_by=key, num_classes_per_partition=classes_per_client,
        class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
    ), ds


def partition(
    train: LabeledText,
    scheme: str,
    num_clients: int,
    *,
    alpha: float = 1.0,
    classes_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[datasets.Dataset]:
    """Split a training pool over ``num_clients`` clients.

    Parameters
    ----------
    train : LabeledText
        The pool; it is partitioned over its ``partition_key`` column.
    scheme : str
        ``"dirichlet"``, ``"iid"`` or ``"pathological"``.
    num_clients : int
        Number of clients (partitions).
    alpha : float
        Dirichlet concentration (``dirichlet`` only); smaller is more skewed.
    classes_per_client : int
        Distinct partition-key values per client (``pathological`` only).
    seed : int
        Seed of the partition: same seed, same partition.
    min_partition_size : int
        Fewest examples a client may get (``dirichlet`` only; kept small, since flwr-datasets
        resamples the whole partition when any client falls below it).

    Returns
    -------
    list[datasets.Dataset]
        One dataset per client, with the pool's columns.

    Raises
    ------
    DataError
        Unknown scheme, more clients than examples, or an unsatisfiable constraint.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > len(train.dataset):
        raise DataError(f"{num_clients} clients exceed the {len(train.dataset)} training examples")
    partitioner, ds = _make_partitioner(train, scheme, num_clients, alpha, classes_per_client,
                                        seed, min_partition_size)
    partitioner.dataset = ds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # local to this block: collect flwr-datasets' notices
        try:
            parts = [partitioner.load_partition(i) for i in range(num_clients)]
        except ValueError as exc:
            hint = " (raise alpha or lower min_partition_size)" if scheme == "dirichlet" else ""
            raise DataError(f"{scheme} partition of {len(ds)} examples over {num_clients} clients failed: "
                            f"{str(exc).splitlines()[0]}{hint}") from exc
    if caught:
        _log.warning("%s partition: %d notice(s) from flwr-datasets, last: %s",
                     scheme, len(caught), caught[-1].message)
    return parts


def split_client(
    ds: datasets.Dataset, test_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split one client's partition into a local train set and a local test set.

    Parameters
    ----------
    ds : datasets.Dataset
        The client's partition (at least one example).
    test_fraction : float
        Share for the local test set, in [0, 1). With 2+ examples and a positive fraction the
        test set gets at least one example; the train set always keeps at least one.
    seed : int
        Seed of the split.

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        ``(local_train, local_test)``.
    """
    if not 0 <= test_fraction < 1:
        raise DataError(f"local test_fraction must be in [0, 1), got {test_fraction}")
    n = len(ds)
    if n == 0:
        raise DataError("cannot split an empty client partition")
    n_test = 0 if test_fraction == 0 or n < 2 else int(np.clip(round(n * test_fraction), 1, n - 1))
    order = np.random.default_rng(seed).permutation(n)
    return ds.select(np.sort(order[n_test:])), ds.select(np.sort(order[:n_test]))


def label_counts(parts: list[datasets.Dataset], column: str, names: list[str]) -> np.ndarray:
    """Count each client's examples per class.

    Parameters
    ----------
    parts : list[datasets.Dataset]
        The client partitions.
    column : str
        ``"label"`` (integer indices into ``names``) or ``"group"`` (strings among ``names``).
    names : list[str]
        The class names: ``label_names`` for ``"label"``, the sorted unique groups for ``"group"``.

    Returns
    -------
    numpy.ndarray
        Integer counts of shape ``[len(parts), len(names)]``.
    """
    index = {name: j for j, name in enumerate(names)}
    counts = np.zeros((len(parts), len(names)), dtype=np.int64)
    for i, part in enumerate(parts):
        values = column_values(part, column)
        if values and isinstance(values[0], str):
            unknown = set(values) - index.keys()
            if unknown:
                raise DataError(f"values {sorted(unknown)[:5]} of column {column!r} are not in names")
            values = [index[v] for v in values]
        values = np.asarray(values, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() >= len(names)):
            raise DataError(f"column {column!r} holds indices outside 0..{len(names) - 1}")
        counts[i] = np.bincount(values, minlength=len(names))
    return counts


def skew_summary(counts: np.ndarray) -> dict[str, float]:
    """Summarise how non-IID a partition is.

    Parameters
    ----------
    counts : numpy.ndarray
        ``[num_clients, num_classes]`` counts from :func:`label_counts`.

    Returns
    -------
    dict[str, float]
        ``classes_min/mean/max`` (classes present per client), ``size_min/mean/max`` (examples
        per client) and ``mean_tv`` (mean over non-empty clients of the total-variation distance
        between the client's class distribution and the global one: 0 for IID, near 1 when each
        client holds a class few others hold).
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.sum() <= 0:
        raise DataError("skew_summary needs a non-empty [clients, classes] count matrix")
    present = (counts > 0).sum(axis=1)
    sizes = counts.sum(axis=1)
    glob = counts.sum(axis=0) / counts.sum()
    nonempty = sizes > 0
    local = counts[nonempty] / sizes[nonempty, None]
    tv = 0.5 * np.abs(local - glob).sum(axis=1)
    return {
        "num_clients": float(counts.shape[0]),
        "classes_min": float(present.min()), "classes_mean": float(present.mean()),
        "classes_max": float(present.max()),
        "size_min": float(sizes.min()), "size_mean": float(sizes.mean()), "size_max": float(sizes.max()),
        "mean_tv": float(tv.mean()),
    }


def _class_colours(num_classes: int) -> list[tuple[float, float, float, float]]:
    """Return distinct colours: tab10/tab20 up to 20 classes, a sampled turbo map beyond."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](i) for i in range(num_classes)]
    return [colormaps["turbo"](x) for x in np.linspace(0.02, 0.98, num_classes)]


def plot_partition(counts: np.ndarray, names: list[str], path: str | Path, title: str) -> Path:
    """Draw the partition as a stacked horizontal bar chart (one bar per client).

    Parameters
    ----------
    counts : numpy.ndarray
        ``[num_clients, num_classes]`` counts.
    names : list[str]
        Class names (legend; omitted beyond 20 classes).
    path : str or pathlib.Path
        Output image file (its parent folders are created).
    title : str
        Chart title.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from matplotlib.figure import Figure

    counts = np.asarray(counts, dtype=float)
    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(9.0 if num_classes <= 20 else 7.5, max(2.5, 0.35 * num_clients + 1.2)))
    ax = fig.add_subplot()
    left = np.zeros(num_clients)
    for j, colour in enumerate(_class_colours(num_classes)):
        ax.barh(np.arange(num_clients), counts[:, j], left=left, color=colour, label=str(names[j]),
                height=0.8, linewidth=0)
        left += counts[:, j]
    ax.set_yticks(np.arange(num_clients), [str(i) for i in range(num_clients)])
    ax.invert_yaxis()
    ax.set_xlabel("examples")
    ax.set_ylabel("client")
    if num_classes <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        ax.set_title(title)
    else:
        ax.set_title(f"{title}\n({num_classes} classes, coloured along the turbo map; no legend)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out
