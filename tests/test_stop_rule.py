"""federation.stop_at.*: the rule alone, and its validation through the config."""

import math

import pytest

from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.stop_rule import Stop, StopAt

OFF = StopAt()


def test_all_off_by_default_in_the_config():
    stop_at = StopAt.from_config(compose_config([]))
    assert stop_at == OFF and not stop_at.enabled
    assert OFF.check(3, accuracy=1.0, total_bytes=1e12, max_epsilon=1e3) is None


@pytest.mark.parametrize(
    ("rule", "kwargs", "value"),
    [
        ("accuracy", {"accuracy": 0.9, "total_bytes": 0, "max_epsilon": None}, 0.9),
        ("bytes", {"accuracy": None, "total_bytes": 5_000_000, "max_epsilon": None}, 5e6),
        ("epsilon", {"accuracy": None, "total_bytes": 0, "max_epsilon": 3.5}, 3.5),
    ],
)
def test_each_rule_stops_when_its_value_reaches_the_limit(rule, kwargs, value):
    stop_at = StopAt(accuracy=0.9, bytes=5e6, epsilon=3.0)
    stop = stop_at.check(4, **kwargs)
    assert stop == Stop(rule, 4, value, getattr(stop_at, rule))
    assert stop.to_dict() == {"rule": rule, "round": 4, "value": value, "threshold": stop.threshold}


def test_below_every_limit_does_not_stop():
    stop_at = StopAt(accuracy=0.9, bytes=5e6, epsilon=3.0)
    assert stop_at.check(4, accuracy=0.89, total_bytes=4_999_999, max_epsilon=2.99) is None


def test_accuracy_counts_on_evaluated_rounds_only_and_round_zero_never_stops():
    stop_at = StopAt(accuracy=0.5)
    assert stop_at.check(2, accuracy=None, total_bytes=0, max_epsilon=None) is None
    assert stop_at.check(0, accuracy=0.99, total_bytes=0, max_epsilon=None) is None
    assert stop_at.check(1, accuracy=0.5, total_bytes=0, max_epsilon=None).rule == "accuracy"


def test_epsilon_rule_ignores_a_non_private_run():
    stop_at = StopAt(epsilon=1.0)
    assert stop_at.check(5, accuracy=0.1, total_bytes=10, max_epsilon=None) is None


def test_the_first_rule_met_is_reported():
    stop_at = StopAt(accuracy=0.5, bytes=10, epsilon=1.0)
    stop = stop_at.check(1, accuracy=0.6, total_bytes=20, max_epsilon=2.0)
    assert stop.rule == "accuracy"
    stop = stop_at.check(1, accuracy=0.4, total_bytes=20, max_epsilon=2.0)
    assert stop.rule == "bytes"


def test_parse_accepts_numbers_and_nulls():
    stop_at = StopAt.parse({"accuracy": 1, "bytes": 5e6, "epsilon": None})
    assert stop_at == StopAt(accuracy=1.0, bytes=5e6, epsilon=None) and stop_at.enabled


@pytest.mark.parametrize(
    ("rule", "value"),
    [
        ("accuracy", 0),
        ("accuracy", 1.5),
        ("accuracy", -0.2),
        ("bytes", 0),
        ("bytes", -1),
        ("bytes", math.inf),
        ("epsilon", math.nan),
        ("epsilon", True),
        ("epsilon", "3"),
    ],
)
def test_parse_refuses_bad_values_naming_the_key(rule, value):
    with pytest.raises(ConfigError, match=rf"federation\.stop_at\.{rule}=") as exc:
        StopAt.parse({rule: value})
    assert f"e.g. federation.stop_at.{rule}=" in str(exc.value)


def test_parse_refuses_an_unknown_rule():
    with pytest.raises(ConfigError, match="federation.stop_at.loss is not a stopping rule"):
        StopAt.parse({"loss": 0.1})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.stop_at.accuracy=1.2", "federation.stop_at.accuracy=1.2 must be in (0, 1]"),
        ("federation.stop_at.bytes=-5", "federation.stop_at.bytes=-5 must be a positive"),
        ("federation.stop_at.epsilon=inf", "federation.stop_at.epsilon=inf must be a positive"),
        ("federation.stop_at.epsilon=abc", "federation.stop_at.epsilon=abc must be a positive"),
    ],
)
def test_the_config_refuses_bad_limits(override, key):
    with pytest.raises(ConfigError) as exc:
        compose_config([override])
    assert key in str(exc.value) and "\n" not in str(exc.value)


def test_the_config_takes_good_limits():
    cfg = compose_config(["federation.stop_at.accuracy=0.8", "federation.stop_at.bytes=5e6"])
    assert StopAt.from_config(cfg) == StopAt(accuracy=0.8, bytes=5e6)
