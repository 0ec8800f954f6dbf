"""Child processes for multi-process tests: the real CLI, stderr watched line by line, ended by pid."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Child:
    """`python -m expertmesh ARGS` with its stderr lines queued (and kept), so a test can wait for one."""

    def __init__(self, *args: str, env: dict | None = None, cwd: Path | None = None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "expertmesh", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd or REPO)
        self._start_pump()

    def _start_pump(self) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first new output line containing `text`; AssertionError (with the output) on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s; output:\n" + "\n".join(self.lines))
            if line is None:
                self._q.put(None)
                raise AssertionError(f"exited ({self.proc.wait()}) before {text!r}; output:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if text in line:
                return line

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s; output:\n" + "\n".join(self.lines))
        while (line := self._q.get(timeout=5)) is not None:
            self.lines.append(line)
        self._q.put(None)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)
