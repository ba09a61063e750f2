"""Who am I in the job? Rank, world size and local rank from whichever launcher started us.

Pure environment reading, no DeepSpeed import, so `--dry-run` and the tests can use it cheaply.

| launcher            | variables read                                             |
|---------------------|------------------------------------------------------------|
| deepspeed, torchrun | RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT)   |
| SLURM srun          | SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST |
| OpenMPI mpirun      | OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK |
| plain python        | nothing: one process, rank 0 of 1                          |
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from andy_dist import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, as `scontrol show hostnames` prints it first (asked when it is on
    PATH): 'gpu[03-05,07],cpu1' -> 'gpu03', 'node[01-04]-ib' -> 'node01-ib', 'a[1-2]b[3-4]' -> 'a1b3'."""
    if shutil.which("scontrol"):
        try:
            shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=30)
            hosts = shown.stdout.split()
            if shown.returncode == 0 and hosts:
                return hosts[0]
        except (OSError, subprocess.TimeoutExpired):
            pass  # read the list ourselves
    first = re.match(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist.strip())  # the list's first item
    if not first or not re.fullmatch(r"[^\[\]]*(\[[\w,-]+\][^\[\]]*)*", first.group(0)):
        raise UserError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}; export MASTER_ADDR yourself")
    # Each bracket gives its first number, written as it stands (zero padding kept), suffixes stay.
    return re.sub(r"\[([^\],-]+)[^\]]*\]", lambda m: m.group(1), first.group(0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment. Does not modify it (see `export`)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        if "SLURM_PROCID" in env and env.get("SLURM_PROCID") == env.get("RANK") and "TORCHELASTIC_RUN_ID" not in env:
            launcher = "srun"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "srun"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "mpirun"
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
    else:
        launcher, rank, world, local = "python", 0, 1, 0
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world}; check the launcher's environment")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif launcher == "srun" and "SLURM_JOB_NODELIST" in env:
        addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    elif world == 1:
        addr = "127.0.0.1"
    else:
        raise UserError(f"{launcher} started {world} processes but MASTER_ADDR is not set; "
                        f"export MASTER_ADDR (the first node's address) and MASTER_PORT")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else (29500 if world > 1 else 0)
    return DistEnv(rank, world, local, launcher, addr, port)


def export(dist: DistEnv) -> None:
    """Write the torch.distributed variables for launchers (srun, mpirun, python) that do not set them."""
    port = dist.master_port or free_port()
    os.environ.update({
        "RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
        "MASTER_ADDR": dist.master_addr, "MASTER_PORT": str(port),
    })


def accelerator(env: Mapping[str, str] | None = None) -> str:
    """"cuda" or "cpu": CUDA when present, unless DS_ACCELERATOR=cpu asks DeepSpeed for the CPU.

    DeepSpeed and the run must agree: a CPU accelerator with a NCCL process group fails at the
    first broadcast ("No backend type associated with device type cpu").
    """
    import torch

    env = os.environ if env is None else env
    if env.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"
