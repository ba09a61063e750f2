"""The speed figures of a training log line (andy_dist.train.throughput) against a clock the test sets.

Each window runs from one log line to the next on the wall clock: the steps, the waits for data and
everything else between them (an evaluation, a checkpoint). The trainer used to time the steps alone
and call that tokens/s; here a window with an evaluation in it shows the difference.
"""

import pytest

from andy_dist.config import SIZES
from andy_dist.train.flops import MfuMeter, flops_per_token
from andy_dist.train.throughput import SpeedWindow


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_wall_clock_compute_and_data_wait_over_a_window_with_an_evaluation():
    clock = Clock()
    speed = SpeedWindow(world_size=2, total_steps=10, clock=clock)
    clock.now = 150.0  # set-up (engine, data) before training starts is not part of any window
    speed.start()
    for _ in range(2):  # two steps of 1,000 tokens: 0.5 s waiting for the batch, 1.5 s inside the step
        speed.waited(0.5)
        clock.now += 0.5
        speed.stepped(1000, 1.5)
        clock.now += 1.5
    clock.now += 6.0  # an evaluation and a checkpoint
    figures = speed.read(2)
    assert figures["train/tokens_per_s"] == pytest.approx(2000 / 10.0)  # everything between the log lines
    assert figures["train/tokens_per_s_per_rank"] == pytest.approx(100.0)
    assert figures["train/tokens_per_s_compute"] == pytest.approx(2000 / 3.0)  # the steps alone
    assert figures["train/data_wait_fraction"] == pytest.approx(1.0 / 10.0)
    assert figures["time/eta_s"] == pytest.approx(8 * 5.0)  # 8 steps left at 10 s of wall clock per 2 steps
    assert figures["train/mfu"] is None and figures["train/mfu_compute"] is None  # no meter: "n/a"

    speed.stepped(500, 1.0)  # the next window starts at the read: the evaluation is not counted twice
    clock.now += 1.0
    figures = speed.read(3)
    assert figures["train/tokens_per_s"] == pytest.approx(500.0)
    assert figures["train/data_wait_fraction"] == 0.0
    assert figures["time/eta_s"] == pytest.approx(7 * 11.0 / 3)  # since training started, evaluation included


def test_mfu_counts_each_sample_at_its_own_length():
    cfg = SIZES["tiny"]
    clock = Clock()
    meter = MfuMeter(cfg, None, "cpu", "fp32", peak=1e12)
    speed = SpeedWindow(world_size=2, mfu_meter=meter, clock=clock)
    speed.start()
    lengths = [16] * 30 + [512] * 2  # a batch of short samples and two long ones
    speed.stepped(sum(lengths), 2.0, meter.step_flops(lengths))
    clock.now += 4.0
    figures = speed.read(1)
    flops = 30 * 16 * flops_per_token(cfg, 16) + 2 * 512 * flops_per_token(cfg, 512)
    assert figures["train/mfu"] == pytest.approx(flops / 4.0 / (2 * 1e12))
    assert figures["train/mfu_compute"] == pytest.approx(flops / 2.0 / (2 * 1e12))
    # Counting every token at the longest length in the data (what the trainer used to do) overstates it.
    assert sum(lengths) * flops_per_token(cfg, 512) > flops
    assert speed.read(2)["train/mfu"] is None  # an empty window has no rate
