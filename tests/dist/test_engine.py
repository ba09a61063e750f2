"""Engine numerics on real DeepSpeed engines: gradient accumulation over variable-length batches."""

import json
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
