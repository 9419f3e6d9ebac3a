"""Flower's SuperExec for a fedpeft node: every task it launches runs `fedpeft-clientapp`.

flwr 1.39's SuperExec starts the process for each task by the command name in
`flwr.supercore.constant.TASK_TYPE_TO_COMMAND` (`flwr-clientapp` for a node's messages). This
module points every entry at fedpeft's runner (node/runner.py), found beside this interpreter,
then runs Flower's own SuperExec with the arguments it was given: its polling, launching and
shutdown stay Flower's, and no task type can start a program that imports bundle code.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from flwr.supercore import constant

RUNNER = "fedpeft-clientapp"


def runner_path() -> str:
    """The `fedpeft-clientapp` script of this environment (beside the interpreter, else PATH)."""
    beside = Path(sys.executable).parent / RUNNER
    if beside.is_file():
        return str(beside)
    found = shutil.which(RUNNER)
    if found is None:
        raise SystemExit(f"{RUNNER} is not installed beside {sys.executable}: reinstall fedpeft")
    return found


def main() -> None:
    """`python -m fedpeft.node.superexec <flower-superexec arguments>`."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    runner = runner_path()
    for task_type in list(constant.TASK_TYPE_TO_COMMAND):
        constant.TASK_TYPE_TO_COMMAND[task_type] = runner
    flower_superexec()


if __name__ == "__main__":
    main()
