"""The errors retain raises on purpose; the CLI prints each as one line and exits with its ``exit_code``
(2: bad input; 1: a fault such as a full disk, a locked store, a diverged run)."""


class RetainError(Exception):
    """Bad input: a message that names the problem and the fix. CLI exit code 2."""

    exit_code = 2


class ConfigError(RetainError, ValueError):
    """An invalid benchmark, method, mode, parameter or value."""


class DataError(RetainError):
    """Missing, corrupt or inconsistent data files."""


class OutputError(RetainError):
    """An output file could not be written (disk full, file-size limit): a fault, exit code 1. The previous
    version of the file, if any, is kept."""

    exit_code = 1
