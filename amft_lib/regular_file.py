"""Read a user-named file only if it is a regular file of bounded size.

Why: `open(path).read()` on a FIFO waits for a writer forever, on `/dev/zero` never ends, and on a
symlink to either does the same; both were measured hangs of `--config` and `--params-file`. The
file is opened with O_NONBLOCK (opening a FIFO returns at once) and judged by fstat on the open
descriptor, so the type checked is the type read, even if the path is renamed in between.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from amft_lib.errors import UserError


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(path: str | Path, what: str, max_bytes: int, error: type[UserError]) -> bytes:
    """The bytes of `path`, at most `max_bytes`; `error` (one line naming the path) otherwise.

    Messages: "<path>: <what> not found", "<path>: is a directory, not a <what>", "<path>: <what> is a
    FIFO/a device/...; give a regular file", "<path>: <what> is larger than N bytes", "<path>: cannot
    read <what>: <why>".
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:  # permission denied, a symlink loop, an I/O error
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{path}: is a directory, not a {what}")
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {what} is {_kind(mode)}; give a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the with block from here on
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes} bytes; is this the right file?")
    return data
