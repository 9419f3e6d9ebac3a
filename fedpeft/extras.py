"""Optional extras (pyproject's `[project.optional-dependencies]`): checked where a feature runs.

The README's install (`pip install -e .`) has none of them, so no module imports them at import
time; a feature that needs one calls `require` first and gets a one-line error naming the extra.
"""

from __future__ import annotations

import importlib.util

from fedpeft.errors import ConfigError

#: importable module -> (its distribution on PyPI, the fedpeft extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "bitsandbytes": ("bitsandbytes", "quant"),
    "lm_eval": ("lm-eval", "eval"),
    "tensorboard": ("tensorboard", "track"),
    "mlflow": ("mlflow-skinny", "track"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> None:
    """Refuse `feature` with the install line of its extra when `module` is not installed."""
    if installed(module):
        return
    package, extra = EXTRAS[module]
    raise ConfigError(
        f'{feature} needs {package}, which is not installed: pip install -e ".[{extra}]" '
        f"from a checkout (or pip install 'fedpeft[{extra}]')"
    )
