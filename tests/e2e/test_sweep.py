"""tools/sweep.py end to end: Optuna studies whose trials are real training runs.

Every trial is launch/train.py on the session's real shards, the tiny model with a 2,000-piece vocab,
a handful of fp32 steps, validation every 2 steps. One study runs its trials on 2 ranks through
torchrun with W&B offline (pruning, best.yaml fed back to the trainer); the others use the python
launcher (1 rank), which starts fastest, for what does not depend on the launcher: two workers on one
study, a worker killed mid-trial, PostgreSQL storage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from andy_dist.sweep.storage import JOURNAL_NAME, open_storage
from tests.launching import ROOT, cpu_env, metrics, train
from tests.wandb_offline import read_offline_runs

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FIXED = {"model.vocab_size": 2000, "precision": "fp32", "zero_stage": 0, "eval_interval": 2, "log_interval": 1,
         "warmup_steps": 1, "save_interval": 1000, "sample_prompts": [], "wandb": "disabled"}


def write_space(path: Path, params: dict, first: list | None = None, **fixed) -> Path:
    path.write_text(yaml.safe_dump({"ds_config": "ds_configs/tiny.json", "fixed": {**FIXED, **fixed},
                                    "params": params, **({"first": first} if first else {})}))
    return path


def sweep_command(space: Path, shards: Path, tokenizer: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "sweep.py"), "--space", str(space), "--data", str(shards),
            "--tokenizer", str(tokenizer), "--out", str(out), *map(str, extra)]


def run_sweep(*command_args, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(sweep_command(*command_args), cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, \
        f"sweep failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def load_study(out: Path, storage=None) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=storage or open_storage(None, out, 60, with_heartbeat=False))


def val_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["val/loss"] for m in metrics(run_dir) if "val/loss" in m}


def test_four_trials_on_two_ranks_prune_the_bad_lr_and_best_yaml_trains_the_best_trial_again(
        train_shards, tokenizer_path, tmp_path):
    """lr 2e-3 completes first; lr 1e-7 (the bad end of the range) is pruned at an evaluation, stopping
    cleanly with a checkpoint of that step; two more trials are sampled. best.yaml, fed to
    launch/train.py, gives the best trial's validation losses again."""
    out = tmp_path / "lr-study"
    space = write_space(tmp_path / "space.yaml", {"lr": {"low": 1e-7, "high": 3e-3, "log": True}},
                        first=[{"lr": 2e-3}, {"lr": 1e-7}], wandb="offline")
    result = run_sweep(space, train_shards, tokenizer_path, out, "--trials", 4, "--max-steps", 6, "--nproc", 2,
                       "--launcher", "torchrun", "--sampler", "random", "--seed", 0, "--pruner-startup", 1)
    study = load_study(out)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    good, bad = trials[0], trials[1]
    assert (good.params["lr"], good.state.name, sorted(good.intermediate_values)) == (2e-3, "COMPLETE", [2, 4, 6])
    assert (bad.params["lr"], bad.state.name) == (1e-7, "PRUNED")
    # The pruned trial stopped at the evaluation that pruned it: a clear line, metrics and a checkpoint of that step.
    stop = max(bad.intermediate_values)
    assert stop < 6 and max(m["step"] for m in metrics(out / "trial-0001")) == stop
    log = (out / "trial-0001" / "train.log").read_text()
    assert f"sweep: trial 1 pruned at step {stop}" in log and f"stopped after the evaluation at step {stop}" in log
    checkpoints = out / "trial-0001" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{stop:06d}"
    assert (checkpoints / f"step-{stop:06d}" / "andy_meta.json").is_file()
    assert f"trial 1: pruned: pruned at step {stop}" in result.stdout
    # Each trial has its own W&B run, all in the study's group, the sampled lr in its config.
    for trial in trials:
        (run,) = read_offline_runs(out / f"trial-{trial.number:04d}" / "wandb")
        assert run.group == "lr-study" and run.name == f"lr-study-trial-{trial.number:04d}"
        assert run.config["train"]["lr"] == trial.params["lr"]
    # Summary: the table, best.yaml, the page.
    assert "pruned" in result.stdout and (out / "report.html").is_file()
    best = study.best_trial
    settings = yaml.safe_load((out / "best.yaml").read_text())
    assert settings["lr"] == best.params["lr"] and settings["max_steps"] == 6
    replay = tmp_path / "replay"
    train("torchrun", ["--config", out / "best.yaml", "--ds_config", "ds_configs/tiny.json", "--data", train_shards,
                       "--tokenizer", tokenizer_path, "--out", replay, "wandb=disabled"])
    want, got = val_losses(out / f"trial-{best.number:04d}"), val_losses(replay)
    assert sorted(got) == sorted(want) == [2, 4, 6]
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])
    trial_train = json.loads((out / f"trial-{best.number:04d}" / "config.json").read_text())["train"]
    replay_train = json.loads((replay / "config.json").read_text())["train"]
    ignore = {"run_name", "wandb_group", "wandb"}
    assert {k: v for k, v in trial_train.items() if k not in ignore} == \
        {k: v for k, v in replay_train.items() if k not in ignore}


def test_two_workers_at_once_share_one_study_and_run_disjoint_trials(train_shards, tokenizer_path, tmp_path):
    out = tmp_path / "shared"
    space = write_space(tmp_path / "space.yaml", {"lr": {"low": 1e-4, "high": 3e-3, "log": True}})
    args = (space, train_shards, tokenizer_path, out, "--trials", 3, "--max-steps", 4, "--pruner", "none")
    workers = [subprocess.Popen(sweep_command(*args, "--seed", seed), cwd=ROOT, env=cpu_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for seed in (1, 2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = load_study(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # the budget is the study's, not each worker's
    owners = {t.number: t.user_attrs["worker"] for t in trials}
    assert {owner.split(":")[1] for owner in owners.values()} == {str(w.pid) for w in workers}  # both worked
    for number, owner in owners.items():  # each trial ran once, by the worker that claimed it, in its own folder
        claimed_by = [w for w, text in zip(workers, outputs) if f"trial {number}: complete" in text]
        assert [str(w.pid) for w in claimed_by] == [owner.split(":")[1]]
        assert json.loads((out / f"trial-{number:04d}" / "config.json").read_text())["train"]["lr"] == \
            trials[number].params["lr"]


def test_a_worker_killed_mid_trial_is_replaced_by_a_rerun_that_finishes_the_study(train_shards, tokenizer_path,
                                                                                    tmp_path):
    """SIGKILL to the sweep worker: its trial's launcher gets SIGTERM (checkpoint, exit 75); the rerun fails the
    silent trial after 3 heartbeats, retries it once with the same parameters, and leaves nothing RUNNING."""
    out = tmp_path / "killed"
    space = write_space(tmp_path / "space.yaml", {"lr": {"low": 1e-4, "high": 3e-3, "log": True}}, eval_interval=5)
    args = (space, train_shards, tokenizer_path, out, "--trials", 2, "--max-steps", 30, "--pruner", "none",
            "--heartbeat", 2, "--seed", 3)
    worker = subprocess.Popen(sweep_command(*args), cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    first_metrics = out / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (first_metrics.exists() and first_metrics.read_text().strip()) and time.monotonic() < deadline:
        assert worker.poll() is None, "the worker ended before its first trial logged a step"
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    run_sweep(*args)
    trials = load_study(out).get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert trials[0].state.name == "FAIL"
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state.name == "COMPLETE" and retry.params == trials[0].params
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2
    # The orphaned trial stopped on its own (SIGTERM from the worker's death): a checkpoint of the step it reached.
    latest = out / "trial-0000" / "checkpoints" / "latest"
    assert latest.is_file() and "SIGTERM: checkpoint saved" in (out / "trial-0000" / "train.log").read_text()


def test_ctrl_c_checkpoints_the_running_trial_and_queues_it_again(train_shards, tokenizer_path, tmp_path):
    out = tmp_path / "stopped"
    space = write_space(tmp_path / "space.yaml", {"lr": {"low": 1e-4, "high": 3e-3, "log": True}}, eval_interval=5)
    worker = subprocess.Popen(sweep_command(space, train_shards, tokenizer_path, out, "--trials", 2, "--max-steps", 30),
                              cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_metrics = out / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (first_metrics.exists() and first_metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    output = worker.communicate(timeout=300)[0]
    assert worker.returncode == 130, output
    assert "run the same command again to continue the study" in output
    first, retry = load_study(out).get_trials()
    assert (first.state.name, first.user_attrs["outcome"]) == ("FAIL", "interrupted")
    assert (retry.state.name, retry.params, retry.system_attrs["failed_trial"]) == ("WAITING", first.params, 0)
    assert "SIGTERM: checkpoint saved" in (out / "trial-0000" / "train.log").read_text()
    assert (out / "trial-0000" / "checkpoints" / "latest").is_file()


# ---------------------------------------------------------------------------------------------- PostgreSQL


def _postgres_bin() -> Path | None:
    found = shutil.which("postgres") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server in a temporary folder, on a free port; skipped where none is installed."""
    pytest.importorskip("psycopg")  # SQLAlchemy 2.1's driver for postgresql:// URLs
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (postgres, initdb)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="andy-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user where there is one
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser")
        try:
            import pwd

            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no postgres user")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "andy"],
                   check=True, capture_output=True)
    server = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(data / "db"), "-p", str(port),
                               "-k", str(data), "-c", "listen_addresses=127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"postgresql://andy@127.0.0.1:{port}/postgres"
        import psycopg

        for _ in range(100):
            try:
                psycopg.connect(url).close()
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_study_in_postgresql(train_shards, tokenizer_path, tmp_path, postgres_url):
    """--storage postgresql://: Optuna's RDB storage with its heartbeat; --summary finds the study again."""
    out = tmp_path / "pg"
    space = write_space(tmp_path / "space.yaml", {"lr": {"low": 1e-4, "high": 3e-3, "log": True}})
    run_sweep(space, train_shards, tokenizer_path, out, "--trials", 2, "--max-steps", 4, "--storage", postgres_url)
    study = load_study(out, storage=postgres_url)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
    assert not (out / JOURNAL_NAME).exists()
    assert json.loads((out / "sweep.json").read_text())["storage"].startswith("postgresql://andy@")
    summary = subprocess.run([sys.executable, str(ROOT / "tools" / "sweep.py"), "--summary", str(out), "--storage",
                              postgres_url], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0 and "complete" in summary.stdout, summary.stderr
