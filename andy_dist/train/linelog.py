"""An append-only line file that survives a full disk.

Rank 0 alone writes the run's metrics and samples. If such a write raised, rank 0 would die and
the other ranks would wait in their next collective until the process-group timeout: a full disk
would turn into a ten-minute hang and lose the steps since the last checkpoint. Instead a line that
cannot be written waits in memory (bounded) and goes out, in order, with the next write that
succeeds; the run keeps training, and the next checkpoint save stops it cleanly if the disk stays
full. The console says when writing stops and when it resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

# Enough for hours of metrics at one line per step; past it, new lines are counted and dropped.
MAX_PENDING_BYTES = 64 * 2**20


class LineLog:
    """Append text lines to `path` with O_APPEND; `warn` receives the one-line notices."""

    def __init__(self, path: str | Path, warn: Callable[[str], None], max_pending_bytes: int = MAX_PENDING_BYTES):
        self.path = Path(path)
        self._warn = warn
        self._max_pending = max_pending_bytes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending = bytearray()  # bytes not yet on disk, always whole lines (a partial write keeps its rest)
        self._held_lines = 0
        self._dropped_lines = 0
        self._failing = False

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def write(self, line: str) -> None:
        """Append one line (a newline is added); never raises for a full disk."""
        data = (line + "\n").encode("utf-8")
        if len(self._pending) + len(data) > self._max_pending:
            self._dropped_lines += 1
        else:
            self._pending += data
            if self._failing:
                self._held_lines += 1
        self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self._fd, self._pending)
            except OSError as err:
                if not self._failing:
                    self._failing = True
                    self._held_lines = 1
                    self._warn(f"warning: cannot write {self.path} ({err.strerror}); training goes on and new lines "
                               f"wait in memory until the write succeeds: free space on that filesystem")
                return
            del self._pending[:written]
        if self._failing:
            self._failing = False
            dropped = f"; {self._dropped_lines} lines past the memory limit were lost" if self._dropped_lines else ""
            self._warn(f"{self.path}: writing again; {self._held_lines} held lines are now on disk{dropped}")
            self._held_lines = self._dropped_lines = 0

    def close(self) -> None:
        """Last try to write what is held; reports what could not be written. Safe to call twice."""
        if self._fd < 0:
            return
        self._flush()
        if self._pending or self._dropped_lines:
            self._warn(f"warning: {self.path} is missing its last {self._held_lines + self._dropped_lines} lines "
                       f"(the disk stayed full)")
        os.close(self._fd)
        self._fd = -1
