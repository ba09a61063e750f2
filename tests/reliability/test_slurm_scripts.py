"""The SLURM job scripts' logic (launch/slurm/*.sbatch, job_steps.sh) under stand-ins for srun and scontrol
(tests/reliability/scripts/): a failing dry run stops the job, only a pre-emption (exit 75) is requeued, never
a crash or a task the OOM killer ended, and a node list with suffixes gives the right master. The requeue
after a real pre-emption checkpoint is tests/reliability/test_faults.py::test_job_script_requeues_...
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launching import ROOT, cpu_env, free_port

pytestmark = [pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "scripts"
SLURM = ROOT / "launch" / "slurm"


def job_env(tmp_path: Path, **extra: str) -> dict:
    settings = {"PATH": f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}", "FAKE_SRUN_NTASKS": "1",
                "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"), "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
                "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(ROOT),
                "MASTER_PORT": str(free_port()), "DS_CONFIG": "ds_configs/tiny.json", "OUT": str(tmp_path / "run"),
                "ANDY_CACHE_DIR": str(tmp_path / "cache")}
    return cpu_env(**{**settings, **extra})


def run_job(script: str, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def calls(tmp_path: Path, tool: str) -> list[str]:
    path = tmp_path / f"{tool}.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("script", ["train_1node.sbatch", "train_multinode.sbatch"])
def test_a_failing_dry_run_stops_the_job(script, tmp_path):
    """A ds_config that does not exist: the dry run exits 2; the job stops with that status
    and starts no training (a pipe to `head` used to hide the status)."""
    result = run_job(script, job_env(tmp_path, DS_CONFIG="ds_configs/none.json", DATA=str(tmp_path)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the dry run failed (exit status 2)" in result.stderr
    assert "ds_configs/none.json does not exist" in result.stdout + result.stderr
    assert [c for c in calls(tmp_path, "srun") if "--dry-run" not in c] == []
    assert not any("requeue" in c for c in calls(tmp_path, "scontrol"))


def test_a_crash_is_not_requeued_and_a_suffixed_node_list_names_the_master(tmp_path):
    """node[01-04]-ib: the master is node01-ib (what scontrol prints first). The training then stops on a
    user error (no shards, exit 2): the job ends with that status and is not requeued."""
    env = job_env(tmp_path, SLURM_JOB_NODELIST="node[01-04]-ib", DATA=str(tmp_path / "no-shards"))
    env.pop("MASTER_PORT")
    result = run_job("train_multinode.sbatch", env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "master node01-ib:29500" in result.stdout
    assert "training ended with exit status 2: not requeued" in result.stderr
    assert "show hostnames node[01-04]-ib" in calls(tmp_path, "scontrol")
    assert not any("requeue" in c for c in calls(tmp_path, "scontrol"))
    assert any("--kill-on-bad-exit=1" in c for c in calls(tmp_path, "srun"))


def _training_tasks(job_pid: int) -> list[int]:
    """Pids of the job's training tasks (not the dry run, not srun): python processes of launch/train.py --resume."""
    found, todo = [], [job_pid]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            todo.append(child)
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            is_python = Path(cmdline[0].decode(errors="replace")).name.startswith("python")
            if is_python and any(part.endswith(b"train.py") for part in cmdline) and b"--resume" in cmdline:
                found.append(child)
    return found


def test_a_task_killed_by_the_oom_killer_is_not_requeued(train_shards, tokenizer_path, tmp_path):
    """SIGKILL to the training task (what the OOM killer sends; srun then reports 128 + 9): the job ends
    with 137 and is not requeued, so it cannot come back and be killed again, forever."""
    env = job_env(tmp_path, DATA=str(train_shards))
    job = subprocess.Popen(["bash", str(SLURM / "train_1node.sbatch"), "--tokenizer", str(tokenizer_path),
                            "model.vocab_size=2000", "--wandb", "disabled"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, tasks = time.monotonic() + 120, []
        while not tasks and time.monotonic() < deadline and job.poll() is None:
            tasks = _training_tasks(job.pid)
            time.sleep(0.02)
        assert tasks, "the training tasks never started"
        # At once, long before DeepSpeed starts (a kill while it builds its op would leave a build lock).
        os.kill(tasks[0], signal.SIGKILL)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 137, out + err
    assert "training ended with exit status 137: not requeued" in err
    assert not any("requeue" in c for c in calls(tmp_path, "scontrol"))


def test_the_scripts_set_the_nccl_error_handling_variable_current_torch_reads():
    for script in ("train_1node.sbatch", "train_multinode.sbatch"):
        text = (SLURM / script).read_text()
        assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
        assert not re.search(r"(?<!TORCH_)NCCL_ASYNC_ERROR_HANDLING", text)  # the old name is ignored
