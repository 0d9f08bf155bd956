"""bin/run's supervision loop (`supervise` in bin/_env.sh), run by bash the way bin/run runs
it, around a fake command: a child that exits is started again, one that keeps failing at
once is given up on, and stopping the process group stops the loop and its child."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SUPERVISE = 'set -euo pipefail; source bin/_env.sh; supervise fake "$@"'


def _fake(tmp_path: Path, failures: int) -> Path:
    """A command that records each start, exits with 3 its first `failures` times, then
    stays up (as a sleep whose pid it records)."""
    script = tmp_path / "fake.sh"
    script.write_text(
        f"""#!/usr/bin/env bash
echo start >>{tmp_path}/starts
[ "$(wc -l <{tmp_path}/starts)" -le {failures} ] && exit 3
echo $$ >{tmp_path}/running
exec sleep 120
"""
    )
    script.chmod(0o755)
    return script


def _supervise(script: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["bash", "-c", SUPERVISE, "bash", str(script)],
        cwd=ROOT,
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as bin/run's `set -m` gives it
    )


def _starts(tmp_path: Path) -> int:
    path = tmp_path / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert process.poll() is None, "the supervising loop ended"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_command_that_exits_is_started_again_and_the_group_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    loop = _supervise(_fake(tmp_path, failures=2))
    try:
        _wait_for(tmp_path / "running", loop)
        assert _starts(tmp_path) == 3
        child = int((tmp_path / "running").read_text())
        assert loop.poll() is None

        os.killpg(loop.pid, signal.SIGTERM)  # what bin/run's stop_all sends on Ctrl-C
        loop.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(loop.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_alive(loop.pid)
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
        assert b"fake exited (status 3); restarting it in 1 s" in loop.stderr.read()
    finally:
        if _group_alive(loop.pid):
            os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()


def test_a_command_that_keeps_failing_at_once_is_given_up_with_its_status(
    tmp_path: Path,
) -> None:
    loop = _supervise(_fake(tmp_path, failures=100), SUPERVISE_GIVE_UP="3")
    try:
        _, stderr = loop.communicate(timeout=30)
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
            loop.wait()

    assert loop.returncode == 3
    assert _starts(tmp_path) == 3
    assert b"fake exited 3 times in a row soon after starting (status 3); giving up" in stderr
