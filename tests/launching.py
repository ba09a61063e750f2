"""Run the real launchers (deepspeed, torchrun, plain python) on CPU ranks and read what a run wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # on a GPU machine DeepSpeed must keep its CUDA accelerator
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def launcher_command(launcher: str, script: str | Path, nproc: int = 2) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        return [exe, "--num_gpus", str(nproc), "--master_port", port, str(script)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
                str(script)]
    if launcher == "python":
        return [sys.executable, str(script)]
    raise ValueError(launcher)


def train(launcher: str, args: list[str], nproc: int = 2, timeout: int = 600, check: bool = True,
          env: dict | None = None) -> subprocess.CompletedProcess:
    command = launcher_command(launcher, ROOT / "launch" / "train.py", nproc) + [str(a) for a in args]
    result = subprocess.run(command, cwd=ROOT, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{launcher} training failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the runs in tests log every step)."""
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def traced_samples(trace_prefix: Path, rank: int) -> dict[int, list[int]]:
    path = Path(f"{trace_prefix}.rank{rank}")
    return {r["step"]: r["samples"] for r in map(json.loads, path.read_text().splitlines())}
