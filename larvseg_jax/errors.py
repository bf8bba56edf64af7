"""Errors that are the user's to fix (config, paths, data, checkpoints).

`main.py` prints these as one line naming the file or key and what to do; any other exception is
a bug and keeps its traceback. Each also derives from the builtin a caller would expect
(ValueError, FileNotFoundError, ...), so library users can catch them the usual way.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config value that is unknown, out of range or inconsistent with another."""


class DataError(UserError, ValueError):
    """A dataset on disk that cannot be used as it is (bad labels, too few examples, ...)."""


class MissingError(UserError, FileNotFoundError):
    """A file, dataset or checkpoint that is not where the config or flags say."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the current config's train state."""


class WorkdirError(UserError, PermissionError):
    """A workdir that cannot be written."""


class NonFiniteError(UserError, FloatingPointError):
    """Training diverged (NaN/Inf loss); the message names the steps."""
