"""The two kinds of error retain raises on purpose; the CLI prints them as one line and exits 2."""


class RetainError(Exception):
    """Bad input: a message that names the problem and the fix. CLI exit code 2."""

    exit_code = 2


class ConfigError(RetainError, ValueError):
    """An invalid benchmark, method, mode, parameter or value."""


class DataError(RetainError):
    """Missing, corrupt or inconsistent data files."""
