"""The background runner with real subprocesses: progress parsing, cancel, crashes, the real CLI."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from CMBDetectLib import runner as runner_module
from CMBDetectLib.runner import CANCELLED, FAILED, FINISHED, ProcessRunner, detect_command, engine_environment

MODULE_DIR = Path(__file__).resolve().parents[1] / "CMBDetect"


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_progress_lines_are_parsed_in_order_and_result_is_kept(tmp_path):
    command = script(tmp_path, """
        import json, sys, time
        for i in range(5):
            print(json.dumps({"type": "progress", "fraction": i / 4, "message": f"step {i}"}), flush=True)
            time.sleep(0.02)
        print("a plain log line", flush=True)
        print("{not json", flush=True)
        print("warning on stderr", file=sys.stderr, flush=True)
        print(json.dumps({"type": "result", "outputs": {"labels": "x_cmb.nii.gz"}}), flush=True)
    """)
    run = ProcessRunner(command).start()
    seen = []
    deadline = time.monotonic() + 20
    while run.is_running and time.monotonic() < deadline:
        seen += run.poll()
        time.sleep(0.01)
    seen += run.poll()
    assert run.state == FINISHED and run.returncode == 0
    progress = [e for e in seen if e.type == "progress"]
    assert [e.fraction for e in progress] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [e.message for e in progress][-1] == "step 4"
    logs = [e.message for e in seen if e.type == "log"]
    assert "a plain log line" in logs and "{not json" in logs and "warning on stderr" in logs
    assert run.result["outputs"]["labels"] == "x_cmb.nii.gz"
    assert run.fraction == 1.0 and run.error_message is None


def test_progress_arrives_while_the_process_is_still_running(tmp_path):
    command = script(tmp_path, """
        import json, time
        print(json.dumps({"type": "progress", "fraction": 0.1, "message": "started"}), flush=True)
        time.sleep(30)
    """)
    run = ProcessRunner(command).start()
    try:
        deadline = time.monotonic() + 15
        while run.fraction == 0.0 and time.monotonic() < deadline:
            run.poll()
            time.sleep(0.02)
        assert run.is_running and run.fraction == pytest.approx(0.1) and run.message == "started"
    finally:
        run.cancel()


def test_cancel_kills_the_process_tree_within_a_second(tmp_path):
    # The child ignores SIGTERM and has a grandchild: both must be gone after cancel().
    command = script(tmp_path, """
        import json, os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        event = {"type": "progress", "fraction": 0.2, "message": f"grandchild {child.pid}"}
        print(json.dumps(event), flush=True)
        time.sleep(60)
    """)
    run = ProcessRunner(command).start()
    deadline = time.monotonic() + 15
    while "grandchild" not in run.message and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    grandchild = int(run.message.split()[-1])
    start = time.monotonic()
    run.cancel(timeout=1.0)
    elapsed = time.monotonic() - start
    assert run.state == CANCELLED and elapsed < 2.0     # <= 1 s of SIGTERM grace, then SIGKILL
    assert run.returncode is not None and run.returncode < 0
    time.sleep(0.2)
    assert not process_alive(grandchild)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by a container's init) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def test_cancel_of_a_well_behaved_child_is_fast(tmp_path):
    run = ProcessRunner(script(tmp_path, "import time; time.sleep(60)\n")).start()
    start = time.monotonic()
    run.cancel()
    assert run.state == CANCELLED and time.monotonic() - start < 0.6


def test_a_crash_is_reported_with_the_last_stderr_line(tmp_path):
    command = script(tmp_path, """
        import json
        print(json.dumps({"type": "progress", "fraction": 0.3, "message": "stage 1"}), flush=True)
        raise RuntimeError("CUDA error: device-side assert triggered")
    """)
    run = ProcessRunner(command).start()
    assert run.wait(timeout=20) == FAILED
    assert run.returncode == 1
    assert run.error_message == "RuntimeError: CUDA error: device-side assert triggered"
    assert run.fraction == pytest.approx(0.3)


def test_a_killed_child_is_reported_as_killed(tmp_path):
    command = script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    run = ProcessRunner(command).start()
    assert run.wait(timeout=20) == FAILED
    assert "killed by SIGKILL" in run.error_message


def test_exit_zero_without_result_is_a_failure(tmp_path):
    run = ProcessRunner(script(tmp_path, "print('done')\n")).start()
    assert run.wait(timeout=20) == FAILED
    assert "without reporting a result" in run.error_message


def test_missing_executable_is_a_clear_failure():
    run = ProcessRunner(["/nonexistent/PythonSlicer", "-c", "pass"]).start()
    assert run.state == FAILED and "cannot start PythonSlicer" in run.error_message


def test_real_cli_missing_model_is_one_clear_message(tmp_path):
    command = detect_command(sys.executable, tmp_path / "scan.nii.gz", tmp_path / "out", modality="swi",
                             model=str(tmp_path / "no-such-model"))
    run = ProcessRunner(command, env=engine_environment(MODULE_DIR)).start()
    assert run.wait(timeout=60) == FAILED and run.returncode == 1
    assert "no-such-model" in run.error_message and "Traceback" not in run.error_message


def test_real_cli_error_line_becomes_the_message(tmp_path, tiny_model):
    """The real ``cmbdetect detect`` on a missing image: exit code 1, one clear line, nothing written."""
    out_dir = tmp_path / "out"
    command = detect_command(sys.executable, tmp_path / "missing.nii.gz", out_dir, modality="swi",
                             model=str(tiny_model.path), save_prob=True)
    run = ProcessRunner(command, env=engine_environment(MODULE_DIR)).start()
    assert run.wait(timeout=60) == FAILED
    assert run.returncode == 1
    assert "missing.nii.gz" in run.error_message and "Traceback" not in run.error_message
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_detect_command_and_environment():
    command = detect_command("PythonSlicer", "a.nii.gz", "out", modality="qsm", mask="m.nii.gz",
                             model="default", device="cpu", th_det=0.4, th_disc=0.6)
    assert command[:4] == ["PythonSlicer", "-m", "CMBDetectLib", "detect"]
    joined = " ".join(command)
    for part in ("--progress json", "--modality qsm", "--mask m.nii.gz", "--device cpu", "--th-det 0.4",
                 "--th-disc 0.6", "--save-prob", "--out out"):
        assert part in joined
    env = engine_environment("/x/CMBDetect", {"PYTHONPATH": "/y"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/x/CMBDetect", "/y"]
    assert runner_module.python_executable()
