"""End-to-end training on 2 CPU ranks through the real launchers (deepspeed, torchrun, plain python).

A tiny model (vocab 2,000) on real shards of 64-token samples; every step is logged so losses can be
compared step by step. The schedule length is fixed (lr_decay_steps) so stopping early does not
change the learning rates of the steps that follow.
"""

import json
import math
import shutil

import pytest

from tests.launching import cpu_env, losses, metrics, traced_samples, train

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def common(shards, tokenizer_path, out, *extra):
    return ["--ds_config", "ds_configs/tiny.json", "--data", shards, "--tokenizer", tokenizer_path, "--out", out,
            "model.vocab_size=2000", "precision=fp32", "lr=2e-3", "warmup_steps=4", "lr_decay_steps=16",
            "log_interval=1", "sample_prompts=[]", *extra]


@pytest.fixture(scope="module")
def straight(train_shards, tokenizer_path, tmp_path_factory):
    """16 steps in one go through the deepspeed launcher: the reference run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    trace = out.parent / "trace"
    train("deepspeed", common(train_shards, tokenizer_path, out, "--max-steps", 16, "eval_interval=8",
                              "save_interval=8", "zero_stage=1"), env=cpu_env(ANDY_TRACE_SAMPLES=str(trace)))
    return out, trace


def test_trains_with_falling_loss_validates_keeps_best_and_checkpoints(straight):
    out, _ = straight
    steps = losses(out)
    assert sorted(steps) == list(range(1, 17))
    assert sum(steps[s] for s in (14, 15, 16)) / 3 < sum(steps[s] for s in (1, 2, 3)) / 3 - 0.3
    evals = [m for m in metrics(out) if "val/loss" in m]
    assert [m["step"] for m in evals] == [8, 16]
    assert evals[1]["val/loss"] < evals[0]["val/loss"]
    assert evals[1]["val/best_loss"] == evals[1]["val/loss"]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-000016"
    for tag in ("step-000008", "step-000016", "best"):
        meta = json.loads((ckpt / tag / "andy_meta.json").read_text())
        assert meta["world_size"] == 2 and meta["global_batch_size"] == 32
    assert json.loads((ckpt / "best" / "andy_meta.json").read_text())["trainer_state"]["step"] == 16
    assert (ckpt / "tokenizer.model").exists()


def test_resume_is_exact(straight, train_shards, tokenizer_path, tmp_path):
    """8 steps, stop, --resume for 8 more == 16 straight: same losses (1e-6 relative), same samples."""
    reference, reference_trace = straight
    out, trace = tmp_path / "run", tmp_path / "trace"
    args = common(train_shards, tokenizer_path, out, "eval_interval=8", "save_interval=8", "zero_stage=1")
    env = cpu_env(ANDY_TRACE_SAMPLES=str(trace))
    train("deepspeed", args + ["--max-steps", 8], env=env)
    resumed = train("deepspeed", args + ["--max-steps", 16, "--resume"], env=env)
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    got, want = losses(out), losses(reference)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])
    for rank in (0, 1):
        assert traced_samples(trace, rank) == traced_samples(reference_trace, rank)


@pytest.fixture(scope="module")
def zero_runs(train_shards, tokenizer_path, tmp_path_factory):
    """The same 12 steps (fp32, no dropout) under ZeRO stages 0-3, launched by torchrun."""
    runs = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        train("torchrun", common(train_shards, tokenizer_path, out, "--max-steps", 12, f"zero_stage={stage}",
                                 "model.dropout=0.0", "save_interval=6", "eval_interval=100"))
        runs[stage] = out
    return runs


def test_zero_stages_agree(zero_runs):
    """Stages 0-3 partition state differently but compute the same maths: losses agree within 1e-4 relative."""
    reference = losses(zero_runs[0])
    assert sorted(reference) == list(range(1, 13))
    for stage in (1, 2, 3):
        got = losses(zero_runs[stage])
        for step, value in reference.items():
            assert math.isclose(got[step], value, rel_tol=1e-4), (stage, step, got[step], value)


def test_resume_on_a_different_number_of_ranks(zero_runs, train_shards, tokenizer_path, tmp_path):
    """A 2-rank ZeRO-1 checkpoint resumes on 1 process at the same global batch (16 x 2 accumulation)."""
    source = zero_runs[1]
    out = tmp_path / "run"
    shutil.copytree(source / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "latest").write_text("step-000006\n")
    result = train("python", common(train_shards, tokenizer_path, out, "--max-steps", 12, "--resume", "zero_stage=1",
                                    "model.dropout=0.0", "save_interval=6", "eval_interval=100"))
    assert "universal checkpoint, 2 -> 1 ranks" in result.stdout
    got, want = losses(out), losses(source)
    assert sorted(got) == list(range(7, 13))
    for step in range(7, 13):
        assert math.isclose(got[step], want[step], rel_tol=1e-4), (step, got[step], want[step])


def test_early_stopping(train_shards, tokenizer_path, tmp_path):
    """With patience 1 and an impossible improvement margin, the second evaluation stops the run."""
    out = tmp_path / "run"
    result = train("torchrun", common(train_shards, tokenizer_path, out, "--max-steps", 40, "eval_interval=2",
                                      "patience=1", "min_delta=100", "save_interval=100"))
    assert "early stopping at step 4" in result.stdout
    assert max(losses(out)) == 4
    state = json.loads((out / "checkpoints" / "step-000004" / "andy_meta.json").read_text())["trainer_state"]
    assert state["early_stopped"] and state["bad_evals"] == 1 and state["best_step"] == 2
