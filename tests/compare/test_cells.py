import json
import time

from fedpeft.cli import main
from fedpeft.compare import compare
from fedpeft.compare.cells import LOG_NAME, is_done, simulate_command
from fedpeft.compare.grid import Run, expand
from tests.compare.conftest import GRID
from tests.conftest import FAST_RUN


def test_every_run_of_the_grid_has_its_folder(grid_dir):
    runs = expand(GRID)
    for run in runs:
        folder = grid_dir / run.name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["rounds_completed"] == 2 and summary["strategy"] == run.values["strategy"]
        assert (folder / "history.csv").is_file() and (folder / LOG_NAME).is_file()
        if run.values["strategy"] == "fedavg":
            # zero-padded FedAvg really ran with ranks 2 and 4: 4 adapted 64 x 64 layers, f32,
            # plus the 2 x 64 head, per client and round
            per_round = 4 * (2 + 4) * (64 + 64) * 4 + 2 * (2 * 64 + 2) * 4
            assert summary["bytes_up"] == 2 * per_round


def test_a_rerun_skips_done_runs(grid_dir):
    stamps = {p: p.stat().st_mtime_ns for p in grid_dir.glob("*/summary.json")}
    assert len(stamps) == 4
    started = time.perf_counter()
    result = compare([*GRID, f"out_dir={grid_dir}", "jobs=2"])
    assert [o.status for o in result.outcomes] == ["done"] * 4
    assert time.perf_counter() - started < 60
    assert stamps == {p: p.stat().st_mtime_ns for p in grid_dir.glob("*/summary.json")}
    assert result.results_csv.is_file() and len(result.plots) == 2


def test_a_failing_run_does_not_end_the_grid_and_is_retried(tmp_path, capsys):
    bad = [*FAST_RUN, "dataset.max_train_examples=100", "federation.num_clients=500", "seed=0,1"]
    assert main(["compare", *bad, f"out_dir={tmp_path}", "jobs=2"]) == 1
    assert "2 runs failed" in capsys.readouterr().err
    logs = sorted(tmp_path.glob(f"*/{LOG_NAME}"))
    assert len(logs) == 2
    for log in logs:
        assert "federation.num_clients=500 exceeds the 100 training examples" in log.read_text()
    table = (tmp_path / "results.md").read_text()
    assert "Unfinished runs (2)" in table
    assert (tmp_path / "results.csv").read_text().count(",failed,") == 2
    assert not list(tmp_path.glob("*.png"))
    result = compare([*bad, f"out_dir={tmp_path}", "jobs=2"])
    assert [o.status for o in result.outcomes] == ["failed", "failed"]


def test_bad_compare_options_exit_2(capsys, tmp_path):
    for args, expected in [
        (["seed=0,1"], "out_dir is not set"),
        ([f"out_dir={tmp_path}", "jobs=0"], "jobs=0 must be an integer >= 1"),
        ([f"out_dir={tmp_path}", "target=2"], "target=2 must be in (0, 1]"),
        ([f"out_dir={tmp_path}", "study=nope"], "study=nope is unknown"),
        ([f"out_dir={tmp_path}", "strategy=fedavg,nope"], "strategy=nope is unknown"),
        ([f"out_dir={tmp_path}", "audit=1"], "audit=1 must be 0 (no audit) or a canary count"),
    ]:
        assert main(["compare", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err


def test_an_audited_grid_runs_fedpeft_audit_and_needs_the_bound_to_be_done(tmp_path):
    run = Run(("strategy=fedavg", "dp=eps3"), (("strategy", "fedavg"),), "fedavg")
    command = simulate_command(run, tmp_path, audit=500)
    assert command[3] == "audit" and command[-1] == "canaries=500"
    assert simulate_command(run, tmp_path)[3] == "simulate"
    (tmp_path / "summary.json").write_text(json.dumps({"max_epsilon": 3.0}))
    assert is_done(tmp_path) and not is_done(tmp_path, audit=500)
    (tmp_path / "summary.json").write_text(
        json.dumps({"max_epsilon": 3.0, "audited_epsilon_lower_bound": 0.3})
    )
    assert is_done(tmp_path, audit=500)
