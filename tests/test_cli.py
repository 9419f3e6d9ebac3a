"""Bad input: one line on stderr naming the field and the fix, exit status 2, no traceback."""

import subprocess
import sys

import pytest

from fedpeft.cli import main
from tests.conftest import FAST_RUN


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["strategy=nope"],
            "strategy=nope is unknown: choose one of "
            "fed_sb, fedavg, fedex_lora, fedmomentum, fedrot_lora, fedsa_lora, fedsvd, ffa_lora, "
            "flexlora, flora, hetlora, lora_fair, rolora",
        ),
        (["model=gpt9"], "model=gpt9 is unknown"),
        (["dataset=nope"], "dataset=nope is unknown"),
        (["partition=nope"], "partition=nope is unknown"),
        (["adapter.rank=0"], "adapter.rank=0 must be a positive integer"),
        (["adapter.rank=-4"], "adapter.rank=-4 must be a positive integer"),
        (["federation.fraction=0"], "federation.fraction=0 must be in (0, 1]"),
        (["federation.fraction=1.5"], "federation.fraction=1.5 must be in (0, 1]"),
        (["federation.rounds=0"], "federation.rounds=0 must be an integer >= 1"),
        (["train.optimizer=adam9"], "train.optimizer=adam9 must be adamw or sgd"),
        (["partition.alpha=-1"], "partition.alpha=-1 must be positive"),
        (["model=hf"], "model.name_or_path must be set"),
        (["no_such_key=1"], "bad override"),
        (
            [*FAST_RUN, "federation.num_clients=500", "dataset.max_train_examples=100"],
            "federation.num_clients=500 exceeds the 100 training examples",
        ),
    ],
)
def test_bad_config_values(overrides, expected, capsys):
    assert main(["simulate", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err


def test_missing_file(tmp_path, capsys):
    assert main(["simulate", "dataset=files", f"dataset.path={tmp_path}/nope.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.csv" in err


def test_missing_label_column(tmp_path, capsys):
    path = tmp_path / "mail.csv"
    path.write_text("body,tag\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    overrides = ["dataset=files", f"dataset.path={path}", "dataset.text_column=body"]
    assert main(["simulate", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label" in err and "tag" in err


def test_unreadable_file(tmp_path, capsys):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet")
    assert main(["simulate", "dataset=files", f"dataset.path={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.parquet" in err


def test_console_script_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "strategy=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "strategy=nope is unknown" in proc.stderr
