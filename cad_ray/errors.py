"""User-facing errors.

A `CadRayError` is a mistake the user can fix (bad path, unknown word, malformed config). The CLI prints
its message on one line and exits non-zero instead of showing a traceback.
"""


class CadRayError(Exception):
    """An error caused by user input; its message says what to fix."""
