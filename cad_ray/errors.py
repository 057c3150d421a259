"""User-facing errors.

A `CadRayError` is a mistake the user can fix (bad path, unknown word, malformed config). The CLI prints
its message on one line and exits non-zero instead of showing a traceback.
"""


class CadRayError(Exception):
    """An error caused by user input; its message says what to fix."""


def described(error: BaseException) -> str:
    """`Type: message` on one line: a library's error (botocore's, an OSError) inside a CadRayError's message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
