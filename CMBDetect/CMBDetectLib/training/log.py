"""Training log: one JSON object per line (machine-readable, appendable, survives a crash)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class JsonLinesLog:
    """Append events ``{"time": ..., "event": ..., ...}`` to ``path`` (flushed per line)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
