"""The layers of docs/design.md hold: import-linter checks pyproject's contracts on every run."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    command = [str(lint)] if lint.exists() else [shutil.which("lint-imports") or "lint-imports"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "Contracts: 4 kept" in proc.stdout
