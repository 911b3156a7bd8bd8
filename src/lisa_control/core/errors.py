"""The project's error types. The CLI turns any of them into one line and a non-zero exit code.

Each message names the problem and the fix; a raw traceback is reserved for our own bugs.
"""


class LisaError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(LisaError, ValueError):
    """A flag, config key or argument has a value that cannot work."""


class DataError(LisaError, ValueError):
    """A dataset, image or caption cannot be used as given."""


class ModelError(LisaError, ValueError):
    """A model path, architecture or pairing of main and side network does not fit."""


class CheckpointError(LisaError, RuntimeError):
    """A checkpoint is missing, incomplete, unsafe or from another configuration."""


class NonFiniteLossError(LisaError, FloatingPointError):
    """Training produced a NaN or Inf; the last good checkpoint is left intact."""
