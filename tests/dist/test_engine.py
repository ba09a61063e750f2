"""Engine numerics on real DeepSpeed engines: gradient accumulation over variable-length batches, the
gradient norm each step reports, and the skip of a non-finite step, on every ZeRO stage."""

import json
import math
import subprocess

import pytest

from tests.launching import ROOT, cpu_env, launcher_command

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("launcher,nproc", [("python", 1), ("torchrun", 2)])
def test_accumulation_gives_the_gradient_of_the_whole_batch(launcher, nproc, tmp_path):
    """1 rank: 4 micro-batches x 2 == 1 x 8. 2 ranks: 4 x 1 per rank == 1 x 4 per rank. Both == plain PyTorch."""
    out = tmp_path / "result.json"
    command = launcher_command(launcher, ROOT / "tests" / "dist" / "scripts" / "grad_accum.py", nproc) + [str(out)]
    result = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    diffs = json.loads(out.read_text())
    assert diffs["accumulated"] < 1e-6 * max(1.0, diffs["reference_scale"]), diffs
    assert diffs["whole"] < 1e-6 * max(1.0, diffs["reference_scale"]), diffs
    # Averaging per-micro-batch means weights short and long sequences wrongly: the check must see that.
    assert diffs["per_micro_mean"] > 100 * max(diffs["accumulated"], 1e-9), diffs


@pytest.fixture(scope="module")
def step_reports(tmp_path_factory) -> dict:
    """tests/dist/scripts/grad_norm.py on 2 ranks: three steps on every ZeRO stage 0-3 x fp32/bf16."""
    out = tmp_path_factory.mktemp("grad_norm") / "result.json"
    command = launcher_command("torchrun", ROOT / "tests" / "dist" / "scripts" / "grad_norm.py", 2) + [str(out)]
    result = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_the_logged_gradient_norm_is_the_whole_batch_norm_before_clipping(step_reports):
    """Every stage x precision reports the global norm of the whole batch's gradient as a plain loop computes
    it (clipping at 0.05 bites: a clipped or per-rank norm would differ by 8x or 1.4x), never NaN."""
    reference = step_reports["reference_norm"]
    assert reference > 0.2  # well above the clipping threshold
    for row in step_reports["rows"]:
        tolerance = 1e-5 if row["precision"] == "fp32" else 2e-2  # bf16 rounds the weights and activations
        step = row["ordinary"]
        assert step["grad_norm"] == pytest.approx(reference, rel=tolerance), row
        assert not step["skipped"] and not step["overflow"] and not step["weights_unchanged"], row


def test_a_non_finite_loss_or_gradient_skips_the_step_on_every_stage(step_reports):
    """A NaN loss, and a finite loss with an overflowing gradient: both are skipped steps (towards
    max_bad_steps), neither is counted as an fp16 loss-scale overflow, and the weights stay as they were,
    whether the step runner skipped on the device (ZeRO 0-2) or DeepSpeed did (ZeRO-3)."""
    for row in step_reports["rows"]:
        for poisoned in ("nan_loss", "inf_grad"):
            step = row[poisoned]
            assert step["skipped"] and not step["overflow"] and step["weights_unchanged"], (poisoned, row)
        assert math.isfinite(row["inf_grad"]["loss"]) and not math.isfinite(row["inf_grad"]["grad_norm"]), row
