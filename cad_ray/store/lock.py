"""The lock of a run root: one driver writes to a root at a time; a second refuses at once, and a lock left by a
driver that died is taken over."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager

from cad_ray.errors import CadRayError
from cad_ray.store.files import hidden_temporary

LOCK = "_lock.json"


def _lock_is_stale(holder: dict) -> bool:
    """A lock whose process is gone (on this host) or is this very process."""
    if holder.get("host") != socket.gethostname():
        return False  # another machine's driver: nothing here can tell whether it still runs
    pid = holder["pid"]
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False  # kill(0 or negative) signals process groups: it says nothing about one driver
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True  # gone, or a pid no process can have
    except PermissionError:
        return False
    return False


class RootLock:
    """The lock of a run root, and the exclusive create it is taken by: a part of `RunRoot`, which gives `fs`,
    `join`, `is_s3`, `uri`, `uri_under` and `read_bytes`."""

    def create_exclusively(self, data: bytes, *parts: str) -> bool:
        """Write the file `parts` only if it does not exist, in one step that no other writer can interleave with:
        True if this call created it, False if it existed. Local: a complete temporary file hard-linked onto the
        name (link fails if the name exists; a reader never sees a half-written file), or where the filesystem has
        no hard links an O_EXCL create. S3: a conditional put (If-None-Match: *), which AWS S3, MinIO and moto
        honour; on an endpoint that ignores the condition (or refuses it as NotImplemented: then a look and a plain
        put) two writers can both succeed, which `locked` then catches by reading the file back."""
        target = self.join(*parts)
        if self.is_s3:
            try:
                self.fs.pipe_file(target, data, mode="create")
                return True
            except FileExistsError:  # s3fs's word for PreconditionFailed
                return False
            except OSError as e:
                if "PreconditionFailed" in repr(e.__cause__):
                    return False
                if "NotImplemented" not in repr(e.__cause__):
                    raise CadRayError(f"cannot write {self.uri_under(*parts)}: {type(e).__name__}: {e}") from None
                # an endpoint without conditional writes: look, then put (the caller reads the file back)
                if self.fs.exists(target):
                    return False
                self.fs.pipe_file(target, data)
                return True
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = hidden_temporary(target)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE and SMB mounts): an exclusive create
                try:
                    with open(target, "xb") as f:
                        f.write(data)
                    return True
                except FileExistsError:
                    return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _lock_holder(self) -> dict | None:
        """The driver holding the root's lock, None if there is no lock; a lock that is not ours to read is
        refused in one line (it may be held: it is never taken over)."""
        try:
            holder = json.loads(self.read_bytes(LOCK))
        except FileNotFoundError:
            return None  # none, or released between the look and the read
        except ValueError as e:
            problem = f"is corrupt ({e})"
        else:
            if isinstance(holder, dict) and isinstance(holder.get("host"), str) \
                    and isinstance(holder.get("pid"), int) and not isinstance(holder.get("pid"), bool):
                return holder
            problem = "is not a lock written by cad-ray (it needs a pid and a host)"
        raise CadRayError(f"{self.uri_under(LOCK)} {problem}; if no cad-ray command is writing to this root, "
                          "remove it")

    def _take_over(self, stale: dict) -> None:
        """Remove a stale lock, but only that one: locally it is first renamed aside (one renamer wins) and put back
        if what was moved is not the lock judged stale (another driver's new lock). On S3 there is no rename: the
        stale lock is deleted, and two drivers taking over the same stale lock at the same moment can both
        succeed (a live lock is never removed unless it appeared between the read and the delete)."""
        target = self.join(LOCK)
        if self.is_s3:
            self.fs.rm_file(target)
            return
        aside = hidden_temporary(target)
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return  # another driver took it over first
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read())
        except ValueError:
            moved = None
        if moved != stale:  # a new lock: put it back where it was (unless yet another one appeared)
            try:
                os.link(aside, target)
            except FileExistsError:
                pass
        os.unlink(aside)

    @contextmanager
    def locked(self, stage: str):
        """Hold the root's lock while a stage writes to it, so that a second driver on the same root refuses at
        once instead of computing everything twice. The lock is taken by an exclusive create
        (`create_exclusively`), so two drivers starting at the same moment never both hold it. A lock left by a
        driver that died (same host, process gone) is taken over; so is one this process holds."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "token": uuid.uuid4().hex,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = (json.dumps(me, indent=1, sort_keys=True) + "\n").encode()
        for attempt in range(3):
            if self.create_exclusively(data, LOCK):
                break
            holder = self._lock_holder()
            if holder is None:
                continue  # released meanwhile: try again
            if not _lock_is_stale(holder):
                since = f", since {holder['started']}" if holder.get("started") else ""  # a lock made by hand
                raise CadRayError(f"another cad-ray {holder.get('stage', 'command')} (pid {holder.get('pid')} on "
                                  f"{holder.get('host')}{since}) is writing to {self.uri}; "
                                  f"wait for it to finish, or remove {self.uri_under(LOCK)} if it is gone")
            self._take_over(holder)
        else:
            raise CadRayError(f"another cad-ray command took the lock on {self.uri} at the same moment; wait for it")
        if (self._lock_holder() or {}).get("token") != me["token"]:  # an S3 endpoint that ignores If-None-Match
            raise CadRayError(f"another cad-ray command took the lock on {self.uri} at the same moment; wait for it")
        try:
            yield
        finally:
            try:
                mine = (self._lock_holder() or {}).get("token") == me["token"]
            except CadRayError:
                mine = False  # replaced by something that is not ours to remove
            if mine:
                self.fs.rm_file(self.join(LOCK))
