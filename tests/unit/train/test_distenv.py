"""Launcher environments (andy_dist.train.distenv): detection, and the dry run under the environments that
deepspeed, torchrun, srun and mpirun create."""

import subprocess
import sys

import pytest

from andy_dist import UserError
from andy_dist.train.distenv import detect, first_slurm_host
from tests.launching import ROOT, cpu_env

DEEPSPEED = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
             "CROSS_RANK": "0", "CROSS_SIZE": "1"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "job1"}
SRUN = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-06,09]", "SLURM_JOB_ID": "123"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
          "MASTER_ADDR": "10.0.0.1"}


def dry_run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--dry-run", *args], cwd=ROOT,
                          env=cpu_env(**env), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env,launcher,rank,world,local,master", [
    (DEEPSPEED, "deepspeed", 1, 2, 1, "127.0.0.1:29500"),
    (TORCHRUN, "torchrun", 5, 8, 1, "node7:29400"),
    (SRUN, "srun", 9, 16, 1, "gpu03:29500"),
    (MPIRUN, "mpirun", 2, 3, 2, "10.0.0.1:29500"),
    ({}, "python", 0, 1, 0, "127.0.0.1:0"),
])
def test_environment_detection(env, launcher, rank, world, local, master):
    dist = detect(env)
    assert (dist.launcher, dist.rank, dist.world_size, dist.local_rank) == (launcher, rank, world, local)
    assert f"{dist.master_addr}:{dist.master_port}" == master


def test_dry_run_prints_the_maths_for_each_launcher():
    out = dry_run(TORCHRUN, "--ds_config", "ds_configs/tiny.json")
    assert out.returncode == 0, out.stderr
    assert "torchrun (rank 5 of 8, local rank 1, master node7:29400)" in out.stdout
    assert "global batch    64 sequences = 8 x 1 x 8 ranks" in out.stdout
    assert "lowered from 16" in out.stdout
    out = dry_run(SRUN, "--ds_config", "ds_configs/small.json")
    assert "srun (rank 9 of 16" in out.stdout and "global batch    32 sequences = 2 x 1 x 16 ranks" in out.stdout
    out = dry_run(DEEPSPEED, "--ds_config", "ds_configs/single_gpu_8gb.json")
    assert "activation checkpointing on" in out.stdout and "global batch    8 sequences = 4 x 1 x 2 ranks" in out.stdout
    out = dry_run({}, "--ds_config", "ds_configs/medium.json")
    assert "4 x 2 x 1 ranks" in out.stdout and "bf16, ZeRO stage 2" in out.stdout


def test_dry_run_refuses_impossible_setups_in_one_line():
    out = dry_run(SRUN | {"SLURM_NTASKS": "64", "SLURM_PROCID": "0"}, "--ds_config", "ds_configs/medium.json")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "use at most 16 ranks" in out.stderr
    out = dry_run({}, "--ds_config", "ds_configs/tiny.json", "precision=fp16")
    assert out.returncode == 2 and "fp16 needs a GPU" in out.stderr
    out = dry_run({}, "--ds_config", "ds_configs/nope.json")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = dry_run({}, "--ds_config", "ds_configs/tiny.json", "learning_rate=1")
    assert out.returncode == 2 and "unknown config keys ['learning_rate']" in out.stderr


def test_bad_launcher_environments():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="outside world size"):
        detect({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a[10-12]") == "a10"


def test_first_slurm_host_keeps_suffixes_and_padding_without_scontrol(monkeypatch):
    """Without scontrol on PATH the node list is read as scontrol would expand it (issue 13: 'node[01-04]-ib'
    was read as 'node01')."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_slurm_host("node[01-04]-ib") == "node01-ib"
    assert first_slurm_host("gpu[03-05,07]-ib,cpu1") == "gpu03-ib"
    assert first_slurm_host("rack[2-3]-node[007-009]") == "rack2-node007"
    assert detect({**SRUN, "SLURM_JOB_NODELIST": "node[01-04]-ib"}).master_addr == "node01-ib"
