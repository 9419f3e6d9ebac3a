"""`fedpeft node` checks its settings before it starts anything, and hands Flower what it means."""

import pytest
from flwr.common.config import parse_config_args

from fedpeft.cli import main
from fedpeft.errors import ConfigError
from fedpeft.node import command


def _args(*argv: str):
    parser = command.argparse.ArgumentParser()
    command.add_subcommand(parser.add_subparsers(dest="command"))
    return parser.parse_args(["node", "--superlink", "127.0.0.1:9092", "--insecure", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partition-id", "0", "--num-partitions", "2", "--dp-required"],
         "dp-required=true without dp-epsilon sets no limit"),
        (["--data", "/nonexistent/file.csv"], "--data /nonexistent/file.csv is not a file"),
        ([], "a node needs data"),
        (["--partition-id", "0", "--num-partitions", "2", "--node-config", "max-rank=0"],
         "max-rank=0 must be an integer >= 1"),
        (["--partition-id", "0", "--num-partitions", "2", "--dp-accountant", "gdp"],
         "dp-accountant='gdp' is unknown"),
        (["--partition-id", "0", "--num-partitions", "2", "--secagg-min-threshold", "1"],
         "secagg-min-threshold=1 must be an integer >= 2"),
    ],
)  # fmt: skip
def test_bad_node_settings_are_one_line_and_exit_2_before_anything_starts(argv, message, capsys):
    assert main(["node", "--superlink", "127.0.0.1:9092", "--insecure", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_node_config_reaches_flower_unchanged_and_the_supernode_starts_no_clientapp(
    tmp_path,
):
    data = tmp_path / "my data.csv"
    data.write_text("text,label\na,b\n")
    state = tmp_path / 'it\'s "state"'
    args = _args("--data", str(data), "--state-dir", str(tmp_path / "st ate"), "--dp-epsilon", "3",
                 "--secagg-required", "--secagg-min-threshold", "3",
                 "--node-config", 'max-batch-size=64 device="cpu"')  # fmt: skip
    config = command.node_config(args)
    assert parse_config_args([command.render_node_config(config)]) == config
    assert config["dp-epsilon"] == 3.0 and config["max-batch-size"] == 64
    assert config["secagg-required"] is True and config["secagg-min-threshold"] == 3
    assert config["data-path"] == str(data.resolve()) and config["device"] == "cpu"
    with pytest.raises(ConfigError, match="holds both kinds of quote"):
        command.render_node_config({"state-dir": str(state)})
    supernode, superexec = command.commands(args, config)
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert superexec[1:3] == ["-m", "fedpeft.node.superexec"]
