"""Errors that name the bad input and its fix; the CLI prints them as one line and exits 2."""


class FedPeftError(Exception):
    """Base class for fedpeft's user-facing errors."""


class ConfigError(FedPeftError, ValueError):
    """A config value is invalid: the message names the field, the allowed values or the fix."""


class DataError(FedPeftError, ValueError):
    """A data source is missing, unreadable or malformed: the message names the file and the fix."""


class ModelError(FedPeftError, ValueError):
    """A model cannot be found or loaded: the message names what to install or set."""


class RunFailed(FedPeftError):
    """A federation ran but produced nothing: every reply of every round failed (CLI exit 1)."""
