"""Fault injection: which clients fail is reproducible, crashes raise, stalls sleep; a real
federation with 30% of clients crashing or stalling each round still completes."""

from __future__ import annotations

import csv
import json
import time

import pytest
from flwr.app import Context, RecordDict

from fedpeft.cli import main, simulate
from fedpeft.clients import faults
from tests.conftest import FAST_RUN

#: round 1 also starts the Ray actors (imports, model build): on a loaded 2-core machine that took
#: over 10 s, and the healthy clients of round 1 timed out with the crashed one; 20 s leaves room
PLAN = {"crash_prob": 0.3, "slow_prob": 0.1, "seed": 10, "round_timeout": 20}


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=1000 + partition,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def test_draws_are_reproducible_and_follow_the_probabilities():
    draws = [faults.draw(PLAN, r, m) for r in range(1, 201) for m in range(10)]
    assert draws == [faults.draw(dict(PLAN), r, m) for r in range(1, 201) for m in range(10)]
    assert draws.count(faults.CRASH) / len(draws) == pytest.approx(0.3, abs=0.03)
    assert draws.count(faults.SLOW) / len(draws) == pytest.approx(0.1, abs=0.02)
    other = [faults.draw({**PLAN, "seed": 11}, r, m) for r in range(1, 201) for m in range(10)]
    assert other != draws
    assert {faults.draw({"crash_prob": 0.0, "slow_prob": 0.0}, r, 0) for r in range(50)} == {None}


def test_crash_raises_and_stall_sleeps_past_the_timeout():
    crash = next(m for m in range(20) if faults.draw(PLAN, 1, m) == faults.CRASH)
    with pytest.raises(faults.InjectedCrash, match=f"client {crash} in round 1"):
        faults.inject({"faults": PLAN}, _context(crash), 1)
    plan = {**PLAN, "slow_s": 0.3}
    slow = next(m for m in range(50) if faults.draw(plan, 1, m) == faults.SLOW)
    started = time.perf_counter()
    faults.inject({"faults": plan}, _context(slow), 1)
    assert time.perf_counter() - started >= 0.3
    assert faults.stall_seconds(PLAN) == PLAN["round_timeout"] + 1
    healthy = next(m for m in range(20) if faults.draw(PLAN, 1, m) is None)
    faults.inject({"faults": PLAN}, _context(healthy), 1)
    faults.inject({}, _context(crash), 1)  # no faults block: nothing happens


def test_federation_completes_with_crashing_and_stalling_clients(tmp_path, data_dir):
    """FLoRA (per-node state) with 4 clients; faults.seed=10 gives one crash in round 1, one
    stall in round 2 and three crashes in round 3."""
    overrides = [
        *FAST_RUN,
        "strategy=flora",
        "federation.num_clients=4",
        "federation.rounds=3",
        f"federation.round_timeout={PLAN['round_timeout']}",
        f"faults.crash_prob={PLAN['crash_prob']}",
        f"faults.slow_prob={PLAN['slow_prob']}",
        f"faults.seed={PLAN['seed']}",
        f"run_dir={tmp_path}",
    ]
    summary = simulate(overrides)
    assert summary["rounds_completed"] == 3
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))[1:]
    total = 0
    for server_round, row in enumerate(rows, start=1):
        failures = json.loads(row["failures"])
        plan = {m: faults.draw(PLAN, server_round, m) for m in range(4)}
        for member, fault in plan.items():
            if fault == faults.CRASH:
                assert "injected crash" in failures[str(member)]
            elif fault == faults.SLOW:
                assert "no reply before the round timeout" in failures[str(member)]
        injected = sum(f is not None for f in plan.values())
        assert int(row["failed"]) >= injected >= 1
        assert int(row["replied"]) + int(row["failed"]) + int(row["rejected"]) == 4
        assert int(row["replied"]) >= 1 and float(row["accuracy"]) > 0
        total += int(row["failed"])
    assert summary["failed_replies"] == total >= 5


def test_a_federation_whose_every_reply_failed_exits_1_with_one_line(tmp_path, data_dir, capsys):
    overrides = [*FAST_RUN, "federation.rounds=1", "faults.crash_prob=1.0", f"run_dir={tmp_path}"]
    assert main(["simulate", *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedpeft: error: every reply failed in all 1 rounds (2 failed, 0 ")
    assert "injected crash" in err[-1] and "history.csv" in err[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_with_replies"] == 0 and summary["failed_replies"] == 2
