"""Errors that mean "the user asked for something impossible".

Every layer raises these for bad input; the CLI turns them into one clear message
and exit code 2. Anything else escaping is a bug.
"""

from __future__ import annotations


class TdlightError(ValueError):
    """Bad user input: the message names the value and what would be valid."""


class SpecError(TdlightError):
    """An impossible compression spec (ranks, bank size, layout, variant...)."""


class TeacherError(TdlightError):
    """A teacher that cannot be loaded or is not BERT-shaped."""


class ArtifactError(TdlightError):
    """A missing, corrupt or incompatible saved artifact."""


class DataError(TdlightError):
    """Unknown task, missing or malformed data file (the message names file and line)."""


class RunError(TdlightError):
    """A run directory that cannot be used: nothing to resume, wrong stage, missing artifact."""
