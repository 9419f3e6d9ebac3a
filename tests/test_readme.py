"""README's tables of methods and of what composes with what are the registry's facts."""

import re

import pytest
import yaml

from fedpeft.config import CONFIG_DIR
from fedpeft.strategies import STRATEGIES
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _table(header: str) -> dict[str, list[str]]:
    """Rows of the Markdown table whose header line starts with `header`, keyed by method."""
    lines = README[README.index(header) :].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _names(cell: str) -> set[str]:
    return set(re.findall(r"`(\w+)`", cell))


def _params(name: str) -> set[str]:
    config = yaml.safe_load((CONFIG_DIR / "strategy" / f"{name}.yaml").read_text())
    strategy = config.get("strategy", config)  # a method with run-wide defaults: package _global_
    return set(strategy.get("params") or {})


METHODS = _table("| `strategy=` | method |")
COMPOSES = _table("| `strategy=` | ranks |")


def test_both_tables_list_every_registered_method_once():
    assert list(METHODS) == list(COMPOSES) and set(METHODS) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_methods_row_gives_its_adapter_kind_and_options(name):
    _method, _paper, kinds, params = METHODS[name]
    assert STRATEGIES[name].kind in _names(kinds)
    assert _names(params) == _params(name) and (params == "none") == (not _params(name))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_methods_composability_is_what_its_class_and_config_say(name):
    ranks, fedprox, scaffold, server_opt, client_level = COMPOSES[name]
    cls, has_ranks = STRATEGIES[name], "ranks" in _params(name)
    assert ranks == ("yes" if has_ranks else "refused")
    assert fedprox == "yes"  # client-side: every method's clients can add the proximal term
    plain = cls.drift_refusal("scaffold", {}) is None
    with_ranks = has_ranks and cls.drift_refusal("scaffold", {"ranks": [4, 8]}) is None
    expected = (
        "refused"
        if not plain
        else "yes"
        if with_ranks or not has_ranks
        else ("yes (refused with ranks)")
    )
    assert scaffold == expected
    assert server_opt == ("yes" if cls.drift_refusal("server_opt", {}) is None else "refused")
    dp_plain = cls.client_dp_refusal({}) is None
    dp_ranks = has_ranks and cls.client_dp_refusal({"ranks": [4, 8]}) is None
    assert client_level == (
        "refused"
        if not dp_plain
        else "yes"
        if dp_ranks or not has_ranks
        else "yes (refused with ranks)"
    )


def test_the_quickstart_is_exactly_two_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert quickstart.count("```bash\n") == 2
