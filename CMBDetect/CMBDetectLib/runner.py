"""Run ``cmbdetect detect`` (or any JSON-lines command) in a background process, without Qt.

Slicer's GUI thread must never block: the Widget starts a :class:`ProcessRunner`, then a QTimer calls
:meth:`ProcessRunner.poll` a few times per second; reading happens in two daemon threads (stdout, stderr)
that hand lines over through a queue. :meth:`ProcessRunner.cancel` kills the whole process tree (the child
runs in its own session / process group, so grandchildren such as torch workers die too) and returns once
it is gone. Everything here is plain Python so it is tested with real subprocesses outside Slicer.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

IDLE, RUNNING, FINISHED, FAILED, CANCELLED = "idle", "running", "finished", "failed", "cancelled"


@dataclass
class RunnerEvent:
    """One line of the child's output: ``progress`` / ``result`` (JSON) or ``log`` (any other line)."""

    type: str
    data: dict

    @property
    def fraction(self) -> float | None:
        value = self.data.get("fraction")
        return None if value is None else float(value)

    @property
    def message(self) -> str:
        return str(self.data.get("message", ""))


def parse_line(line: str, stream: str = "stdout") -> RunnerEvent:
    text = line.rstrip("\r\n")
    if stream == "stdout" and text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            return RunnerEvent(data["type"], data)
    return RunnerEvent("log", {"stream": stream, "message": text})


class ProcessRunner:
    """A child process whose stdout carries JSON progress lines (see ``progress.json_lines_progress``)."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 stderr_lines: int = 200):
        self.command = [str(part) for part in command]
        self.env = env
        self.cwd = cwd
        self.state = IDLE
        self.returncode: int | None = None
        self.fraction = 0.0
        self.message = ""
        self.result: dict | None = None
        self.error_message: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._threads: list[threading.Thread] = []
        self._cancel_requested = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ProcessRunner:
        if self.state != IDLE:
            raise RuntimeError("a ProcessRunner can be started only once")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True   # own process group: cancel() can kill the whole tree
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines must arrive as they are printed
        try:
            self._process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        except OSError as error:
            self.state = FAILED
            self.error_message = f"cannot start {Path(self.command[0]).name}: {error.strerror or error}"
            return self
        self.state = RUNNING
        self.started_at = time.monotonic()
        for stream_name in ("stdout", "stderr"):
            thread = threading.Thread(target=self._read, args=(stream_name,), daemon=True,
                                      name=f"cmbdetect-runner-{stream_name}")
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, stream_name: str) -> None:
        stream = getattr(self._process, stream_name)
        try:
            for line in stream:
                self._queue.put((stream_name, line))
        except (OSError, ValueError):
            pass   # the pipe was closed by cancel(): nothing more to read
        finally:
            self._queue.put((stream_name, None))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self.state == RUNNING

    # ------------------------------------------------------------------ polling
    def poll(self) -> list[RunnerEvent]:
        """New events since the last call (never blocks); updates state when the process has ended."""
        events = self._drain()
        if self.state == RUNNING and self._process is not None and self._process.poll() is not None:
            for thread in self._threads:   # the pipes close right after exit: collect the last lines
                thread.join(timeout=1.0)
            events += self._drain()
            self._finish(self._process.returncode)
        return events

    def _drain(self) -> list[RunnerEvent]:
        events = []
        while True:
            try:
                stream_name, line = self._queue.get_nowait()
            except queue.Empty:
                return events
            if line is None:
                continue
            event = parse_line(line, stream_name)
            if stream_name == "stderr" and line.strip():
                self._stderr.append(line.strip())
            if event.type == "progress":
                if event.fraction is not None and event.fraction >= 0:
                    self.fraction = min(max(event.fraction, 0.0), 1.0)
                self.message = event.message or self.message
            elif event.type == "result":
                self.result = event.data
            events.append(event)

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        self.finished_at = time.monotonic()
        if self._cancel_requested:
            self.state = CANCELLED
            self.error_message = "cancelled"
        elif returncode == 0 and self.result is not None:
            self.state = FINISHED
            self.fraction = 1.0
        else:
            self.state = FAILED
            self.error_message = self._describe_failure(returncode)

    def _describe_failure(self, returncode: int) -> str:
        last = self._stderr[-1] if self._stderr else ""
        if last.startswith("Traceback") or (last and len(self._stderr) > 1 and self._stderr[0].startswith(
                "Traceback")):
            last = self._stderr[-1]   # the exception line is the last one of a traceback
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            hint = " (out of memory?)" if -returncode == getattr(signal, "SIGKILL", 9) else ""
            return f"the detection process was killed by {name}{hint}" + (f": {last}" if last else "")
        if returncode == 0:
            return "the detection process ended without reporting a result" + (f": {last}" if last else "")
        prefix = "cmbdetect detect: error: "
        if last.startswith(prefix):
            last = last[len(prefix):]
        return last or f"the detection process failed with exit code {returncode}"

    # ------------------------------------------------------------------ stopping
    def cancel(self, timeout: float = 1.0) -> None:
        """Kill the process tree: SIGTERM to the group, SIGKILL after ``timeout / 2`` s if still alive."""
        if self._process is None or self.state != RUNNING:
            return
        self._cancel_requested = True
        self._signal_tree(terminate=True)
        try:
            self._process.wait(timeout=timeout / 2)
        except subprocess.TimeoutExpired:
            self._signal_tree(terminate=False)
            try:
                self._process.wait(timeout=timeout / 2)
            except subprocess.TimeoutExpired:
                pass
        self.poll()

    def _signal_tree(self, terminate: bool) -> None:
        process = self._process
        if process is None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                               check=False)
            else:
                os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass   # already gone

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the process ends (for scripts and tests; the GUI uses a QTimer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == RUNNING:
            self.poll()
            if self.state != RUNNING:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
        return self.state

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr)


def engine_environment(module_dir: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which ``python -m CMBDetectLib`` finds the engine shipped with the Slicer module."""
    env = dict(os.environ if base is None else base)
    paths = [str(Path(module_dir))] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def detect_command(python: str, image: str | os.PathLike, out_dir: str | os.PathLike,
                   modality: str | None = None, mask: str | os.PathLike | None = None,
                   model: str | None = None, device: str = "auto", th_det: float | None = None,
                   th_disc: float | None = None, save_prob: bool = True) -> list[str]:
    """Command line of ``cmbdetect detect`` with JSON progress, run by ``python`` (e.g. ``PythonSlicer``)."""
    command = [str(python), "-m", "CMBDetectLib", "detect", str(image), "--out", str(out_dir),
               "--progress", "json", "--device", device]
    if modality:
        command += ["--modality", modality]
    if mask:
        command += ["--mask", str(mask)]
    if model:
        command += ["--model", str(model)]
    if th_det is not None:
        command += ["--th-det", repr(float(th_det))]  # repr: exact round trip
    if th_disc is not None:
        command += ["--th-disc", repr(float(th_disc))]
    if save_prob:
        command.append("--save-prob")
    return command


def python_executable() -> str:
    """``PythonSlicer`` when running inside Slicer, else this interpreter."""
    import shutil

    found = shutil.which("PythonSlicer")
    return found or sys.executable
