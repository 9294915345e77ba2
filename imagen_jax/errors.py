"""Errors a user can cause and fix: the command-line tools print their message alone, without a traceback.

Each class also derives from the built-in exception a caller would expect (ValueError, FileNotFoundError,
RuntimeError), so library users can catch either. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value or override that cannot work."""


class DataError(UserError, ValueError):
    """Training data that cannot be read as given (file and line named)."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No (finished) checkpoint where one is needed."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: damaged, unreadable, or of another architecture."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint whose files cannot be read or whose contents differ from what was saved."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"checkpoint {path} is damaged: {cause}")
        self.path = path
        self.cause = cause


class NonFiniteError(UserError, RuntimeError):
    """Training diverged: a loss or the state to be saved is NaN/inf."""


class UsageError(UserError, ValueError):
    """A command-line argument that cannot work (no prompts, --num < 1): the tools exit with status 2."""


class InputFileNotFoundError(UserError, FileNotFoundError):
    """A file named on the command line or in the config (prompts file, config file) does not exist."""
