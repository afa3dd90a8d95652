"""Errors that are the user's to fix.

Anything raised as :class:`GradlensError` is reported by the CLI as one
sentence and a non-zero exit code; every other exception is a bug in gradlens
and keeps its traceback.
"""


class GradlensError(Exception):
    """A mistake in the user's input (a file, a flag, a format), stated in one sentence."""


class InputFileError(GradlensError):
    """A file the user named is missing, unreadable or malformed."""


class InvalidDetectionsError(GradlensError):
    """A detection results file breaks the COCO results format or its values are out of range."""


class CheckpointError(InputFileError):
    """A checkpoint that cannot be read, trusted or fitted to an architecture."""


class OutputError(GradlensError):
    """An output cannot be written (no space, no permission); it names the user's file, never a temporary one."""
