"""End-to-end training on 2 CPU ranks through the real launchers (deepspeed, torchrun, plain python).

A tiny model (vocab 2,000) on real shards of 64-token samples; every step is logged so losses can be
compared step by step. The schedule length is fixed (lr_decay_steps) so stopping early does not
change the learning rates of the steps that follow. Runs shared with other test modules (ZeRO stages,
bf16, whole epochs, early stopping) are in conftest.py.
"""

import json
import math
import shutil

import pytest
import torch

from andy_dist.infer.export import load_checkpoint_weights
from tests.e2e.runs import common
from tests.launching import cpu_env, losses, metrics, traced_samples, train

pytestmark = [pytest.mark.dist, pytest.mark.slow]


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


def test_early_stopping_keeps_the_best_checkpoint_not_the_last(early_stop_run):
    """With patience 1 and an impossible improvement margin, the second evaluation stops the run; `best/`
    holds the weights of step 2, the last checkpoint those of step 4 (bf16, ZeRO-3)."""
    out = early_stop_run.out
    assert "early stopping at step 4" in early_stop_run.stdout
    assert max(losses(out)) == 4
    ckpt = early_stop_run.checkpoints
    state = json.loads((ckpt / "step-000004" / "andy_meta.json").read_text())["trainer_state"]
    assert state["early_stopped"] and state["bad_evals"] == 1 and state["best_step"] == 2
    best, best_meta = load_checkpoint_weights(ckpt, "best")
    at_2, _ = load_checkpoint_weights(ckpt, "step-000002")
    last, last_meta = load_checkpoint_weights(ckpt, "latest")
    assert best_meta["step"] == 2 and last_meta["tag"] == "step-000004" and last_meta["step"] == 4
    assert best.keys() == at_2.keys() == last.keys()
    assert all(torch.equal(best[name], at_2[name]) for name in best)  # best is step 2's model...
    changed = [name for name in best if not torch.equal(best[name], last[name])]
    assert len(changed) == len(best), set(best) - set(changed)  # ...and every tensor moved by step 4


def test_whole_epochs_with_max_epochs_validate_once_per_epoch_end(epochs_run):
    """ds_configs/tiny.json as shipped (bf16, ZeRO-1) for max_epochs=3 on shards of 3 steps per epoch, with
    eval_interval = one epoch: each epoch end is validated once, not twice (a second evaluation of the same
    weights counted as "no improvement" and spent patience), and the run ends after exactly three epochs."""
    epoch = epochs_run.steps_per_epoch
    logged = metrics(epochs_run.out)
    assert sorted(losses(epochs_run.out)) == list(range(1, 3 * epoch + 1))
    assert [m["step"] for m in logged if "val/loss" in m] == [epoch, 2 * epoch, 3 * epoch]
    assert (epochs_run.checkpoints / "latest").read_text().strip() == f"step-{3 * epoch:06d}"
    state = json.loads((epochs_run.checkpoints / f"step-{3 * epoch:06d}" / "andy_meta.json").read_text())
    assert state["precision"] == "bf16" and state["zero_stage"] == 1  # the shipped config, as it is
    assert state["trainer_state"]["data"]["epoch"] == 3 and not state["trainer_state"]["early_stopped"]
    assert state["trainer_state"]["bad_evals"] == 0  # the loss fell at every epoch end
    assert "early stopping" not in epochs_run.stdout


def test_crossing_epoch_boundaries_with_patience_1_keeps_training(cross_epochs_run):
    """max_steps two epochs and one step long, eval_interval = one epoch, patience 1 and a falling loss: the
    run goes through both epoch boundaries to its last step (it used to stop at the first one, whose
    validation ran twice and saw no improvement the second time)."""
    epoch = cross_epochs_run.steps_per_epoch
    assert "early stopping" not in cross_epochs_run.stdout
    assert max(losses(cross_epochs_run.out)) == 2 * epoch + 1
    evaluations = [m for m in metrics(cross_epochs_run.out) if "val/loss" in m]
    assert [m["step"] for m in evaluations] == [epoch, 2 * epoch, 2 * epoch + 1]
    assert all(m["val/bad_evals"] == 0 for m in evaluations)
