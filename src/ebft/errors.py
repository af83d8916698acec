"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2 (128 + the signal,
130 for SIGINT and 143 for SIGTERM, for an interrupted run)."""

import signal


class EbftError(Exception):
    """An error caused by the user's config or data, reported as one clear message."""


class ConfigError(EbftError):
    """The configuration is invalid: unknown key, wrong type, impossible combination."""


class DataError(EbftError):
    """A dataset cannot be loaded or yields no usable rows."""


class CheckpointError(EbftError):
    """A checkpoint cannot be resumed: a file is missing, damaged, not plain data, or does not fit this run."""


class TrainingInterrupted(EbftError):
    """The run was stopped by a signal after saving what it could; the message says how to go on.
    ``signum``: the signal (the command exits with 128 + it)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class PolicySyncError(EbftError):
    """The rollout server could not be given the policy's current weights; training must not go on
    sampling from it (the trainer saves the current state and stops)."""
