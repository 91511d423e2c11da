"""Round records and summaries: built typed, written flat, read back the same."""

from __future__ import annotations

import math

from fedalign_moe.records import ClientRow, Exchange, RoundRecord, Summary, client_totals

ROWS = (ClientRow(0, 30, 1.5, 0.5, 10, 300, 0.25), ClientRow(1, 10, 0.5, 1.0, 30, 100, 0.5, weight_bounded_to=7.0,
                                                                update_norm=0.3, update_scaled_by=0.5))
HEAD = dict(strategy="fedavg", strategy_revision=1, preset="tiny", dataset="synthetic", backbone="tiny-mixtral",
            alpha=0.1, num_clients=2, rounds=3, seed=0)


def federated(rnd: int, accuracy: float, adopted: bool = True) -> RoundRecord:
    ex = Exchange(12, 2, 2, ({"node_id": 5, "partition_id": None, "reason": "timeout"},), adopted,
                  None if adopted else "no valid reply", 0.01, 0.002)
    return RoundRecord(rnd, accuracy, 1.0, uplink_bytes=100, downlink_bytes=200, failures=1, seconds=1.5,
                       clients=ROWS, exchange=ex, **client_totals(ROWS))


def test_client_totals_weigh_by_what_each_figure_is_over():
    totals = client_totals(ROWS)
    assert totals == {"local_accuracy": (0.5 * 10 + 1.0 * 30) / 40, "train_loss": (1.5 * 30 + 0.5 * 10) / 40,
                      "train_tokens": 400, "train_seconds": 0.75}
    assert client_totals(())["train_loss"] is None


def test_a_round_is_written_flat_and_read_back_the_same():
    record = federated(1, 0.5)
    raw = record.to_json()
    assert list(raw)[:7] == ["round", "accuracy", "loss", "local_accuracy", "train_loss", "uplink_bytes", "downlink_bytes"]
    assert raw["adopted"] is True and raw["sent"] == 2 and raw["clients"][1]["weight_bounded_to"] == 7.0
    assert raw["clients"][1]["update_scaled_by"] == 0.5
    assert not {"weight_bounded_to", "update_scaled_by"} & set(raw["clients"][0])
    assert RoundRecord.from_json(raw) == record
    centralised = RoundRecord(2, 0.7, 0.9, 0.6, 0.8, 0, 0, 0, 50, 0.1, 0.2)
    assert "clients" not in centralised.to_json() and "adopted" not in centralised.to_json()
    assert RoundRecord.from_json(centralised.to_json()) == centralised and centralised.adopted


def test_a_non_finite_accuracy_is_written_as_none():
    assert RoundRecord(1, math.nan, math.inf, None, None, 0, 0, 0, 0, 0.0, 0.1).to_json()["accuracy"] is None


def test_the_summary_counts_only_finite_accuracies_and_names_rounds_not_adopted():
    rounds = [federated(1, 0.2), federated(2, math.nan, adopted=False), federated(3, 0.6)]
    summary = Summary.of(HEAD, rounds, 12.345, stopped_early=None).to_json()
    assert summary["accuracy_per_round"] == [0.2, 0.6] and summary["final_accuracy"] == 0.6
    assert summary["best_accuracy"] == 0.6 and summary["last5_accuracy"] == 0.4
    assert summary["rounds_not_adopted"] == [2] and summary["failures_total"] == 3
    assert summary["train_tokens_total"] == 1200 and summary["train_tokens_per_second"] == round(1200 / 2.25, 1)
    assert summary["wall_seconds"] == 12.35 and summary["stopped_early"] is None
    assert list(summary)[:2] == ["strategy", "strategy_revision"]
