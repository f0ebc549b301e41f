"""Ctrl-C stops a running command with a line and status 130, not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.stub_server import StubServer, StubState


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job starts with SIGINT ignored


def test_ctrl_c_during_a_benchmark_exits_130(tmp_path: Path) -> None:
    with StubServer(StubState(prefill_s=0.1, token_gap_s=5.0)) as stub:  # each request would take minutes
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "bench", "serve", "--url", stub.url, "--workload", "synthetic:16:8",
             "-n", "4", "--rate", "10", "--time-limit", "600", "--no-progress", "--no-plots",
             "--output-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        deadline = time.monotonic() + 120
        while not stub.state.bodies and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if not stub.state.bodies:
            proc.kill()
            raise AssertionError(f"the benchmark never sent a request: {proc.communicate()[1][-2000:]}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "distserve: interrupted" in err and "Traceback" not in err
