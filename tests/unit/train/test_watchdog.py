"""The stall reporter: a rank that makes no progress prints where every thread is, once per stall."""

from __future__ import annotations

import time

from andy_dist.train.watchdog import StallReporter


def _stalled_here(seconds: float) -> None:
    time.sleep(seconds)  # stands for a read on a dead mount or a collective whose peer is gone


def test_a_stall_is_reported_once_with_every_thread_stack_and_again_after_progress(tmp_path):
    log = tmp_path / "stderr"
    with open(log, "w") as stream:  # faulthandler writes to a real file descriptor
        with StallReporter(0.3, rank=3, stream=stream) as reporter:
            _stalled_here(1.2)  # four periods: still a single report
            reporter.progress("step 7")
            _stalled_here(0.8)
    text = log.read_text()
    reports = text.split("rank 3: no progress for ")
    assert len(reports) == 3, text
    assert "(last: start)" in reports[1] and "(last: step 7)" in reports[2]
    for report in reports[1:]:
        assert "_stalled_here" in report and "test_watchdog.py" in report  # the main thread's stack


def test_steady_progress_prints_nothing_and_off_means_off(tmp_path):
    log = tmp_path / "stderr"
    with open(log, "w") as stream:
        with StallReporter(2.0, rank=0, stream=stream) as reporter:
            for step in range(8):
                time.sleep(0.05)
                reporter.progress(f"step {step}")
        with StallReporter(None, rank=0, stream=stream):
            time.sleep(0.3)
    assert log.read_text() == ""
