"""andy_dist.cli: how a tool leaves. One that ran a process group exits with its own status, output intact.

The one-line errors of every tool (run_tool's UserError handling) are tested in tests/reliability/bad_inputs/.
"""

import subprocess
import sys

import pytest

from tests.launching import ROOT, cpu_env

_FAIL_WITH_GROUP = """
import sys, torch.distributed as dist
from andy_dist import UserError
from andy_dist.cli import mark_distributed_process, run_tool
def main():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    mark_distributed_process()
    if sys.argv[1] == "user":
        raise UserError("bad setting x=1; use x=2")
    if sys.argv[1] == "bug":
        raise RuntimeError("unexpected")
    dist.destroy_process_group()
    print("trained; checkpoints in runs/x", end="")  # no newline: still in stdout's buffer at exit
    print("a warning", end="", file=sys.stderr)
    return 0
run_tool(main)
"""


@pytest.mark.parametrize("kind,code,says", [("user", 2, "error: bad setting x=1; use x=2"),
                                            ("bug", 1, "RuntimeError: unexpected"),
                                            ("ok", 0, "a warning")])
def test_a_process_that_ran_a_process_group_exits_with_its_own_status(kind, code, says):
    """Such a process leaves without interpreter teardown (which can abort around gloo's threads): its exit
    status is the tool's own, after an error or a success, and its buffered output is not lost."""
    result = subprocess.run([sys.executable, "-c", _FAIL_WITH_GROUP, kind], cwd=ROOT, env=cpu_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    if kind == "ok":
        assert result.stdout == "trained; checkpoints in runs/x"
