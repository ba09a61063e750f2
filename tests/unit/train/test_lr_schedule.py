"""The learning-rate schedule in closed form (andy_dist.train.lr_schedule); a real run's rates are checked
against it in tests/e2e/test_step_logging.py."""

import math

import pytest

from andy_dist.config import ConfigError
from andy_dist.train.lr_schedule import LrSchedule
from andy_dist.train.settings import load_train_config


def test_linear_warmup_starts_above_zero_and_peaks_at_its_last_step():
    schedule = LrSchedule(peak=1e-3, warmup_steps=10, total_steps=40, min_ratio=0.1)
    assert schedule(1) == pytest.approx(1e-4)  # the first step trains
    assert [schedule(k) for k in range(1, 11)] == pytest.approx([1e-4 * k for k in range(1, 11)])
    assert max(schedule(k) for k in range(1, 41)) == schedule(10) == pytest.approx(1e-3)


def test_cosine_decays_to_the_floor_at_the_last_step_and_stays_there():
    schedule = LrSchedule(peak=1e-3, warmup_steps=10, total_steps=40, min_ratio=0.1)
    rates = [schedule(k) for k in range(10, 41)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert schedule(25) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the cosine's midpoint
    assert schedule(40) == schedule(41) == schedule(10**6) == pytest.approx(1e-4)


def test_no_warmup_is_supported():
    schedule = LrSchedule(peak=2e-3, warmup_steps=0, total_steps=20, min_ratio=0.0)
    assert schedule(1) == pytest.approx(2e-3 * (1 + math.cos(math.pi / 20)) / 2)
    assert schedule(20) == pytest.approx(0.0)
    assert load_train_config(overrides=["warmup_steps=0"]).schedule.warmup_steps == 0
    with pytest.raises(ConfigError, match="warmup_steps must be 0 or more"):
        load_train_config(overrides=["warmup_steps=-1"])
