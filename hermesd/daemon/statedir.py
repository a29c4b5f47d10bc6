"""The daemon's state directory: private modes whatever the umask, and one daemon per directory."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("hermesd.server")
PRIVATE_UMASK = 0o077  # files and directories the daemon creates: its user only


class AlreadyRunning(Exception):
    """Another hermesd holds the state directory's lock."""


def open_state_dir(state_dir: Path) -> int:
    """Set the daemon's umask, create ``state_dir`` (0700) and take its lock; returns the lock's fd.

    The journal holds prompts and results: whatever umask the daemon was started with, what it creates
    is its own (the socket's mode is set explicitly from socket_mode).
    """
    os.umask(PRIVATE_UMASK)
    state_dir.mkdir(parents=True, exist_ok=True)
    make_private(state_dir, 0o700)
    return _lock(state_dir / "hermesd.lock")


def make_private(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode``; a path the daemon does not own is left as it is, with a warning."""
    try:
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except OSError as exc:
        log.warning("cannot make %s private (mode %o): %s", path, mode, exc)


def _lock(path: Path) -> int:
    """Hold an exclusive lock on ``path`` for the life of the process (one daemon per state dir)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another hermesd is running with state directory {path.parent}") from None
    make_private(path, 0o600)
    return fd
