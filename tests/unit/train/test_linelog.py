"""metrics.jsonl on a full disk: the run keeps training, held lines reach the file once space returns."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.launching import ROOT

# A file size limit (RLIMIT_FSIZE) fails writes past it with EFBIG, as a full disk fails them with
# ENOSPC; Python ignores SIGXFSZ, so the write raises OSError. Run in a child: the limit is per process.
_SCRIPT = """
import io, json, resource, sys
from andy_dist.train.metrics import MetricsLogger
run = sys.argv[1]
console = io.StringIO()
logger = MetricsLogger(run, {"x": 1}, is_main=True, wandb_mode="disabled", console_stream=console)
logger.log(1, {"train/loss": 1.0})
size = len(open(run + "/metrics.jsonl").read())
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 60, hard))  # room for part of one more line
for step in range(2, 6):
    logger.log(step, {"train/loss": float(step), "train/lr": 3e-4})
held = logger._metrics.pending_bytes
on_disk_while_full = open(run + "/metrics.jsonl").read()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
logger.log(6, {"train/loss": 6.0})
logger.close()
print(json.dumps({"messages": console.getvalue().splitlines(), "held": held, "while_full": on_disk_while_full}))
"""


def test_full_disk_holds_metrics_lines_and_writes_them_in_order_later(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(run)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["held"] > 0
    assert report["while_full"].count("\n") <= 2  # some steps could not be written
    warnings = [m for m in report["messages"] if "cannot write" in m]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "free space" in warnings[0]
    assert any("writing again" in m for m in report["messages"])
    # Every line is whole, strict JSON, and the steps are all there in order.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_lines_still_held_at_close_are_reported(tmp_path):
    from andy_dist.train.linelog import LineLog

    messages: list[str] = []
    log = LineLog(tmp_path / "x.jsonl", messages.append, max_pending_bytes=10)
    log.write("0123456789-too-long")  # bigger than the memory bound: counted as lost, not held
    log.close()
    assert (tmp_path / "x.jsonl").read_text() == ""
    assert messages == [f"warning: {tmp_path / 'x.jsonl'} is missing its last 1 lines (the disk stayed full)"]
    log.close()  # twice is fine
