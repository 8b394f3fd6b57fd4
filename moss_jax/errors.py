"""The error a user can fix, shared by every layer (no dependencies, so anything may import it).

Commands print a `UserError` as one line (`error: ...`) and exit with status 2 instead of a
traceback: a wrong flag, a missing file or a run directory that does not hold a run are the
user's to fix, and a traceback would bury the one sentence that says how.
"""

from __future__ import annotations


class UserError(Exception):
  """A mistake in the inputs of a command (flags, config, files); its message says what to do."""
