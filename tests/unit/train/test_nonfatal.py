"""Monitoring failures are one warning line; interrupts still interrupt."""

import io

import pytest

from andy_dist.train.nonfatal import nonfatal


def test_an_error_becomes_one_line_naming_what_when_and_where():
    stream = io.StringIO()
    with nonfatal("the training samples", 40, stream=stream):
        raise IndexError("OUT_OF_RANGE:\n piece id is out of range.")
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("warning: the training samples at step 40 failed, training goes on: IndexError: "
                           "OUT_OF_RANGE: piece id is out of range. (test_nonfatal.py:")


def test_nothing_is_printed_without_an_error_and_interrupts_pass_through():
    stream = io.StringIO()
    with nonfatal("logging", 1, stream=stream):
        pass
    assert stream.getvalue() == ""
    with pytest.raises(KeyboardInterrupt), nonfatal("logging", 1, stream=stream):
        raise KeyboardInterrupt
