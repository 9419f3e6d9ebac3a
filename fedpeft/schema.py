"""Small predicates for parsing what crosses a trust boundary into typed settings.

Every typed record a task or a config carries (train settings, DP settings, the round task) is
parsed with these, so that NaN, inf, bools posing as numbers, unknown keys and missing keys are
refused the same way everywhere, with a ConfigError that names the key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from fedpeft.errors import ConfigError


def finite_number(value: object) -> bool:
    """A real number (not bool), finite: NaN and inf are refused wherever this is asked."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer_in(value: object, low: int, high: int) -> bool:
    """An int (not bool) with low <= value <= high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def mapping(raw: object, where: str) -> Mapping:
    """`raw` itself when it is a mapping, else a ConfigError naming `where`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object, got {type(raw).__name__}")
    return raw


def known_keys(
    raw: Mapping, where: str, known: Iterable[str], required: Iterable[str] = ()
) -> None:
    """Refuse keys outside `known` and missing `required` ones, naming them and the known set."""
    known = set(known)
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(unknown)}: its keys are "
            f"{', '.join(sorted(known))}"
        )
    missing = sorted(set(required) - set(raw))
    if missing:
        raise ConfigError(f"{where} has no {', '.join(missing)}: every one is required")


def check_fields(where: str, values: Mapping, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise a ConfigError for the first (key, ok, expected) whose check failed."""
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{where}.{key}={values.get(key)!r} must be {expected}")
