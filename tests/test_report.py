"""The evidence report: convergence, communication and routing diagnostics on hand-built runs."""

import json
import math

import pytest

from fedalign_moe.report.evidence import (
    aligned_fraction,
    collect_summaries,
    communication_rows,
    convergence_rows,
    rounds_to_reach,
    routing_spread,
    write_evidence,
)


def test_rounds_to_reach():
    assert rounds_to_reach([0.1, 0.5, 0.7, 0.6], 0.6) == 3
    assert rounds_to_reach([0.1, 0.5], 0.6) is None
    assert rounds_to_reach([0.6], 0.6) == 1


def _summary(strategy, seed, curve, alpha=0.1):
    return {"strategy": strategy, "seed": seed, "alpha": alpha, "num_clients": 2, "accuracy_per_round": curve,
            "final_accuracy": curve[-1], "uplink_bytes_total": 0, "wall_seconds": 1.0}


def test_convergence_counts_rounds_to_the_fedavg_final_mean():
    summaries = [_summary("fedavg", 0, [0.2, 0.4, 0.6]), _summary("fedavg", 1, [0.2, 0.5, 0.8]),  # target 0.7
                 _summary("fedalign", 0, [0.7, 0.7, 0.7]), _summary("fedalign", 1, [0.3, 0.3, 0.3]),
                 _summary("local", 0, [0.9, 0.9, 0.9])]
    rows = {r["strategy"]: r for r in convergence_rows(summaries)}
    assert set(rows) == {"fedavg", "fedalign"}  # no federation, no convergence row
    assert rows["fedavg"]["target"] == pytest.approx(0.7)
    assert rows["fedavg"]["rounds"] == [3] and rows["fedavg"]["reached"] == "1/2"
    assert rows["fedalign"]["rounds"] == [1] and rows["fedalign"]["speedup"] is None  # not every seed got there
    both = [_summary("fedavg", 0, [0.2, 0.7, 0.7]), _summary("fedavg", 1, [0.2, 0.5, 0.7]),  # target 0.7, rounds 2, 3
            _summary("fedprox", 0, [0.7, 0.7, 0.7]), _summary("fedprox", 1, [0.5, 0.7, 0.7])]  # rounds 1, 2
    rows = {r["strategy"]: r for r in convergence_rows(both)}
    assert rows["fedprox"]["speedup"] == pytest.approx(2.5 / 1.5)


def test_routing_spread_is_zero_for_equal_and_ln2_for_disjoint_routing():
    assert routing_spread({"0": [[0.5, 0.5]], "1": [[0.5, 0.5]]}) == pytest.approx(0.0)
    assert routing_spread({"0": [[1.0, 0.0]], "1": [[0.0, 1.0]]}) == pytest.approx(math.log(2))
    # averaged over pairs and layers: one identical pair, two disjoint pairs in layer 0; layer 1 all equal
    three = {"0": [[1, 0], [0.5, 0.5]], "1": [[1, 0], [0.5, 0.5]], "2": [[0, 1], [0.5, 0.5]]}
    assert routing_spread(three) == pytest.approx((2 / 3) * math.log(2) / 2)


def test_aligned_fraction_per_round():
    diags = [{"clients": [0, 1, 2, 3], "aligned": [[[0, 1, 2, 3], [0, 1]]]},
             {"clients": [0, 1], "aligned": [[[0], []]]}]
    assert aligned_fraction(diags, 4) == [pytest.approx(0.75), pytest.approx(0.25)]
    assert aligned_fraction([{"round": 1, "sub_moe": {"0": [[1, 2]]}}], 4) == []  # FedMoE's diagnostics


def _write_run(root, strategy, seed, up, stats):
    d = root / f"{strategy}-alpha0.1-seed{seed}"
    d.mkdir(parents=True)
    s = _summary(strategy, seed, [0.5, 0.6])
    s["config_json"] = json.dumps({"out_dir": "/elsewhere/now"})  # the comparison was moved since
    (d / "summary.json").write_text(json.dumps(s))
    rows = [{"round": r, "uplink_bytes": up, "downlink_bytes": up, "stats_uplink_bytes": stats,
             "clients": [{}, {}]} for r in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    routing = [{"round": r, "clients": {"0": [[0.9, 0.1]], "1": [[0.1 * r, 1 - 0.1 * r]]}} for r in (1, 2)]
    (d / "routing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in routing))
    if strategy == "fedalign":
        diags = [{"round": r, "clients": [0, 1], "aligned": [[[0, 1], [1]]], "p_g": [[0.5, 0.5]], "alpha": [[1.0, 1.0]],
                  "reg_loss": 0.01} for r in (1, 2)]
        (d / "diagnostics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in diags))


def test_evidence_report_from_moved_run_directories(tmp_path):
    for seed in (0, 1):
        _write_run(tmp_path, "fedavg", seed, up=1_000_000, stats=0)
        _write_run(tmp_path, "fedalign", seed, up=1_000_100, stats=100)
    summaries = collect_summaries(tmp_path)
    assert len(summaries) == 4 and all(s["run_dir"].startswith(str(tmp_path)) for s in summaries)
    comm = {r["strategy"]: r for r in communication_rows(summaries)}
    assert comm["fedalign"]["stats_bytes_per_client"] == pytest.approx(50)
    assert comm["fedalign"]["stats_share"] == pytest.approx(100 / 1_000_100)
    assert comm["fedavg"]["stats_share"] == 0
    text = write_evidence(tmp_path).read_text()
    assert "| 0.1 | fedalign | 2 |" in text and "## Convergence" in text and "0.010%" in text
    assert "Every client reply of every round arrived." in text
    assert "| 0.1 | fedalign | 0.500-0.500 | 1.00-1.00 | 0.0100 | 0.75 | 50% | 50% |" in text
    for name in ("routing_spread.png", "aligned_fraction.png", "routing_heatmap_alpha0.1.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_alignment_summary_in_plain_numbers():
    from fedalign_moe.report.evidence import alignment_summary

    diags = [{"clients": [0, 1, 2, 3], "aligned": [[[0, 1, 2, 3], [0, 1]]], "p_g": [[0.7, 0.3]], "alpha": [[0.9, 0.5]],
              "reg_loss": 0.02},
             {"clients": [0, 1, 2, 3], "aligned": [[[0, 1, 2], [0, 1, 2, 3]]], "p_g": [[0.6, 0.4]], "alpha": [[1.0, 0.8]],
              "reg_loss": 0.04}]
    s = alignment_summary(diags, 4)
    assert (s["p_g_min"], s["p_g_max"], s["alpha_min"], s["alpha_max"]) == (0.3, 0.7, 0.5, 1.0)
    assert s["reg"] == pytest.approx(0.03) and s["merged"] == pytest.approx((1 + 0.5 + 0.75 + 1) / 4)
    assert s["all_merged"] == pytest.approx(0.5) and s["half_or_less"] == pytest.approx(0.25)


def test_runs_with_failed_clients_are_named(tmp_path):
    _write_run(tmp_path, "fedavg", 0, up=1_000_000, stats=0)
    path = tmp_path / "fedavg-alpha0.1-seed0" / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    rows[1]["failures"] = 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_evidence(tmp_path).read_text()
    assert "fedavg, alpha 0.1, seed 0: failed replies (round 2: 3)" in text


def test_routing_concentration_detects_collapse():
    from fedalign_moe.report.evidence import routing_concentration

    share, entropy = routing_concentration({"0": [[0.25, 0.25, 0.25, 0.25]], "1": [[0.25, 0.25, 0.25, 0.25]]})
    assert share == pytest.approx(0.25) and entropy == pytest.approx(1.0)
    share, entropy = routing_concentration({"0": [[1.0, 0.0, 0.0, 0.0]], "1": [[0.0, 0.0, 0.0, 1.0]]})
    assert share == pytest.approx(1.0) and entropy == pytest.approx(0.0)


def test_a_stopped_run_is_named_and_left_out(tmp_path):
    for seed in (0, 1):
        _write_run(tmp_path, "fedavg", seed, up=1_000_000, stats=0)
    path = tmp_path / "fedavg-alpha0.1-seed1" / "summary.json"
    s = json.loads(path.read_text())
    s.update(stopped_early="stopped after round 1: no client replied", accuracy_per_round=[0.5], final_accuracy=0.5)
    path.write_text(json.dumps(s))
    text = write_evidence(tmp_path).read_text()
    assert "fedavg, alpha 0.1, seed 1: stopped after round 1" in text
    assert "| 0.1 | fedavg | 1 |" in text  # only the complete run is in the tables
    from fedalign_moe.report.tables import draw_comparison
    assert draw_comparison(collect_summaries(tmp_path), tmp_path)[0].stat().st_size > 1000  # curves of unequal length


def _configured(strategy, seed, **data):
    s = _summary(strategy, seed, [0.5, 0.6])
    s["config_json"] = json.dumps({"seed": seed, "out_dir": f"runs/{seed}", "data": data, "model": {"prefix_cache_dir": None}})
    return s


def test_a_cell_never_averages_different_setups():
    from fedalign_moe.report.tables import MixedCellError, group_cells

    same = [_configured("fedavg", 0, max_length=48), _configured("fedavg", 1, max_length=48)]
    assert len(group_cells(same)[(0.1, "fedavg")]) == 2  # seeds and output folders may differ
    with pytest.raises(MixedCellError, match="data.max_length"):
        group_cells([_configured("fedavg", 0, max_length=48), _configured("fedavg", 1, max_length=64)])
    older = _configured("fedavg", 1, max_length=48)
    older["strategy_revision"] = 0  # measured by an older version of the strategy
    with pytest.raises(MixedCellError, match="strategy_revision"):
        group_cells([same[0], older])
    with pytest.raises(MixedCellError, match="data.holdout"):  # across cells too: the tables name one split
        group_cells([_configured("fedavg", 0, holdout="validation"), _configured("fedprox", 0)])


def test_tuning_runs_are_labelled_as_validation(tmp_path):
    from fedalign_moe.report.tables import write_results_table

    text = write_results_table([_configured("fedavg", 0, holdout="validation")], tmp_path / "r.md").read_text()
    assert "global validation split" in text and "test split was not read" in text
    text = write_results_table([_configured("fedavg", 0)], tmp_path / "r.md").read_text()
    assert "global test split" in text and "validation" not in text


def test_paired_difference_has_the_paired_t_interval():
    from fedalign_moe.report.paired import paired_difference

    d = paired_difference({0: 0.7, 1: 0.8, 2: 0.6, 5: 0.9}, {0: 0.6, 1: 0.7, 2: 0.6, 3: 0.1})  # seeds 0-2 pair up
    assert d.n == 3 and d.per_seed == pytest.approx({0: 0.1, 1: 0.1, 2: 0.0})
    assert d.mean == pytest.approx(0.2 / 3)
    assert d.half_width == pytest.approx(4.302653 * math.sqrt(1 / 300) / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    assert not d.resolved  # +6.7 +- 14.3 points
    one = paired_difference({0: 0.7}, {0: 0.6})
    assert one.half_width is None and not one.resolved and paired_difference({1: 0.5}, {0: 0.5}) is None
    tight = paired_difference({0: 0.71, 1: 0.72, 2: 0.73}, {0: 0.60, 1: 0.60, 2: 0.60})
    assert tight.resolved and tight.mean == pytest.approx(0.12)


def test_two_seeds_never_resolve_a_difference():
    """alpha 1.0 on `specialised`, FedProx - FedAvg client-own: 9 questions of 401, then 9 of 402, printed
    as +2.2 +- 0.0 (2) and once marked resolved."""
    from fedalign_moe.report.paired import format_difference, paired_difference

    d = paired_difference({0: 354 / 401, 1: 361 / 402}, {0: 345 / 401, 1: 352 / 402})
    assert d.n == 2 and d.half_width is not None and d.half_width < abs(d.mean)
    assert not d.resolved and format_difference(d) == "+2.2 ± 0.0 (2)"
    three = paired_difference({0: 354 / 401, 1: 361 / 402, 2: 0.9}, {0: 345 / 401, 1: 352 / 402, 2: 0.87})
    assert three.resolved and format_difference(three).endswith("(3) *")


def test_the_evidence_report_pairs_every_strategy_with_fedavg_by_seed(tmp_path):
    from fedalign_moe.report.paired import paired_rows, paired_table

    def run(strategy, seed, final, local=None):
        s = _summary(strategy, seed, [final])
        s["last5_accuracy"], s["final_local_accuracy"], s["last5_local_accuracy"] = final, local, local
        return s

    summaries = [run("fedavg", 0, 0.60, 0.9), run("fedavg", 1, 0.70, 0.8), run("fedalign", 0, 0.65, 0.95),
                 run("fedalign", 1, 0.76, 0.85), run("centralised", 0, 0.80)]
    rows = {r["strategy"]: r for r in paired_rows(summaries)}
    assert set(rows) == {"fedalign", "centralised"}
    assert rows["fedalign"]["final_accuracy"].mean == pytest.approx(0.055)
    assert rows["fedalign"]["final_local_accuracy"].mean == pytest.approx(0.05)
    assert rows["centralised"]["final_local_accuracy"] is None  # no client-own figure
    table = paired_table(list(rows.values()))
    assert "| 0.1 | fedalign | +5.5 ± 6.4 (2) | +5.5 ± 6.4 (2) | +5.0 ± 0.0 (2) | +5.0 ± 0.0 (2) |" in table  # two seeds: no *
    assert "| 0.1 | centralised | +20.0 (1 seed) |" in table


def test_the_evidence_report_pairs_fedalign_with_each_other_strategy():
    """FedAlign-MoE minus each baseline by seed (FedProx beat it on `specialised`: the report must show it)."""
    from fedalign_moe.report.evidence import _against_baselines
    from fedalign_moe.report.paired import method_rows, paired_table

    def run(strategy, seed, final):
        s = _summary(strategy, seed, [final])
        s["last5_accuracy"], s["final_local_accuracy"], s["last5_local_accuracy"] = final, None, None
        return s

    summaries = [run("fedavg", 0, 0.60), run("fedavg", 1, 0.70), run("fedprox", 0, 0.70), run("fedprox", 1, 0.75),
                 run("fedalign", 0, 0.65), run("fedalign", 1, 0.72), run("fedalign-uniform", 1, 0.62)]
    rows = {r["strategy"]: r for r in method_rows(summaries)}
    assert set(rows) == {"fedprox", "fedalign-uniform"}  # FedAvg has its own table
    assert rows["fedprox"]["final_accuracy"].per_seed == pytest.approx({0: -0.05, 1: -0.03})
    assert rows["fedalign-uniform"]["final_accuracy"].per_seed == pytest.approx({1: 0.10})
    table = paired_table(list(rows.values()), method="fedalign")
    assert "| alpha | baseline | global, final: fedalign − it |" in table
    assert "| 0.1 | fedprox | -4.0 ± 12.7 (2) |" in table
    assert method_rows([s for s in summaries if s["strategy"] != "fedalign"]) == []
    section = "\n".join(_against_baselines(summaries))
    assert section.startswith("## FedAlign-MoE paired with the other strategies") and "| 0.1 | fedprox | -4.0" in section
    assert _against_baselines(summaries[:4]) == []  # no FedAlign-MoE run: no section


def test_stored_runs_with_gzipped_round_files_report_as_the_plain_ones(tmp_path):
    """benchmarks/results keeps each run's JSONL files as NAME.jsonl.gz: every reader takes them as the plain files."""
    import gzip
    import shutil

    from typer.testing import CliRunner

    from fedalign_moe.cli import app
    from fedalign_moe.report.plots import draw_run
    from fedalign_moe.runlog import read_jsonl

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    for seed in (0, 1):
        _write_run(plain, "fedavg", seed, up=1_000_000, stats=0)
        _write_run(plain, "fedalign", seed, up=1_000_100, stats=100)
    for path in plain.glob("*/metrics.jsonl"):  # a curve for the run's accuracy figure
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "accuracy": 0.4 + 0.1 * r["round"]}) + "\n" for r in rows))
    shutil.copytree(plain, packed)
    for path in sorted(packed.glob("*/*.jsonl")):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    run = packed / "fedalign-alpha0.1-seed0"
    assert not list(packed.glob("*/*.jsonl")) and (run / "routing.jsonl.gz").exists()
    assert read_jsonl(run / "routing.jsonl") == read_jsonl(plain / run.name / "routing.jsonl") != []
    assert write_evidence(packed).read_text() == write_evidence(plain).read_text()  # routing, diagnostics, bytes
    assert {p.name for p in draw_run(run)} == {"accuracy.png", "routing.png"}  # from metrics and routing .gz
    res = CliRunner().invoke(app, ["report", str(run)])  # a run folder, told apart by its metrics.jsonl.gz
    assert res.exit_code == 0 and "routing.png" in res.output, res.output


def test_each_strategy_keeps_one_colour_of_its_own_in_every_figure():
    from fedalign_moe.registry import STRATEGIES
    from fedalign_moe.report.tables import strategy_color

    colours = [strategy_color(name) for name in STRATEGIES]
    assert len(set(colours)) == len(STRATEGIES)  # 18 names, tab20: none shared
    assert strategy_color("fedalign") == strategy_color("fedalign") and strategy_color("someday") == "0.5"
