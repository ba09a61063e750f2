"""tools/report.py: missing or broken run folders and bad output paths; a failed run keeps the
previous report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    a_file,
    check_in_a_real_process,
    check_in_this_process,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


def _report(tmp, run, *extra):
    out = tmp / "out" / "report.html"
    return "report", [run, "-o", out, *extra], out


def _report_case(tmp, run, needles, *extra):
    tool, args, out = _report(tmp, run, *extra)
    return tool, args, needles, [out, out.parent / "report_files"], {}


def _run_copy(w, tmp) -> Path:
    run = tmp / "myrun"
    run.mkdir()
    for name in ("metrics.jsonl", "config.json", "samples.jsonl"):
        if (w.run / name).exists():
            shutil.copy(w.run / name, run / name)
    return run


@case
def report_missing_run(w, tmp):
    return _report_case(tmp, tmp / "nope", ["nope", "no such run directory"])


@case
def report_run_is_a_file(w, tmp):
    return _report_case(tmp, a_file(tmp), ["a_file.txt"])


@case
def report_no_metrics(w, tmp):
    (tmp / "myrun").mkdir()
    return _report_case(tmp, tmp / "myrun", ["myrun", "no metrics.jsonl"])


@case
def report_empty_metrics(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "metrics.jsonl", b"")
    return _report_case(tmp, run, ["metrics.jsonl", "no metrics"])


@case
def report_garbage_metrics(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "metrics.jsonl", GARBAGE + b"\n" + GARBAGE)
    return _report_case(tmp, run, ["metrics.jsonl"])


@case
def report_metrics_without_step(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "metrics.jsonl", '{"loss": 1.0}\n')
    return _report_case(tmp, run, ["metrics.jsonl", "'step'"])


@case
def report_garbage_config(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "config.json", GARBAGE)
    return _report_case(tmp, run, ["config.json"])


@case
def report_output_is_a_directory(w, tmp):
    run = _run_copy(w, tmp)
    (tmp / "outdir").mkdir()
    return "report", [run, "-o", tmp / "outdir"], ["outdir", "directory"], [], {tmp / "outdir": {}}


@case
def report_output_under_a_file(w, tmp):
    run = _run_copy(w, tmp)
    return "report", [run, "-o", a_file(tmp) / "report.html"], ["a_file.txt"], [], {}


@case
def report_failure_keeps_previous(w, tmp):
    out = write(tmp / "out" / "report.html", "<p>previous report</p>")
    (tmp / "myrun").mkdir()
    return "report", [tmp / "myrun", "-o", out], ["no metrics.jsonl"], [], {out: b"<p>previous report</p>"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["report_no_metrics"], "report", world, tmp_path)
