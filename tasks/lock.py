"""One run per output directory: a second run on the same output is refused, naming the run that owns it.

Two runs writing one output would race on its shards and ledger. The owner holds `<output>/.lock`:

- Local and shared POSIX filesystems: an exclusive `flock` on the file, which the kernel releases when the owner
  exits in any way (SIGKILL included), so a killed run never leaves a lock behind. NFS (v4, or v3 with lockd)
  supports it; a filesystem that does not (Lustre mounted without `-o flock`) falls back to the heartbeat lock.
- Object stores (s3://, gs://): a heartbeat lock. The owner rewrites the file every `HEARTBEAT_S`; a lock whose
  heartbeat is older than `STALE_S`, or whose owner process is gone on this host, is stale and taken over.

The file holds the owner's host, pid, start time and run id, so the refusal says who to wait for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from tasks.output import LOCK, OutputDir

HEARTBEAT_S = 30.0
STALE_S = 120.0

# Locks handed over to the next run of this process, by output root: the CLI takes the lock before it starts
# Prefect (so a second run is refused at once, not after the server's start-up), and the flow it then runs
# adopts it. Adopted once: another run in this process still finds the output locked.
_HANDED_OVER: dict[str, OutputLock] = {}
_HANDED_OVER_GUARD = threading.Lock()


class OutputLocked(RuntimeError):
    """Another run owns this output directory."""

    def __init__(self, output: str, owner: dict):
        self.owner = owner
        who = (
            f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {owner.get('started', '?')}"
            if owner
            else "owner unknown"
        )
        super().__init__(
            f"output {output} is in use by another curate run ({who}); wait for it to finish or stop it, "
            "or choose another output"
        )


def _owner(run_id: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
        "heartbeat": time.time(),
    }


def _alive_here(owner: dict) -> bool:
    """False only when the owner ran on this host and its process is gone."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


class OutputLock:
    """Exclusive ownership of an output directory for one run. Use as a context manager, or acquire/release."""

    def __init__(self, output: OutputDir, run_id: str | None = None):
        self.output = output
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._fd: int | None = None
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        with _HANDED_OVER_GUARD:
            self._adopted = _HANDED_OVER.pop(self.output.root, None)
        if self._adopted is not None:
            return
        self._take()

    def release(self) -> None:
        if getattr(self, "_adopted", None) is not None:
            self._adopted = None  # the lock stays with whoever handed it over
            return
        self._drop()

    def hand_over(self) -> None:
        """Take the lock now and let the next run in this process adopt it (the CLI, before Prefect starts)."""
        self._take()
        with _HANDED_OVER_GUARD:
            _HANDED_OVER[self.output.root] = self

    def _take(self) -> None:
        if self.output.local:
            try:
                self._acquire_flock()
                return
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        self._acquire_heartbeat()

    def _drop(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join(timeout=5)
            self._beat = None
            if self._read_owner().get("run_id") == self.run_id:
                self.output.remove(LOCK)

    # -- flock
    def _acquire_flock(self) -> None:
        os.makedirs(self.output.root, exist_ok=True)
        path = self.output.path(LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._parse(os.pread(fd, 4096, 0))
            for _ in range(20):  # the owner may have the lock but not have written its name yet
                if owner:
                    break
                time.sleep(0.025)
                owner = self._parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputLocked(self.output.url, owner) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(self.run_id)).encode(), 0)
        self._fd = fd

    # -- heartbeat
    def _read_owner(self) -> dict:
        try:
            return self._parse(self.output.read_bytes(LOCK))
        except (FileNotFoundError, OSError):
            return {}

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            owner = json.loads(data.decode() or "{}")
            return owner if isinstance(owner, dict) else {}
        except (ValueError, UnicodeDecodeError):
            return {}

    def _acquire_heartbeat(self) -> None:
        owner = self._read_owner()
        if owner and owner.get("run_id") != self.run_id:
            fresh = time.time() - float(owner.get("heartbeat", 0)) < STALE_S
            if fresh and _alive_here(owner):
                raise OutputLocked(self.output.url, owner)
        self.output.write_bytes(LOCK, json.dumps(_owner(self.run_id)).encode())
        # Two runs that both saw a stale lock: the last writer wins, the other sees it on read-back.
        time.sleep(0.2)
        now = self._read_owner()
        if now.get("run_id") != self.run_id:
            raise OutputLocked(self.output.url, now)
        self._beat = threading.Thread(target=self._heartbeat, name="lumosx-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        started = self._read_owner().get("started")
        while not self._stop.wait(HEARTBEAT_S):
            owner = _owner(self.run_id)
            owner["started"] = started or owner["started"]
            with contextlib.suppress(OSError):  # a missed beat is survivable; STALE_S is four beats
                self.output.write_bytes(LOCK, json.dumps(owner).encode())
