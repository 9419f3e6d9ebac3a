import csv
import math
from pathlib import Path

import pytest
from scipy import stats

from fedpeft.cli import main
from fedpeft.compare import paired
from fedpeft.compare.aggregate import RunResult
from fedpeft.compare.grid import Run, expand
from fedpeft.errors import ConfigError
from tests.conftest import FAST_RUN


def _final(method, seed, final, dataset="sst2"):
    swept = (("strategy", method), ("dataset", dataset), ("seed", str(seed)))
    summary = {"strategy": method, "final_accuracy": final, "accuracy_by_round": [0.5, final]}
    return RunResult(Run((), swept, f"{method}{dataset}{seed}"), Path("."), seed, summary)


def _grid():
    """fedavg, a, b on three seeds of sst2; c on one seed, d on two (a seed failed)."""
    finals = {
        "fedavg": [0.70, 0.72, 0.74],
        "a": [0.75, 0.78, 0.80],  # +0.05, +0.06, +0.06
        "b": [0.69, 0.75, 0.73],  # -0.01, +0.03, -0.01
        "c": [0.71],
        "d": [0.70, 0.72],  # identical to fedavg: no variance, no test
    }
    results = [_final(m, s, f) for m, values in finals.items() for s, f in enumerate(values)]
    results.append(_final("fedavg", 0, 0.6, dataset="trec"))
    results.append(_final("a", 0, 0.5, dataset="trec"))
    results.append(_final("b", 1, 0.5, dataset="trec"))  # no seed shared with fedavg
    return results


def test_holm_adjusts_step_down():
    assert paired.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert paired.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert paired.holm([]) == []


def test_paired_differences_over_shared_seeds():
    rows = paired.paired_differences(_grid(), "fedavg")
    a, b, c, d, a_trec, b_trec = rows
    assert [(r.config, r.method) for r in (a, a_trec)] == [
        ((("dataset", "sst2"),), "a"),
        ((("dataset", "trec"),), "a"),
    ]
    assert a.seeds == [0, 1, 2] and a.differences == pytest.approx([0.05, 0.06, 0.06])
    assert a.mean == pytest.approx(0.17 / 3)
    # sd of the differences 0.005774, se 0.003333: t = 17, 2 degrees of freedom
    p_a = 2 * stats.t.sf(17.0, 2)
    half = stats.t.ppf(0.975, 2) * 0.01 / 3
    assert a.p == pytest.approx(p_a, rel=1e-6)
    assert a.ci == pytest.approx((0.17 / 3 - half, 0.17 / 3 + half))
    # b: mean 1/300, sd 0.023094, se 0.013333: t = 0.25
    p_b = 2 * stats.t.sf(0.25, 2)
    assert b.p == pytest.approx(p_b, rel=1e-6)
    # Holm over the two tested methods of sst2 (c has one seed, d no variance)
    assert a.p_holm == pytest.approx(2 * p_a) and b.p_holm == pytest.approx(p_b)
    assert a.significant and not b.significant
    assert c.seeds == [0] and c.ci is None and c.p is None and not c.significant
    assert d.differences == [0.0, 0.0] and d.p is None and d.ci is None
    assert a_trec.differences == pytest.approx([-0.1]) and a_trec.p_holm is None
    assert b_trec.seeds == [] and b_trec.mean is None


def test_markdown_and_csv(tmp_path):
    rows = paired.paired_differences(_grid(), "fedavg")
    text = paired.markdown(rows, "fedavg")
    assert text.startswith("## Paired differences from fedavg\n")
    assert "| dataset | method | shared seeds | Δ final accuracy | 95% CI | p | p (Holm) |" in text
    a = rows[0]
    ci = f"[{a.ci[0]:+.4f}, {a.ci[1]:+.4f}]"
    assert f"| sst2 | a | 3 | +0.0567 | {ci} | {a.p:.3g} | {a.p_holm:.3g} * |" in text
    assert "| sst2 | c | 1 | +0.0100 | — | — | — |" in text
    assert "| trec | b | 0 | — | — | — | — |" in text
    assert "Significant at Holm-adjusted p < 0.05: a (dataset=sst2) +0.0567." in text
    path = paired.write_csv(rows, tmp_path / "paired.csv")
    with path.open() as fh:
        first, *others = csv.DictReader(fh)
    assert (first["dataset"], first["method"], first["baseline"], first["seeds"]) == (
        "sst2",
        "a",
        "fedavg",
        "0;1;2",
    )
    assert float(first["p_holm"]) == pytest.approx(a.p_holm) and first["significant"] == "True"
    assert others[1]["ci_low"] == "" and others[1]["significant"] == "False"
    without_a = [r for r in _grid() if r.method in ("fedavg", "b")]
    calm = paired.markdown(paired.paired_differences(without_a, "fedavg"), "fedavg")
    assert "No difference from the baseline is significant at Holm-adjusted p < 0.05." in calm
    assert paired.markdown([], "fedavg") == ""


def test_baseline_choice():
    assert paired.choose_baseline(["flora", "fedavg"]) == "fedavg"
    assert paired.choose_baseline(["flora", "fedsvd"]) == "flora"
    assert paired.choose_baseline(["flora", "fedsvd"], "fedsvd") == "fedsvd"
    with pytest.raises(ConfigError, match="baseline=ffa_lora is not a strategy of the grid: "):
        paired.choose_baseline(["flora", "fedsvd"], "ffa_lora")
    assert paired.grid_strategies(expand([*FAST_RUN, "strategy=flora,fedavg"])) == [
        "flora",
        "fedavg",
    ]
    assert paired.grid_strategies(expand([*FAST_RUN, "strategy=fedsvd", "seed=0,1"])) == ["fedsvd"]
    # one strategy: nothing to pair
    rows = paired.paired_differences([_final("fedsvd", 0, 0.7), _final("fedsvd", 1, 0.8)], "fedsvd")
    assert rows == []


def test_an_unknown_baseline_fails_before_anything_runs(tmp_path, capsys):
    args = [*FAST_RUN, "strategy=fedavg,flora", f"out_dir={tmp_path}", "baseline=fedsvd"]
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "baseline=fedsvd is not a strategy of the grid: choose one of fedavg, flora" in err
    assert not list(tmp_path.iterdir())


def test_results_md_has_the_paired_differences(grid_dir):
    with (grid_dir / "results.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    finals = {(r["strategy"], r["seed"]): float(r["final_accuracy"]) for r in runs}
    ours, theirs = [[finals[(m, s)] for s in ("0", "1")] for m in ("flora", "fedavg")]
    test = stats.ttest_rel(ours, theirs)
    table = (grid_dir / "results.md").read_text()
    assert "## Paired differences from fedavg" in table
    mean = (ours[0] - theirs[0] + ours[1] - theirs[1]) / 2
    row = f"| flora | 2 | {mean:+.4f} |"
    assert row in table
    with (grid_dir / "paired.csv").open() as fh:
        (flora,) = csv.DictReader(fh)
    assert flora["baseline"] == "fedavg" and flora["seeds"] == "0;1"
    if math.isnan(test.pvalue):  # both methods equally accurate on both seeds
        assert flora["p_value"] == ""
    else:
        assert float(flora["p_value"]) == pytest.approx(test.pvalue)
        assert float(flora["p_holm"]) == pytest.approx(test.pvalue)  # one method: unadjusted
    verdict = "Significant at" if flora["significant"] == "True" else "No difference from"
    assert verdict in table
