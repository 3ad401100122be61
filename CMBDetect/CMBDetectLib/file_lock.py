"""An exclusive inter-process lock on a file (an OS lock, so a killed holder never leaves a stale lock)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from CMBDetectLib.errors import CMBDetectError


class FileLock:
    """``with FileLock(path, busy_error=lambda: InputError(...)):`` — waits up to ``timeout_s``."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 60.0,
                 busy_error: Callable[[], CMBDetectError] | None = None):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.busy_error = busy_error or (lambda: CMBDetectError(f"{self.path.parent} is busy; try again"))
        self._stream = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.path, "a+b")  # noqa: SIM115 - held until __exit__
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                _try_lock(self._stream)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self._stream.close()
                    self._stream = None
                    raise self.busy_error() from None
                time.sleep(0.05)

    def __exit__(self, *exc_info) -> None:
        if self._stream is not None:
            try:
                _unlock(self._stream)
            finally:
                self._stream.close()
                self._stream = None


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(stream) -> None:
        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(stream) -> None:
        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(stream) -> None:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(stream) -> None:
        fcntl.flock(stream.fileno(), fcntl.LOCK_UN)
