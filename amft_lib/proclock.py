"""Who holds a folder, and is that process still alive: the state-dir and SeaweedFS locks.

Why: two `amft pipeline run-local` on one state dir, or `amft lineage --state-dir` during a run,
started a second SeaweedFS on the same data (a Go panic and a traceback), and a killed run left its
SeaweedFS and its tasks' temp folders behind. The fix has three parts that all need the same facts:
- :class:`DirLock`: an ``fcntl.flock`` on a lock file that records the holder's pid, start time and
  command. The kernel drops the lock when the holder dies (even by SIGKILL), so a stale lock file
  never blocks; a busy one is refused with one line naming the holder (:class:`BusyError`).
- :func:`process_alive`: a pid *and its start time* (``/proc/PID/stat``), so a pid the kernel has
  reused for an unrelated process does not count as the old owner.
- :func:`descendants`: the processes a run started (its kfp.local tasks), to stop them with it.

Linux only (``/proc``, ``flock``), like the embedded SeaweedFS itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from amft_lib.errors import UserError

_MAX_COMMAND = 200  # characters of the holder's command line kept in the lock file (enough to recognise it)


class BusyError(UserError):
    """A folder is in use by another live process (a user mistake: one line naming it, exit 2)."""


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None if no
    such process. With the pid it identifies one process: pids are reused, start times are not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] here is field 3 (state)
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """True if process `pid` exists, is not a zombie and (when given) started at `start_time`."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat[stat.rfind(")") + 2:].startswith("Z"):  # exited, waiting for its parent to reap it
        return False
    return start_time is None or process_start_time(pid) == start_time


def process_command(pid: int) -> str:
    """The command line of `pid` ('' if gone), scrubbed of secrets (it may hold a --host URL)."""
    from amft_lib.redact import redact_text

    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return redact_text(raw.replace(b"\0", b" ").decode(errors="replace").strip())[:_MAX_COMMAND]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first, then theirs), from /proc's parent pids."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue += children.get(child, [])
    return found


def this_process() -> dict[str, Any]:
    """What a lock or pid file records about its writer: pid, start time, command (scrubbed)."""
    from amft_lib.redact import redact_text

    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""
    return {"pid": os.getpid(), "start": process_start_time(os.getpid()),
            "command": redact_text(command)[:_MAX_COMMAND]}


def describe_holder(info: dict[str, Any] | None) -> str:
    """'pid 1234 (amft pipeline run-local …)' for a message; 'another process' if unknown."""
    if not info or not isinstance(info.get("pid"), int):
        return "another process"
    command = info.get("command") or process_command(info["pid"])
    return f"pid {info['pid']}" + (f" ({command})" if command else "")


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON record in a lock or pid file, or None when absent, empty or not ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class DirLock:
    """An exclusive, non-blocking ``flock`` on `path`, which records who holds it.

    ``acquire()`` raises :class:`BusyError` naming the holder (from the file, falling back to
    /proc) when another process — or another open of the same file in this one — holds it. The
    lock file stays behind when released (empty); only a held lock means anything.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what  # what the message calls the locked thing, e.g. "state dir runs/x"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_record(self.path)
            raise BusyError(f"{self.what}: in use by {describe_holder(holder)}; wait for it to finish or stop it "
                            "(Ctrl-C / kill PID), then run again") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(this_process()) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a reader between our unlock and a new holder's write sees "unknown", not us
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

