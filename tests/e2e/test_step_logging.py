"""What the trainer logs of each step, read from a real run (one process, tiny model, fp32 ZeRO-0):

  * train/lr is the rate the step trained at, the closed form of linear warmup then cosine for every
    step k of a 40-step run (warmup 10, decay to step 40); the optimizer saved at steps 10, 20, 30, 40
    holds that same rate (nothing changes it after the step);
  * train/grad_norm is a finite norm on every step (it used to be NaN for fp32 ZeRO-0);
  * train/skipped_steps and train/overflow_skips are logged apart, both 0 in a healthy run.
"""

import math

import pytest
import torch

from tests.launching import metrics, train

pytestmark = [pytest.mark.slow]

PEAK, WARMUP, STEPS, FLOOR = 2e-3, 10, 40, 0.1


def closed_form(k: int) -> float:
    if k <= WARMUP:
        return PEAK * k / WARMUP
    return PEAK * (FLOOR + (1 - FLOOR) * (1 + math.cos(math.pi * (k - WARMUP) / (STEPS - WARMUP))) / 2)


@pytest.fixture(scope="module")
def run(train_shards, tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("step_logging") / "run"
    train("python", ["--ds_config", "ds_configs/tiny.json", "--data", train_shards, "--tokenizer", tokenizer_path,
                     "--out", out, "--max-steps", STEPS, "model.vocab_size=2000", "precision=fp32", "zero_stage=0",
                     f"lr={PEAK}", f"warmup_steps={WARMUP}", f"lr_decay_steps={STEPS}", f"min_lr_ratio={FLOOR}",
                     "micro_batch_size=8", "global_batch_size=32", "log_interval=1", "save_interval=10",
                     "keep_last=4", "eval_interval=1000", "sample_prompts=[]", "--wandb", "disabled"], nproc=1)
    return out


def test_every_step_trains_at_the_closed_form_learning_rate(run):
    logged = {m["step"]: m for m in metrics(run) if "train/loss" in m}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for k, row in logged.items():
        assert row["train/lr"] == pytest.approx(closed_form(k), rel=1e-9), k
    for k in (10, 20, 30, 40):
        states = torch.load(run / "checkpoints" / f"step-{k:06d}" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        rates = [group["lr"] for group in states["optimizer"]["param_groups"]]
        assert rates == [pytest.approx(closed_form(k), rel=1e-9)] * 2, k  # both groups (decayed or not)


def test_gradient_norm_and_skip_counters_are_logged_every_step(run):
    logged = [m for m in metrics(run) if "train/loss" in m]
    assert all(math.isfinite(m["train/grad_norm"]) and m["train/grad_norm"] > 0 for m in logged)
    assert all(m["train/skipped_steps"] == 0 and m["train/overflow_skips"] == 0 for m in logged)


def test_a_run_without_warmup_starts_at_the_peak_of_its_cosine(train_shards, tokenizer_path, tmp_path):
    """warmup_steps=0 is a schedule like any other (DeepSpeed's scheduler used to die on it with a traceback)."""
    out = tmp_path / "run"
    train("python", ["--ds_config", "ds_configs/tiny.json", "--data", train_shards, "--tokenizer", tokenizer_path,
                     "--out", out, "--max-steps", 3, "model.vocab_size=2000", f"lr={PEAK}", "warmup_steps=0",
                     "lr_decay_steps=20", "min_lr_ratio=0", "micro_batch_size=8", "global_batch_size=32",
                     "log_interval=1", "eval_interval=1000", "sample_prompts=[]", "--wandb", "disabled"], nproc=1)
    rates = [m["train/lr"] for m in metrics(out) if "train/loss" in m]
    assert rates == pytest.approx([PEAK * (1 + math.cos(math.pi * k / 20)) / 2 for k in (1, 2, 3)], rel=1e-9)
