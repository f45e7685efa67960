"""The errors robust-transfer raises for what it is given, under one base class.

Everything under :class:`RobustTransferError` is a problem with the input (a config, a
checkpoint, a data set, a tensor, a results folder), stated in one line that says what
to change; the command line prints it and exits with code 2. Any other exception is a
bug and keeps its traceback. Each class also derives from the built-in exception it
refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class RobustTransferError(Exception):
    """Base of every error about what robust-transfer was given."""

    # The command line's exit status for it (argparse's, for a usage error, is also 2).
    exit_code = 2


class InputError(RobustTransferError, ValueError):
    """A value that cannot be used: wrong shape, NaN, out of [0, 1], unknown name."""


class InputTypeError(RobustTransferError, TypeError):
    """An argument of the wrong type."""


class MissingFileError(RobustTransferError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class ConfigError(InputError):
    """A study configuration that cannot be run; the message names the key."""


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupted, half-written or of the wrong architecture."""


class DataError(InputError):
    """A data set that cannot be read or used."""


class ResultsFormatError(InputError):
    """Results written by another version of the results format."""


class SoundnessError(RuntimeError):
    """A certificate that an attack proved wrong: a certified shift below an attacked
    one, or a point certified robust that an attack broke. Never the user's input but a
    bug in a certifier, so it is not a :class:`RobustTransferError`: it keeps its
    traceback and the run stops."""
