"""The run root: one place for paths (local or s3://), atomic writes, the part-file footer check and the
manifest. Where files are and how one is written whole is `files`'s; the root's lock is `lock`'s."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Iterable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from cad_ray.errors import CadRayError, described
from cad_ray.store.files import atomic_local_file, filesystem, hidden_temporary
from cad_ray.store.lock import LOCK, RootLock

ROW_GROUP_SIZE = 1 << 22  # 4M rows: few row groups even at SD scale (148.7M components), bounded memory
METADATA_KEY = b"cad_ray"
PART_FILE = "part-0.parquet"  # the one file of a table (or of a table's partition): <table>/[<partition>/]PART_FILE
RUN_KEYS = ("fingerprint", "config_hash")  # what makes a part file the run's: its model and its config


def is_damage(error: Exception) -> bool:
    """Whether a read error is a decode error that says the file is damaged (truncated, garbled, not Parquet, not
    JSON), as opposed to an error of access (permissions, the network) that says nothing about the file and must
    not read as "not done". Any other error (a KeyError, a TypeError) is a bug, raised: never "recompute"."""
    if isinstance(error, (PermissionError, ConnectionError, TimeoutError)):
        return False
    # pyarrow's own errors while decoding (ArrowInvalid: no Parquet magic; OSError: a corrupt page or checksum)
    return isinstance(error, (pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError, OSError))


class Footer(NamedTuple):
    metadata: dict
    rows: int


def belongs(footer: Footer, owner: dict, keys: tuple[str, ...] = RUN_KEYS, rows: int | None = None) -> bool:
    """Whether a part file's footer carries `owner`'s `keys` (the same values in its metadata) and, where given,
    `rows` rows: written for this run (model, config, options), not another's."""
    return all(footer.metadata.get(k) == owner[k] for k in keys) and (rows is None or footer.rows == rows)


MANIFEST_KEYS = ("config", "config_hash", "fingerprint")  # what every reader of a run's _manifest.json needs
# the type of each field of a run's _manifest.json that the code reads (where present): a mapping, a string, a bool
MANIFEST_TYPES = {"config": dict, "config_hash": str, "fingerprint": str, "complete": bool, "stage_options": dict,
                  "objective_values": dict}
JSON_KINDS = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false", int: "a number",
              float: "a number", type(None): "null"}


def wrong_types(manifest: dict, types: dict[str, type]) -> list[str]:
    """What is wrong with the types of a manifest's fields ("its 'config' is a list, not a mapping")."""
    return [f"its {key!r} is {JSON_KINDS.get(type(manifest[key]), type(manifest[key]).__name__)}, not "
            f"{JSON_KINDS[kind]}" for key, kind in types.items() if key in manifest and type(manifest[key]) is not kind]


ROOT_MARKERS = ("_manifest.json", LOCK)  # a folder holding either is a run root (the lock: one being started)


def run_root_above(path: str) -> str | None:
    """The local run root that `path` lies in (or is), None if it lies in none."""
    here = os.path.realpath(os.path.expanduser(str(path)))
    while True:
        if os.path.isdir(here) and any(os.path.exists(os.path.join(here, m)) for m in ROOT_MARKERS):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def check_output(out: str, folder: bool = False, allowed: tuple[str, ...] = (), option: str = "--out") -> None:
    """Refuse, before any work, a local output that would land in a run root (its manifest, part files, tables:
    no command writes into a run root except its own tables; `allowed` names the exceptions, such as the root's
    own report.html), a file where a folder is asked for and a folder where a file is, and a place that cannot
    be written (a probe file is created and removed beside it)."""
    path = os.path.realpath(os.path.expanduser(str(out)))
    root = run_root_above(path)
    if root is not None and path not in {os.path.realpath(a) for a in allowed}:
        raise CadRayError(f"{option} {out} lies inside the run root {root}; a run root holds only its own tables: "
                          "choose a place outside it")
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise CadRayError(f"{out} is a file; {option} names a new folder")
        if os.path.isdir(path) and os.listdir(path):
            raise CadRayError(f"{out} exists and is not empty; {option} names a new folder")
        return
    if os.path.isdir(path):
        raise CadRayError(f"{out} is a folder; {option} names a file")
    parent = os.path.dirname(path)
    probe = hidden_temporary(path)
    try:
        os.makedirs(parent, exist_ok=True)
        open(probe, "xb").close()
        os.unlink(probe)
    except OSError as e:
        raise CadRayError(f"cannot write {out}: {e.strerror or e}") from None


class RunRoot(RootLock):
    """Reading and writing the files of one run root (and holding its lock: `RootLock`)."""

    def __init__(self, root: str):
        self.fs, self.path = filesystem(str(root))  # before the slashes go: "s3://" is no local folder "s3:"
        self.uri = str(root).rstrip("/")
        self.is_s3 = self.uri.startswith("s3://")

    def join(self, *parts: str) -> str:
        """A path under the root, for this root's filesystem (`self.fs`)."""
        return str(PurePosixPath(self.path, *parts))

    def uri_under(self, *parts: str) -> str:
        """A path under the root as a URI (s3:// kept): a root or a model location in its own right."""
        return "/".join([self.uri, *parts])

    @contextmanager
    def _reading(self, *parts: str):
        """An error of access while reading `parts` (a permission refused, a lost connection) as one line naming
        it; FileNotFoundError passes (callers read it as "absent")."""
        try:
            yield
        except (PermissionError, ConnectionError, TimeoutError) as e:
            raise CadRayError(f"cannot read {self.uri_under(*parts)}: {described(e)}") from None

    def exists(self, *parts: str) -> bool:
        with self._reading(*parts):
            return self.fs.exists(self.join(*parts))

    def check_writable(self) -> None:
        """Fail early, before any compute, if the root cannot be written."""
        probe = self.join(f"._write_probe-{uuid.uuid4().hex}")
        try:
            if self.is_s3:
                bucket = self.path.split("/")[0]
                try:
                    self.fs.info(bucket)  # raises what went wrong (exists() says False for no credentials too)
                except FileNotFoundError:
                    raise CadRayError(f"cannot write to {self.uri}: bucket {bucket!r} does not exist") from None
            else:
                self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except CadRayError:
            raise
        except Exception as e:
            raise CadRayError(f"cannot write to {self.uri}: {type(e).__name__}: {e}") from None

    @contextmanager
    def _written(self, *parts: str):
        """A local temporary path to write; it becomes the file `parts` only when complete: renamed (local) or
        uploaded in one request (S3), so a crash never leaves a half-written file that looks whole."""
        target = self.join(*parts)
        if not self.is_s3:
            with atomic_local_file(target) as tmp:
                yield tmp
            return
        handle, tmp = tempfile.mkstemp(suffix=PurePosixPath(target).suffix)
        os.close(handle)
        try:
            yield tmp
            self.fs.put_file(tmp, target)
        finally:
            os.unlink(tmp)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self._written(*parts) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)

    def read_bytes(self, *parts: str) -> bytes:
        with self._reading(*parts):
            return self.fs.cat_file(self.join(*parts))

    def write_table(self, table: pa.Table, *parts: str, metadata: dict | None = None,
                    byte_stream_split: tuple[str, ...] = ()) -> None:
        self.write_parts(table.schema, [table], *parts, metadata=metadata, byte_stream_split=byte_stream_split)

    def write_parts(self, schema: pa.Schema, tables: Iterable[pa.Table], *parts: str,
                    metadata: dict | None = None, row_group_size: int = ROW_GROUP_SIZE,
                    byte_stream_split: tuple[str, ...] = ()) -> None:
        """Stream tables into one Parquet file (zstd, large row groups unless `row_group_size` says otherwise) that
        appears only when complete. `byte_stream_split`: float columns stored byte plane by byte plane (Parquet's
        BYTE_STREAM_SPLIT), which zstd compresses better where the low bytes of the values carry little (a
        float64 partial sum of float32 gradients; docs/benchmarks.md)."""
        if metadata is not None:
            schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        # page checksums: a reader that decodes only some columns (ScoreStore.top reads the score column and a few
        # rows) still finds damage in what it reads, instead of taking zeroed bytes for values
        options = {"compression": "zstd", "write_page_checksum": True}
        if "tensor" in schema.names:
            options["use_dictionary"] = ["tensor"]
        if "index" in schema.names:
            options["column_encoding"] = {"index": "DELTA_BINARY_PACKED"}
        if byte_stream_split:
            options["use_dictionary"] = [c for c in options.get("use_dictionary", schema.names)
                                         if c not in byte_stream_split]
            options["column_encoding"] = {**options.get("column_encoding", {}),
                                          **{c: "BYTE_STREAM_SPLIT" for c in byte_stream_split}}
        with self._written(*parts) as tmp:
            with pq.ParquetWriter(tmp, schema, **options) as writer:
                for table in tables:
                    writer.write_table(table.cast(schema), row_group_size=row_group_size)

    def read_table(self, *parts: str) -> pa.Table:
        with self.fs.open(self.join(*parts), "rb") as f:
            return pq.read_table(f, page_checksum_verification=True)

    def footer(self, *parts: str) -> Footer | None:
        """The cad_ray metadata and row count of a part file; None when it is absent or damaged (truncated, not
        Parquet, without our metadata). Any other error (a permission error on S3, a lost connection) is raised:
        it says nothing about whether the file is done."""
        path = self.join(*parts)
        try:
            with self.fs.open(path, "rb") as f:
                footer = pq.read_metadata(f)
            ours = (footer.metadata or {}).get(METADATA_KEY)
            metadata = json.loads(ours) if ours is not None else None
        except FileNotFoundError:
            return None
        except Exception as e:
            if is_damage(e):
                return None
            raise CadRayError(f"cannot read {self.uri_under(*parts)}: {type(e).__name__}: {e}") from None
        if not isinstance(metadata, dict):
            return None  # Parquet, but not a cad-ray table: without our metadata
        return Footer(metadata, footer.num_rows)

    def ours(self, *parts: str, owner: dict, keys: tuple[str, ...] = RUN_KEYS, rows: int | None = None,
             decoded: bool = False) -> Footer | None:
        """The footer of a part file that is `owner`'s (a run's manifest, a stage's): whole, with the same `keys`
        in its metadata as `owner`, `rows` rows where given, and with `decoded` every page read back
        (`readable`); None for a file that is absent, damaged or another's, which is to be made again."""
        footer = self.footer(*parts)
        if footer is None or not belongs(footer, owner, keys, rows):
            return None
        return footer if not decoded or self.readable(*parts) else None

    def readable(self, *parts: str) -> bool:
        """Whether every page of a Parquet file decodes (a garbled middle leaves the footer whole): one streaming
        read, row group by row group."""
        try:
            with self.fs.open(self.join(*parts), "rb") as f:
                reader = pq.ParquetFile(f, page_checksum_verification=True)
                for group in range(reader.num_row_groups):
                    reader.read_row_group(group)
            return True
        except Exception as e:
            if is_damage(e):
                return False
            raise CadRayError(f"cannot read {self.uri_under(*parts)}: {type(e).__name__}: {e}") from None

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.join(*parts), recursive=True)

    def remove_if_empty(self, *parts: str) -> None:
        """Remove a local folder that holds nothing (left behind by `remove` of its last entry); on S3 a prefix
        without objects is no folder, so there is nothing to remove."""
        if self.is_s3:
            return
        try:
            os.rmdir(self.join(*parts))
        except OSError:
            pass  # absent, or not empty: both mean there is nothing to do

    # --- manifest -------------------------------------------------------------------------------------
    def read_manifest(self, *parts: str) -> dict | None:
        """A JSON file of the root (default: the run's `_manifest.json`), None if absent."""
        parts = parts or ("_manifest.json",)
        if not self.exists(*parts):
            return None
        try:
            manifest = json.loads(self.read_bytes(*parts))
        except ValueError as e:
            raise CadRayError(f"{self.uri_under(*parts)} is corrupt: {e}") from None
        run_manifest = parts == ("_manifest.json",)
        needed = MANIFEST_KEYS if run_manifest else ()
        if not isinstance(manifest, dict) or any(k not in manifest for k in needed):
            what = f"lacks {', '.join(k for k in needed if k not in manifest)}" if isinstance(manifest, dict) else \
                f"holds a {type(manifest).__name__}, not a mapping"
            raise CadRayError(f"{self.uri_under(*parts)} is corrupt: it {what}; was it edited by hand?")
        wrong = wrong_types(manifest, MANIFEST_TYPES) if run_manifest else []
        if wrong:
            raise CadRayError(f"{self.uri_under(*parts)} is corrupt: {', '.join(wrong)}; was it edited by hand?")
        return manifest

    def write_manifest(self, manifest: dict, *parts: str) -> None:
        self.write_bytes((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), *(parts or ("_manifest.json",)))
