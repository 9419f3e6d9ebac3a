"""What `pip install -e .` gives a user: every import declared, and no optional extra needed.

The suite runs with the test extras installed (bitsandbytes, lm-eval), so a module that imports one
of them unconditionally would pass every other test while the README's first command fails. These
tests hide the extras from the import system in a fresh interpreter, and check every third-party
import against pyproject's dependencies.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from fedpeft.extras import EXTRAS
from tests.conftest import FAST_RUN, REPO

PACKAGE = REPO / "fedpeft"


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """Distributions installed by `pip install -e .` (with extras of deps), and by our extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core: set[str] = set()
    for line in project["dependencies"]:
        req = Requirement(line)
        core.add(_dist_name(req.name))
        for extra in req.extras:  # flwr[simulation] brings ray
            for sub in importlib.metadata.requires(req.name) or []:
                sub_req = Requirement(sub)
                if sub_req.marker is not None and sub_req.marker.evaluate({"extra": extra}):
                    core.add(_dist_name(sub_req.name))
    optional = {
        _dist_name(Requirement(line).name)
        for name, lines in project["optional-dependencies"].items()
        if name != "test"
        for line in lines
    }
    return core, optional


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for each absolute import in a file."""
    tree = ast.parse(path.read_text())
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(n.split(".")[0], id(node) not in in_function) for n in names]
    return found


def test_every_third_party_import_is_a_declared_dependency():
    core, optional = _declared()
    owners = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, top_level in _imports(path):
            if module in sys.stdlib_module_names or module == "fedpeft" or module == "__future__":
                continue
            dists = {_dist_name(d) for d in owners.get(module, [])}
            where = path.relative_to(REPO)
            if dists & core:
                continue
            if dists & optional and not top_level:
                assert module in EXTRAS, f"{where}: {module} is an extra missing from EXTRAS"
                continue
            problems.append(
                f"{where}: {module} ({', '.join(sorted(dists)) or 'not installed'}) is "
                + (
                    "an optional extra imported at module level"
                    if dists & optional
                    else "not in [project.dependencies]"
                )
            )
    assert not problems, "\n".join(problems)


#: Runs in a fresh interpreter with every optional extra hidden: `sys.modules[name] = None` makes
#: `import name` raise ModuleNotFoundError and importlib.util.find_spec(name) return None, exactly
#: as when the package is not installed.
WITHOUT_EXTRAS = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    HIDDEN = {hidden}
    for name in HIDDEN:
        sys.modules[name] = None

    import fedpeft
    modules = [m.name for m in pkgutil.walk_packages(fedpeft.__path__, "fedpeft.")]
    for name in modules:
        importlib.import_module(name)

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from fedpeft.clients.client_app import train
    from fedpeft.config import compose_config
    from fedpeft.errors import ConfigError
    from fedpeft.federation import build_task

    task = build_task(compose_config({fast_run}), 2, ["negative", "positive"])
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(
        RecordDict({{"arrays": ArrayRecord(),
                    "config": ConfigRecord({{"task": json.dumps(task), "server-round": 1}})}}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    node = {{"partition-id": 0, "num-partitions": 2, "state-dir": {state_dir!r}}}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={{}})
    reply = train(msg, context)
    metrics = dict(reply.content.metric_records["metrics"])
    factors = len(reply.content.array_records["arrays"])

    errors = {{}}
    try:
        compose_config(["model=tiny_llama", "dataset=gsm8k", "model.quantization=4bit"])
    except ConfigError as exc:
        errors["quant"] = str(exc)
    from fedpeft.cli import main
    errors["evaluate_exit"] = main(["evaluate", {state_dir!r}, "tasks=gsm8k"])
    print(json.dumps({{
        "modules": len(modules),
        "metrics": metrics,
        "factors": factors,
        "errors": errors,
        "still_hidden": [n for n in HIDDEN if sys.modules.get(n) is not None],
    }}))
    """
)


def test_the_package_imports_and_trains_a_round_without_the_optional_extras(tmp_path, data_dir):
    script = WITHOUT_EXTRAS.format(
        hidden=sorted(EXTRAS), fast_run=FAST_RUN, state_dir=str(tmp_path)
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] >= 60 and result["still_hidden"] == []
    assert result["factors"] > 0 and result["metrics"]["num-examples"] == 200
    assert 'pip install -e ".[quant]"' in result["errors"]["quant"]
    assert "\n" not in result["errors"]["quant"]
    # `fedpeft evaluate` without lm-eval: one line naming the extra, exit 2
    assert result["errors"]["evaluate_exit"] == 2
    assert "fedpeft evaluate (lm-evaluation-harness) needs lm-eval" in proc.stderr
    assert 'pip install -e ".[eval]"' in proc.stderr
