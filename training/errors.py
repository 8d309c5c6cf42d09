"""The project's error types for user mistakes, and the one rule for reporting them.

A `UserError` is a mistake the user can fix (an unknown language, a run directory holding another
config, a CLT trained on other weights, a corrupt store shard, a prompt longer than the context...).
Scripts run their `main` through `cli.run`, which prints such an error as one line saying what to fix
and exits with code 2; `--debug` shows the traceback. Anything else is a bug and keeps its traceback.

`UserError` derives from ValueError so that library callers catching ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the input or the invocation; the message says how to fix it."""


class ConfigMismatch(UserError):
    """A run directory holds a run with another config."""


class ModelMismatch(UserError):
    """A CLT, store or located-units file was made from other model weights."""


class UnknownLanguage(UserError):
    """A language the corpus (or a file) has no data for."""


class CorruptData(UserError):
    """A stored artifact (activation shard, graph, checkpoint) cannot be read back."""
