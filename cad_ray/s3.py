"""The S3 filesystem that run roots and model folders on `s3://` are read and written through."""

from __future__ import annotations

import os


def s3_filesystem():
    """An s3fs filesystem configured from the environment / standard AWS config only.

    `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points at a non-AWS endpoint such as MinIO or moto.
    """
    import s3fs  # here, not at the top: only a command that touches s3:// pays for importing it

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})
