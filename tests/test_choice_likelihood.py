"""Multiple choice scored by likelihood (HellaSwag's protocol): each choice follows its context in a row of its
own, and its score is the mean log-probability of its tokens under the causal LM; known answers for the
rows, the masks and the scores, and two federated rounds on a file in HellaSwag's hub columns."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fedalign_moe.data import load_source
from fedalign_moe.models.task import choice_log_likelihood
from fedalign_moe.training.local import tokenize_choices


def _word_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "a", "b", "c", "d", "e", "x", "y", "z"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_each_choice_follows_its_context_in_its_own_row():
    t = tokenize_choices(_word_tokenizer(), ["a b", "c"], [["x", "y z"], ["z", "x x"]], [1, 0], max_length=5)
    assert t.choices == 2 and len(t) == 2 and t.input_ids_NS.shape == (4, 5)
    assert t.input_ids_NS.tolist() == [[2, 3, 7, 0, 0], [2, 3, 8, 9, 0], [4, 9, 0, 0, 0], [4, 7, 7, 0, 0]]
    assert t.target_mask_NS.tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    assert t.attention_mask_NS.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    batch = t.batch(torch.tensor([1]), torch.device("cpu"))  # example 1: its two rows
    assert batch["input_ids_BS"].tolist() == [[4, 9, 0, 0, 0], [4, 7, 7, 0, 0]]
    # too long: the context loses its start, the choice is kept whole
    long = tokenize_choices(_word_tokenizer(), ["a b c d"], [["x y", "z"]], [0], max_length=4)
    assert long.input_ids_NS.tolist() == [[4, 5, 7, 8], [3, 4, 5, 9]]


def test_a_choice_scores_the_mean_log_probability_of_its_tokens():
    g = torch.Generator().manual_seed(0)
    V, H = 10, 6
    head = torch.nn.Linear(H, V, bias=False)
    hidden_RSH = torch.randn(4, 5, H, generator=g)
    ids_RS = torch.randint(0, V, (4, 5), generator=g)
    target_RS = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    got_BC = choice_log_likelihood(hidden_RSH, head, ids_RS, target_RS, num_choices=2)
    logp_RSV = torch.log_softmax(head(hidden_RSH), -1)
    by_hand = []
    for r in range(4):
        positions = [s for s in range(1, 5) if target_RS[r, s]]
        by_hand.append(sum(float(logp_RSV[r, s - 1, ids_RS[r, s]]) for s in positions) / len(positions))
    assert got_BC.shape == (2, 2) and torch.allclose(got_BC.reshape(-1), torch.tensor(by_hand), atol=1e-5)


def _hellaswag(path: Path, n: int = 120) -> str:
    acts = ["Cooking", "Gardening", "Skiing", "Painting"]
    rows = [{"ctx": f"Someone starts step {i} of {acts[i % 4].lower()} and then", "activity_label": acts[i % 4],
             "endings": [f"does thing {j} number {i}." for j in range(4)], "label": str(i % 4)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_hellaswags_columns_are_scored_by_likelihood_unless_told_otherwise(tmp_path):
    path = _hellaswag(tmp_path / "hs.jsonl", 8)
    data = load_source("file", path=path)
    assert data.task == "choice-likelihood" and data.partition_key == "group" and data.label_names == list("ABCD")
    assert data.dataset["text"][1] == "Someone starts step 1 of gardening and then"
    assert data.dataset["choices"][1] == [f"does thing {j} number 1." for j in range(4)]
    letters = load_source("file", path=path, choice_scoring="letters")
    assert letters.task == "multiple-choice" and letters.dataset["text"][0].endswith("D. does thing 3 number 0.\nAnswer:")
    mmlu = load_source("mmlu", choice_scoring="likelihood")
    assert mmlu.task == "choice-likelihood" and mmlu.dataset["text"][0].startswith("Question: ")
    assert mmlu.dataset["text"][0].endswith("\nAnswer:") and len(mmlu.dataset["choices"][0]) == 4


def test_two_rounds_of_fedalign_on_a_file_in_hellaswags_columns(tmp_path, monkeypatch):
    """The real ServerApp loop and ClientApp (in this process), a tiny Mixtral scoring each ending."""
    from fedalign_moe.config import load_config
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    cached_workspace.cache_clear()
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path / "run"), "federation": {"strategy": "fedalign"},
                                         "data": {"source": "file", "path": _hellaswag(tmp_path / "hs.jsonl")}})
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
    assert all(0.0 <= a <= 1.0 for a in summary["accuracy_per_round"])
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_tokens"] > 0 for r in rounds)


def test_likelihood_on_an_encoder_is_one_line(tmp_path):
    from fedalign_moe.config import load_config
    from fedalign_moe.models.assets import ModelLoadError
    from fedalign_moe.training.setup import build_for, prepare_data

    cfg = load_config("tiny", overrides={"model": {"backbone": "minilm"}, "data": {"source": "file",
                                                                                  "path": _hellaswag(tmp_path / "hs.jsonl")}})
    with pytest.raises(ModelLoadError, match="choices scored by their likelihood .* need a causal LM; minilm scores answer letters"):
        build_for(cfg, prepare_data(cfg))


def test_the_plan_counts_a_row_for_each_choice(tmp_path):
    """Four endings an example: four sequences a step, four times the activations of letters scoring."""
    from fedalign_moe.config import load_config
    from fedalign_moe.training.plan import ModelFacts, activation_bytes, plan_model

    path = _hellaswag(tmp_path / "hs.jsonl")
    facts = {}
    for scoring in ("letters", "likelihood"):
        cfg = load_config("tiny", overrides={"data": {"source": "file", "path": path, "choice_scoring": scoring}})
        facts[scoring] = ModelFacts.of(plan_model(cfg))
    assert (facts["letters"].rows_per_example, facts["likelihood"].rows_per_example) == (1, 4)
    assert activation_bytes(facts["likelihood"], cfg) > 3 * activation_bytes(facts["letters"], cfg)


def test_the_centralised_union_keeps_each_choice_row_and_its_target_mask():
    from fedalign_moe.training.local import ClientTensors

    def split(n: int, start: int) -> ClientTensors:
        rows = n * 3
        ids = torch.arange(start, start + rows * 4).reshape(rows, 4)
        return ClientTensors(ids, torch.ones(rows, 4, dtype=torch.long), torch.arange(n), None,
                             target_mask_NS=(ids % 2 == 0).long(), choices=3)

    a, b = split(2, 0), split(1, 100)
    union = ClientTensors.concat([a, b])
    assert union.choices == 3 and len(union) == 3 and union.input_ids_NS.shape == (9, 4)
    assert torch.equal(union.target_mask_NS, torch.cat([a.target_mask_NS, b.target_mask_NS]))
    with pytest.raises(ValueError, match="cannot be joined"):
        ClientTensors.concat([a, ClientTensors(a.input_ids_NS, a.attention_mask_NS, a.labels_N)])
