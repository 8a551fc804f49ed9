"""A lock file that keeps two processes from writing one run directory.

``RUN_DIR/.lock`` holds one JSON line naming its owner (pid, host name, process start time)
and, where the OS has it (POSIX), an exclusive ``flock`` held by the owner for the whole run.
The kernel drops a ``flock`` when its process dies, however it dies (SIGKILL included), so a
lock file left behind by a dead run is recognised as *stale* and taken over by the next
writer (``--resume``/``--overwrite``); a lock whose owner is alive refuses with the owner's pid.

Without ``fcntl`` the file is created with ``O_CREAT | O_EXCL`` and a lock is stale when its
owner is gone: same host and no process with that pid, or a process with that pid that started
at another time (pid reuse). A lock from another host is then never taken over automatically.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from mfld.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

LOCK = ".lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux ``/proc``), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_info() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}


def read_lock(path: str | Path) -> dict | None:
    """The owner recorded in a lock file, or None if the file is missing or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            info = json.loads(f.read(4096).decode("utf-8", "replace"))
    except (OSError, ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) else None


def is_stale(info: dict | None) -> bool:
    """True if the owner of a lock is certainly gone (see the module docstring)."""
    if info is None:  # unreadable: a writer died between create and write (the write is tiny)
        return True
    if info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    if not _alive(pid):
        return True
    start = info.get("start")
    now = _start_time(pid)
    return start is not None and now is not None and str(start) != str(now)


class RunLock:
    """``with RunLock(run_dir): ...`` -- hold the run directory's lock for the block.

    Raises :class:`ConfigError` (field ``--out``) if a live process holds it. ``took_over``
    tells whether a stale lock was replaced.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.took_over = False
        self.held = False

    def _busy(self, info):
        who = f"process {info.get('pid')} on {info.get('host')}" if info else "another process"
        return ConfigError(f"run directory is in use by {who}", field="--out", value=str(self.path.parent),
                           allowed=f"wait for that run to finish (or stop it); {LOCK} is released on exit")

    def _open(self, flags: int) -> int:
        """``os.open`` of the lock file that never follows a symlink planted in its place."""
        try:
            return os.open(self.path, flags | _NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EMLINK) or self.path.is_symlink():
                raise ConfigError(f"{LOCK} is a symbolic link; refusing to follow it", field="--out",
                                  value=str(self.path.parent),
                                  allowed=f"a run directory whose {LOCK} is a regular file (remove the link)") from None
            raise

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            self._open(os.O_RDONLY)  # raises the one-line refusal
        return self._acquire_flock() if fcntl is not None else self._acquire_excl()

    def _acquire_flock(self) -> RunLock:
        for _ in range(5):
            existed = self.path.exists()
            fd = self._open(os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy(read_lock(self.path)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner unlinked it between our open and flock: retry
                os.close(fd)
                continue
            self.took_over = existed and os.fstat(fd).st_size > 0
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(owner_info()) + "\n").encode())
            self._fd = fd
            self.held = True
            return self
        raise ConfigError("could not take the run directory's lock", field="--out", value=str(self.path.parent))

    def _acquire_excl(self) -> RunLock:  # pragma: no cover - non-POSIX fallback
        for _ in range(3):
            try:
                fd = self._open(os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                info = read_lock(self.path)
                if not is_stale(info):
                    raise self._busy(info) from None
                aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                    os.unlink(aside)
                    self.took_over = True
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner_info()) + "\n")
            self._fd = None
            self.held = True
            return self
        raise ConfigError("could not take the run directory's lock", field="--out", value=str(self.path.parent))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            os.unlink(self.path)  # unlink first, then drop the flock (see _acquire_flock's retry)
        except FileNotFoundError:
            pass
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
