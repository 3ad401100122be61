"""Progress reporting shared by the engine, the command line and the Slicer runner."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, Protocol, TextIO


class ProgressCallback(Protocol):
    def __call__(self, fraction: float, message: str) -> None: ...


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that ignores everything."""


def scaled(progress: ProgressCallback | None, start: float, end: float) -> ProgressCallback:
    """Map a sub-task's 0..1 progress onto ``start..end`` of the parent task."""
    parent = progress or no_progress

    def report(fraction: float, message: str) -> None:
        parent(start + (end - start) * min(max(fraction, 0.0), 1.0), message)

    return report


def json_lines_progress(stream: TextIO = sys.stdout) -> ProgressCallback:
    """One JSON object per line: ``{"type": "progress", "fraction": f, "message": m, "time": t}``.

    This is what the Slicer background runner parses (``--progress json``).
    """

    def report(fraction: float, message: str) -> None:
        stream.write(json.dumps({"type": "progress", "fraction": round(float(fraction), 4),
                                 "message": message, "time": round(time.time(), 3)}) + "\n")
        stream.flush()

    return report


def text_progress(stream: TextIO = sys.stdout) -> ProgressCallback:
    """Human-readable progress lines for a terminal."""
    last: list[str] = [""]

    def report(fraction: float, message: str) -> None:
        if message != last[0]:
            stream.write(f"[{100 * fraction:5.1f}%] {message}\n")
            stream.flush()
            last[0] = message

    return report


Callback = Callable[[float, str], None]
