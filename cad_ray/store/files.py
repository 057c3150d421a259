"""Where a run root's files are and how one is written whole: the filesystem of a local path or an s3:// URI, and
hidden temporary names that become the file only when it is complete."""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from pathlib import PurePosixPath

from cad_ray.errors import CadRayError
from cad_ray.s3 import connected_s3_filesystem

SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # what a URL starts with: s3:, gs:, http:, file:


def filesystem(root: str):
    """(fsspec filesystem, path without protocol) for a local path or an s3:// URI."""
    if str(root).startswith("s3://"):
        bucket = str(root)[len("s3://"):].split("/")[0]
        if not bucket:
            raise CadRayError(f"{root!r} names no bucket; an S3 root is s3://bucket/prefix")
        if not re.fullmatch(r"[a-zA-Z0-9.\-_]{1,255}", bucket):  # botocore's own check, made before any request
            raise CadRayError(f"{bucket!r} is not a valid S3 bucket name (letters, digits, '.', '-', '_')")

        return connected_s3_filesystem(str(root)), str(root)[len("s3://"):].rstrip("/")
    check_local(str(root))
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(str(root)))


def check_local(root: str) -> None:
    """Refuse a root that is not s3://bucket/... but starts like a URL (S3://, s3:/, s3a://, gs://, http://), which
    would otherwise become a local folder named after the scheme ('./S3:/bucket/run'). A local folder whose name
    has a colon is written ./NAME (or lies deeper: runs/a:b)."""
    scheme = SCHEME.match(root)
    if scheme is None:
        return
    rest = root[scheme.end():].lstrip("/")
    if scheme.group(1).lower() in ("s3", "s3a", "s3n") and rest:
        hint = f"; did you mean s3://{rest}?"
    elif "//" not in root:
        hint = f" (a local folder named so is written ./{root})"
    else:
        hint = ""
    raise CadRayError(f"{root!r} is not a root cad-ray can use: only local paths and s3://bucket/path are "
                      f"supported{hint}")


def hidden_temporary(target: str) -> str:
    """A temporary name beside `target` that starts with a dot, so that Parquet dataset readers (which skip
    names starting with '.' or '_') never pick up a file left half-written by a crash."""
    path = PurePosixPath(target)
    return str(path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}"))


@contextmanager
def atomic_local_file(target: str):
    """A temporary path to write; renamed onto the local `target` only when the block ends without error."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = hidden_temporary(target)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
