"""The demo's child processes: started with their output in the run directory, watched, ended by pid.

Every child is `python -m expertmesh ...` (the same code as the parent) in its own session, so a Ctrl-C
in the terminal reaches only the demo, which then stops each child itself: SIGTERM, a grace
period, then SIGKILL (to the process group the child leads, so its own helpers go too), always by
the pid it started. Nothing is ever looked up or killed by name.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class DemoError(RuntimeError):
    """Something the demo started failed; the message names it and its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    expect_exit: bool = False  # a one-shot command (dataset submit), not a daemon

    def tail(self, n: int = 15) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(f"    {l}" for l in lines[-n:])


@dataclass
class Supervisor:
    log_dir: Path
    env: dict = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, *args: str, expect_exit: bool = False) -> Child:
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, **self.env}
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "expertmesh", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.log_dir, start_new_session=True)
        child = Child(name, proc, log, expect_exit)
        self.children.append(child)
        # Who was started, by pid: what an operator (or a test) checks once the demo has stopped.
        (self.log_dir / "children.json").write_text(json.dumps([{"name": c.name, "pid": c.proc.pid}
                                                                for c in self.children], indent=1))
        return child

    def wait_line(self, child: Child, marker: str, timeout_s: float) -> str:
        """The first line of the child's log that starts with `marker` (DemoError on exit or timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in child.log.read_text(errors="replace").splitlines():
                if line.startswith(marker):
                    return line
            if child.proc.poll() is not None:
                raise DemoError(f"{child.name} exited with code {child.proc.returncode} before it was ready; "
                                f"log {child.log}:\n{child.tail()}")
            time.sleep(0.2)
        raise DemoError(f"{child.name} was not ready within {timeout_s:.0f}s; log {child.log}:\n{child.tail()}")

    def wait_exit(self, child: Child, timeout_s: float) -> None:
        try:
            code = child.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise DemoError(f"{child.name} did not finish within {timeout_s:.0f}s; log {child.log}") from None
        if code != 0:
            raise DemoError(f"{child.name} failed (exit {code}); log {child.log}:\n{child.tail()}")

    def check(self) -> None:
        """DemoError if a daemon child has exited (a miner or the validator must keep running)."""
        for c in self.children:
            if not c.expect_exit and c.proc.poll() is not None:
                raise DemoError(f"{c.name} exited with code {c.proc.returncode}; log {c.log}:\n{c.tail()}")

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM every running child (newest first), wait up to grace_s, SIGKILL the rest; all by pid."""
        running = [c for c in reversed(self.children) if c.proc.poll() is None]
        for c in running:
            _signal(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in running:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # The child leads the session we created for it: its group also holds what it spawned
                # (hivemind's p2pd), which must not outlive it.
                _signal(c.proc.pid, signal.SIGKILL, group=True)
                c.proc.wait(30)


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:  # it ended between the poll and the signal
        pass
