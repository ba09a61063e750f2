"""Two "nodes" launched for real on this machine: two torchrun agents (`--nnodes 2 --nproc_per_node 1
--rdzv-backend c10d`), each with its own environment and node-local cache folder, training from an HTTP URL
served by Python's http.server, killed and resumed. Compared with one node of 2 ranks reading the same
shards from local disk, uninterrupted: the same losses at every step and the same samples on every rank.

The local run also starts with a stale torch-extension build lock in its extension folder (a copy), the
trap that used to hang every later run on a machine: it must be removed with one line, and the run go on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from andy_dist.train.build_lock import extensions_root
from tests.launching import ROOT, cpu_env, free_port, losses, metrics, traced_samples, train
from tests.servers import FileServer

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS, SAVE_INTERVAL = 10, 4


def training_args(data, tokenizer_path, out, *extra) -> list[str]:
    return ["--ds_config", "ds_configs/tiny.json", "--data", str(data), "--tokenizer", str(tokenizer_path),
            "--out", str(out), "model.vocab_size=2000", "precision=fp32", "zero_stage=1", "lr=2e-3",
            "warmup_steps=4", "lr_decay_steps=16", "log_interval=1", "sample_prompts=[]", "eval_interval=100",
            f"save_interval={SAVE_INTERVAL}", "keep_last=10", "--wandb", "disabled", "--max-steps", str(STEPS),
            *map(str, extra)]


@pytest.fixture(scope="module")
def shard_set(builtin_corpus, tokenizer_path, tmp_path_factory) -> Path:
    """The built-in corpus in four train shards and one validation shard."""
    from andy_dist.data.shard_writer import write_shards

    out = tmp_path_factory.mktemp("multinode") / "stdlib"
    write_shards([str(builtin_corpus)], tokenizer_path, out, val_fraction=0.05, shard_size_mb=0.2, workers=1,
                 max_seq_len=64, progress=False)
    return out


def extensions_with_a_stale_lock(folder: Path) -> tuple[Path, Path]:
    """A copy of DeepSpeed's built communication op (if this machine has one) whose build lock a job killed
    ten minutes ago left behind."""
    built = next(iter(sorted(extensions_root().glob("**/deepspeed_shm_comm"))), None)
    op = folder / "deepspeed_shm_comm"
    if built is not None and not (built / "lock").exists():
        shutil.copytree(built, op)
    op.mkdir(parents=True, exist_ok=True)
    lock = op / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 600, time.time() - 600))
    return folder, lock


@pytest.fixture(scope="module")
def reference(shard_set, tokenizer_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    extensions, lock = extensions_with_a_stale_lock(base / "torch_extensions")
    env = cpu_env(ANDY_TRACE_SAMPLES=str(base / "trace"), TORCH_EXTENSIONS_DIR=str(extensions),
                  ANDY_CACHE_DIR=str(base / "cache"))
    result = train("torchrun", training_args(shard_set, tokenizer_path, base / "run"), env=env, timeout=900)
    return base / "run", base / "trace", result, lock


def test_a_stale_build_lock_is_removed_before_it_hangs_the_run(reference):
    _, _, result, lock = reference
    removed = [line for line in result.stderr.splitlines() if line.startswith(f"removed {lock}:")]
    assert len(removed) == 1 and "no build running" in removed[0], result.stderr[-3000:]
    assert f"done: step {STEPS}" in result.stdout


class Node:
    """One torchrun agent with one process, its own cache folder and environment, in its own session."""

    def __init__(self, number: int, rendezvous: str, args: list[str], base: Path, trace: Path, log: str,
                 **env_extra: str):
        self.cache = base / f"node{number}-cache"
        env = cpu_env(ANDY_CACHE_DIR=str(self.cache), ANDY_TRACE_SAMPLES=str(trace), **env_extra)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous, "--rdzv-id", log, "--max-restarts", "0",
                   str(ROOT / "launch" / "train.py"), *args]
        self.out = open(base / f"node{number}-{log}.log", "w")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def processes(self) -> list[int]:
        """The agent and every process below it (torchrun starts its workers in sessions of their own)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                todo += map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
            except OSError:
                pass
        return found

    def kill(self) -> None:
        """The node is lost: SIGKILL to its agent and its ranks at once."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.out.close()

    def fetched(self) -> list[dict]:
        """The downloads and evictions this node's cache recorded."""
        logs = list(self.cache.glob("shards/*/.andy/fetch.log"))
        return [json.loads(line) for path in logs for line in path.read_text().splitlines()]


def _last_step(run: Path) -> int:
    try:
        return max(losses(run), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def test_two_nodes_from_a_url_kill_and_resume_exactly_like_one_local_node(reference, shard_set, tokenizer_path,
                                                                         tmp_path):
    ref_run, ref_trace, _, _ = reference
    run, trace = tmp_path / "run", tmp_path / "trace"
    nodes: list[Node] = []
    try:
        with FileServer(shard_set) as server:
            args = training_args(server.url, tokenizer_path, run)
            rendezvous = f"127.0.0.1:{free_port()}"
            # Rank 0 pauses 10 s before step 6 (the fault hook), so the kill lands after the checkpoint of
            # step 4 and before the run ends, however fast the steps are.
            stall = f"{SAVE_INTERVAL + 2}:10"
            nodes = [Node(n, rendezvous, args, tmp_path, trace, "first", ANDY_FAULT_STALL=stall) for n in (0, 1)]
            deadline = time.monotonic() + 600
            while not (_latest(run) and _last_step(run) >= SAVE_INTERVAL + 1):
                assert time.monotonic() < deadline and all(n.proc.poll() is None for n in nodes), \
                    (tmp_path / "node0-first.log").read_text()[-3000:]
                time.sleep(0.1)
            nodes[1].kill()  # a node lost mid-run: its agent and its rank
            assert nodes[0].wait(timeout=120) != 0  # the survivor's rank fails in its next collective
            killed_at = _latest(run)
            assert killed_at == f"step-{SAVE_INTERVAL:06d}" and _last_step(run) == SAVE_INTERVAL + 1
            rendezvous = f"127.0.0.1:{free_port()}"
            nodes = [Node(n, rendezvous, [*args, "--resume"], tmp_path, trace, "second") for n in (0, 1)]
            codes = [node.wait(timeout=600) for node in nodes]
            assert codes == [0, 0], (tmp_path / "node0-second.log").read_text()[-4000:]
    finally:
        for node in nodes:
            node.kill()
    log0 = (tmp_path / "node0-second.log").read_text()
    assert f"resumed from {run / 'checkpoints' / killed_at} at step {int(killed_at.split('-')[1])}" in log0

    # Exact across the kill and the two nodes: the same losses and the same samples per rank as the local run.
    got, want = losses(run), losses(ref_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])
    for rank in (0, 1):
        assert traced_samples(trace, rank) == traced_samples(ref_trace, rank)
    assert traced_samples(trace, 0)[1] != traced_samples(trace, 1)[1]  # global ranks split the data

    # One checkpoint writer (global rank 0), though both processes are local rank 0 of their node.
    logged = [m["step"] for m in metrics(run) if "train/loss" in m]
    assert logged[:SAVE_INTERVAL] == list(range(1, SAVE_INTERVAL + 1))  # each step logged once, not per node
    meta = json.loads((run / "checkpoints" / f"step-{STEPS:06d}" / "andy_meta.json").read_text())
    assert meta["world_size"] == 2 and {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                        "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(meta["files"])

    # Each node filled its own cache: every shard it read crossed the network to it once, over both runs,
    # fetched by its own rank; local rank 0 of each node prefetched.
    for number, node in enumerate(nodes):
        events = [e for e in node.fetched() if e["file"].endswith(".tar")]
        assert events and {e["rank"] for e in events} == {str(number)} and {e["local_rank"] for e in events} == {"0"}
        downloads = [e["file"] for e in events if e["event"] in ("read", "prefetch")]
        assert sorted(downloads) == sorted(set(downloads)), downloads
        assert any(e["event"] == "prefetch" for e in events)
