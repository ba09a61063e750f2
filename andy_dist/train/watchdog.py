"""Say where a stalled rank is stuck, long before the process-group timeout ends the job.

A rank that hangs without dying (a stuck read on a dead network mount, a DataLoader deadlock,
a peer that stopped answering) leaves the others waiting in their next collective until the
process-group timeout; the job then fails with a timeout that says nothing about the cause.
`StallReporter` prints, once per stall, a header naming the rank and its last progress, then the
Python stack of every thread; the stalled rank's stack shows the cause, a waiting rank's stack
shows the collective it waits in. Training is not interrupted: if the stall ends, so does the report.

A background thread needs the GIL to print; nearly every blocking call (file reads, sleeps,
torch collectives and kernels) releases it. `kill -USR1 PID` prints the same stacks on demand.
"""

from __future__ import annotations

import faulthandler
import io
import signal
import sys
import threading
import time
import traceback


class StallReporter:
    """Use as a context manager around the loop; call `progress(what)` after each unit of work."""

    def __init__(self, seconds: float | None, rank: int, stream=None):
        self.seconds = seconds
        self.rank = rank
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._last_what = "start"
        self._reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StallReporter":
        self._on_usr1 = (hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread()
                         and _has_fd(self.stream))
        if self._on_usr1:
            faulthandler.register(signal.SIGUSR1, file=self.stream, all_threads=True)
        if self.seconds:
            self._thread = threading.Thread(target=self._watch, name="andy-stall-reporter", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._on_usr1:
            faulthandler.unregister(signal.SIGUSR1)

    def progress(self, what: str) -> None:
        with self._lock:
            self._last, self._last_what, self._reported = time.monotonic(), what, False

    def _watch(self) -> None:
        # Check a few times per period: a report comes at most a quarter period late.
        while not self._stop.wait(max(self.seconds / 4, 0.05)):
            with self._lock:
                idle, what, reported = time.monotonic() - self._last, self._last_what, self._reported
                if idle >= self.seconds and not reported:
                    self._reported = True
            if idle >= self.seconds and not reported:
                self._report(idle, what)

    def _report(self, idle: float, what: str) -> None:
        print(f"rank {self.rank}: no progress for {idle:.0f} s (last: {what}); the stack of every thread follows. "
              f"The job goes on; a rank that never returns ends it at the process-group timeout "
              f"(dist_timeout_s).", file=self.stream, flush=True)
        if _has_fd(self.stream):
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
        else:  # a stream without a file descriptor (captured output): Python's own formatting
            for thread_id, frame in sys._current_frames().items():
                print(f"Thread {thread_id:#x} (most recent call last):", file=self.stream)
                traceback.print_stack(frame, file=self.stream)
        self.stream.flush()


def _has_fd(stream) -> bool:
    """faulthandler writes to a file descriptor; a captured stream (io.StringIO) has none."""
    try:
        stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
    return True
