"""Progress of long work on stderr: one line per update, rate-limited, readable in a log file.

On a terminal the current line is redrawn in place; anywhere else (a pipe, a log file, a CI job)
each update is its own line, at most one every `every_s` seconds plus the last one, so logs stay
short and greppable (e.g. `train step 20/40 loss 3.1234 1,520 tok/s`).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    def __init__(self, prefix: str = "miner", every_s: float = 5.0, stream: TextIO | None = None):
        self.prefix, self.every_s = prefix, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last: dict[str, float] = {}

    def _head(self) -> str:
        return f"{time.strftime('%H:%M:%S')} {self.prefix}: "

    def _emit(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[2K{self._head()}{text}" + ("\n" if final else ""))
        else:
            self.stream.write(f"{self._head()}{text}\n")
        self.stream.flush()

    def _due(self, task: str, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self._last.get(task, -1e9) >= self.every_s:
            self._last[task] = now
            return True
        return False

    def steps(self, task: str, done: int, total: int, detail: str = "") -> None:
        """`task done/total detail` (e.g. train step 20/40 loss 3.1 1,500 tok/s)."""
        final = done >= total
        if self._due(task, final):
            self._emit(f"{task} {done}/{total}" + (f"  {detail}" if detail else ""), final)

    def bytes(self, task: str, done: int, total: int) -> None:
        final = done >= total
        if self._due(task.split(" ")[0], final):
            pct = 100 * done / total if total else 100
            self._emit(f"{task} {_human_bytes(done)}/{_human_bytes(total)} ({pct:.0f}%)", final)

    def line(self, text: str) -> None:
        """A one-line event (always printed): what happened or why the miner cannot take part."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"{self._head()}{text}\n")
        self.stream.flush()
