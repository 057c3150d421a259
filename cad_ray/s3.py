"""The S3 filesystem that run roots and model folders on `s3://` are read and written through."""

from __future__ import annotations

import os

from cad_ray.errors import CadRayError, described


def endpoint_setting() -> tuple[str, str] | None:
    """(variable, value) of the environment variable that names the S3 endpoint, None where none does."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return name, os.environ[name]
    return None


def s3_filesystem():
    """An s3fs filesystem configured from the environment / standard AWS config only.

    `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points at a non-AWS endpoint such as MinIO or moto.
    """
    import s3fs  # here, not at the top: only a command that touches s3:// pays for importing it

    endpoint = endpoint_setting()
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint[1]} if endpoint else {})


def connected_s3_filesystem(uri: str):
    """`s3_filesystem()` with its client made (no request is sent): what the environment gets wrong before any
    request (a malformed endpoint URL, an unknown AWS profile) is one line naming `uri`, not a traceback from
    the first read."""
    fs = s3_filesystem()
    try:
        fs.connect()
    except Exception as e:  # botocore raises ValueError for an endpoint, its own types for the rest
        endpoint = endpoint_setting()
        hint = f" ({endpoint[0]}={endpoint[1]!r} must be an endpoint URL such as http://host:9000)" \
            if endpoint and isinstance(e, ValueError) else ""
        raise CadRayError(f"cannot read {uri}: {described(e)}{hint}") from None
    return fs
