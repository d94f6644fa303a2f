"""The one exception type for user mistakes.

Anything the user can fix (a bad recipe key, a missing file, a malformed data row)
raises :class:`UserError`. The CLI prints its message as one paragraph and exits
non-zero without a traceback; everything else is a bug and keeps its traceback.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in user input: config, data, paths. The message says what, where and how to fix."""
