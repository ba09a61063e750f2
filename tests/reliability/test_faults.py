"""Faults injected for real into 2-rank CPU training runs started by the real launchers.

Each test breaks a run the way a cluster does (SIGKILL of a rank, SIGTERM pre-emption, a crash
mid-save, a damaged checkpoint, a full disk, a diverging loss) and checks that the job stops
cleanly, loses no more than RELIABILITY.md promises, and resumes with the same losses and data
stream as a run that was never interrupted. Only the NaN loss and the crash between DeepSpeed's
writes and the completion marker use fault hooks in the code (ANDY_FAULT_NAN_STEPS,
ANDY_FAULT_KILL_IN_SAVE): neither can be timed from outside.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.launching import ROOT, cpu_env, free_port, launcher_command, losses, metrics, traced_samples, train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "scripts"
REFERENCE_STEPS = 12
SAVE_INTERVAL = 4


def common(shards, tokenizer_path, out, *extra) -> list[str]:
    # Fixed schedule length (lr_decay_steps): a run planned for more steps has the same learning rates.
    return ["--ds_config", "ds_configs/tiny.json", "--data", shards, "--tokenizer", tokenizer_path, "--out", out,
            "model.vocab_size=2000", "precision=fp32", "zero_stage=1", "lr=2e-3", "warmup_steps=4",
            "lr_decay_steps=16", "log_interval=1", "sample_prompts=[]", "eval_interval=100",
            f"save_interval={SAVE_INTERVAL}", "keep_last=10", "--wandb", "disabled", *map(str, extra)]


# ---------------------------------------------------------------------------------------------- helpers
def wait_for(condition, timeout: float, what: str, job: "Job | None" = None):
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if job is not None and job.proc.poll() is not None:
            raise AssertionError(f"the job ended ({job.proc.returncode}) before {what}:\n{job.output()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f":\n{job.output()}" if job else ""))


def last_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return 0


def latest(run_dir: Path) -> str | None:
    path = Path(run_dir) / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(item.split("=", 1) for item in (Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                                                   .split("\0")) if "=" in item)
    except OSError:
        return None
    for name in ("RANK", "SLURM_PROCID"):
        if name in env:
            return int(env[name])
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Job:
    """A training job started by a real launcher in its own session, its output kept in files."""

    def __init__(self, command: list[str], env: dict, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = log_dir / "stdout", log_dir / "stderr"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            # A new session, so the test can clean up every process the job started, and nothing else.
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)

    @classmethod
    def train(cls, launcher: str, args: list[str], env: dict, log_dir: Path) -> "Job":
        return cls(launcher_command(launcher, ROOT / "launch" / "train.py") + [str(a) for a in args], env, log_dir)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the training processes among the launcher's descendants (by their RANK variable)."""
        tree, found, todo = _children(), {}, [self.proc.pid]
        while todo:
            for child in tree.get(todo.pop(), []):
                todo.append(child)
                rank = _rank_of(child)
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
                if rank is not None and "train.py" in cmdline:
                    found.setdefault(rank, child)  # the outermost process holding a rank is the rank
        return found

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_for_every_process(self, timeout: float) -> None:
        """Until no process of the job's session is left (the launcher may exit before its ranks)."""
        def gone():
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            return False
        wait_for(gone, timeout, "every process of the job to exit")

    def output(self) -> str:
        return f"{self.stdout.read_text()[-3000:]}\n{self.stderr.read_text()[-5000:]}"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def jobs():
    """Started jobs, killed at the end of the test whatever happened."""
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def assert_continues_like(reference, run: Path, trace: Path, from_step: int, to_step: int = REFERENCE_STEPS):
    """Every step up to `to_step` logged once the run resumed, the losses after `from_step` equal to the
    uninterrupted run's (1e-6 relative), and every rank read the same samples at every step."""
    ref_run, ref_trace = reference
    got, want = losses(run), losses(ref_run)
    assert sorted(s for s in got if s <= to_step) == list(range(1, to_step + 1))
    for step in range(from_step + 1, to_step + 1):
        assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])
    for rank in (0, 1):
        mine = {s: v for s, v in traced_samples(trace, rank).items() if s <= to_step}
        theirs = {s: v for s, v in traced_samples(ref_trace, rank).items() if s <= to_step}
        assert mine == theirs


def resume(launcher, shards, tokenizer_path, run, trace, max_steps=REFERENCE_STEPS, *extra):
    result = train(launcher, common(shards, tokenizer_path, run, "--max-steps", max_steps, "--resume", *extra),
                   env=cpu_env(ANDY_TRACE_SAMPLES=str(trace)))
    return result


def resumed_step(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("resumed from"))
    return int(line.rsplit("at step", 1)[1].split()[0])


@pytest.fixture(scope="module")
def reference(train_shards, tokenizer_path, tmp_path_factory):
    """The uninterrupted run every fault run is compared with: 12 steps, checkpoints at 4, 8 and 12."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trace = out.parent / "trace"
    train("torchrun", common(train_shards, tokenizer_path, out, "--max-steps", REFERENCE_STEPS),
          env=cpu_env(ANDY_TRACE_SAMPLES=str(trace)))
    return out, trace


# ---------------------------------------------------------------------------------------------- faults
def kill_rank_1_mid_run(launcher: str, shards, tokenizer_path, tmp_path, jobs) -> tuple[Path, Path, str]:
    """SIGKILL of rank 1 mid-step: the job exits non-zero within 60 s with no rank left behind, and the
    newest checkpoint is complete. Returns (run, trace, newest checkpoint tag)."""
    run, trace = tmp_path / "run", tmp_path / "trace"
    job = Job.train(launcher, common(shards, tokenizer_path, run, "--max-steps", 40),
                    cpu_env(ANDY_TRACE_SAMPLES=str(trace)), tmp_path / "killed")
    jobs.append(job)
    # Past the first checkpoint and into the steps after it (a kill at any later moment is as good).
    wait_for(lambda: latest(run) and last_step(run) >= SAVE_INTERVAL + 1, 120, "step 5", job)
    ranks = wait_for(lambda: len(job.ranks()) == 2 and job.ranks(), 10, "both rank processes", job)
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    rc = job.wait(timeout=90)
    took = time.monotonic() - killed_at
    assert rc != 0, job.output()
    assert took < 60, f"the job took {took:.0f} s to end after a rank died"
    assert not alive(ranks[0]), "rank 0 outlived the job"
    newest = latest(run)
    assert (run / "checkpoints" / newest / "andy_meta.json").is_file()
    return run, trace, newest


def test_kill_9_of_one_rank_ends_the_job_and_resume_is_exact(reference, train_shards, tokenizer_path, tmp_path,
                                                             jobs):
    """Under torchrun: a rank killed by SIGKILL ends the job (see `kill_rank_1_mid_run`), and --resume
    continues from the newest complete checkpoint exactly like the run that was never killed."""
    run, trace, newest = kill_rank_1_mid_run("torchrun", train_shards, tokenizer_path, tmp_path, jobs)
    result = resume("torchrun", train_shards, tokenizer_path, run, trace)
    start = resumed_step(result.stdout)
    assert f"step-{start:06d}" == newest
    assert_continues_like(reference, run, trace, from_step=start)


def test_kill_9_of_one_rank_ends_the_deepspeed_job(train_shards, tokenizer_path, tmp_path, jobs):
    """Under the deepspeed launcher: the job ends within 60 s with no rank left behind and a complete newest
    checkpoint. (The resume after a kill is the same code under every launcher: proven once, above.)"""
    kill_rank_1_mid_run("deepspeed", train_shards, tokenizer_path, tmp_path, jobs)


def test_sigterm_to_the_ranks_checkpoints_the_current_step_and_loses_nothing(reference, train_shards,
                                                                             tokenizer_path, tmp_path, jobs):
    """SIGTERM to every rank (what srun does on pre-emption), under the deepspeed launcher: the ranks agree
    on the step, checkpoint it, exit 75, and the launcher passes 75 on; the resume repeats no step and
    skips none."""
    run, trace = tmp_path / "run", tmp_path / "trace"
    job = Job.train("deepspeed", common(train_shards, tokenizer_path, run, "--max-steps", 40),
                    cpu_env(ANDY_TRACE_SAMPLES=str(trace)), tmp_path / "preempted")
    jobs.append(job)
    wait_for(lambda: last_step(run) >= 2, 120, "step 2", job)
    ranks = wait_for(lambda: len(job.ranks()) == 2 and job.ranks(), 10, "both rank processes", job)
    for pid in ranks.values():
        os.kill(pid, signal.SIGTERM)
    rc = job.wait(timeout=60)
    assert rc == 75, job.output()
    stopped = int(job.stderr.read_text().split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert stopped < REFERENCE_STEPS - 1, "the run went too far before the signal arrived to compare"
    assert latest(run) == f"step-{stopped:06d}" and last_step(run) == stopped

    result = resume("torchrun", train_shards, tokenizer_path, run, trace)
    assert resumed_step(result.stdout) == stopped
    assert_continues_like(reference, run, trace, from_step=stopped)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigterm_to_the_launcher_checkpoints_the_current_step(launcher, train_shards, tokenizer_path, tmp_path, jobs):
    """SIGTERM to the launcher's whole process group (a terminal's or a scheduler's kill): every rank saves
    the current step and exits 75. torchrun forwards the signal and reports a failure; the outer
    `deepspeed` process exits at once while its inner launcher waits for the ranks' checkpoint."""
    run = tmp_path / "run"
    # A DataLoader worker under deepspeed gets the group's signal too: it must not take its rank down.
    workers = "num_workers=1" if launcher == "deepspeed" else "num_workers=0"
    job = Job.train(launcher, common(train_shards, tokenizer_path, run, "--max-steps", 40, workers), cpu_env(),
                    tmp_path / "preempted")
    jobs.append(job)
    wait_for(lambda: last_step(run) >= 2, 120, "step 2", job)
    os.killpg(job.proc.pid, signal.SIGTERM)
    rc = job.wait(timeout=60)
    assert rc != 0
    job.wait_for_every_process(timeout=60)
    text = job.output()
    assert "SIGTERM: checkpoint saved at step " in text, text
    stopped = int(text.split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert latest(run) == f"step-{stopped:06d}" and last_step(run) == stopped
    meta = json.loads((run / "checkpoints" / latest(run) / "andy_meta.json").read_text())
    assert meta["trainer_state"]["step"] == stopped


def test_job_script_requeues_after_a_preemption_checkpoint(train_shards, tokenizer_path, tmp_path, jobs):
    """launch/slurm/train_1node.sbatch under stand-ins for srun and scontrol: SIGTERM to the batch shell
    (`--signal=B:TERM`) reaches both tasks through srun, they checkpoint and exit 75, and the script asks
    scontrol to requeue the job and exits 75 itself."""
    run, log = tmp_path / "run", tmp_path / "scontrol.log"
    env = cpu_env(PATH=f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}", FAKE_SRUN_NTASKS="2", FAKE_SCONTROL_LOG=str(log),
                  SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(ROOT),
                  MASTER_PORT=str(free_port()), DS_CONFIG="ds_configs/tiny.json", DATA=str(train_shards), OUT=str(run))
    args = common(train_shards, tokenizer_path, run, "--max-steps", 40)
    args = args[4:6] + args[8:]  # the script sets --ds_config, --data and --out itself
    job = Job(["bash", str(ROOT / "launch" / "slurm" / "train_1node.sbatch"), *map(str, args)], env, tmp_path / "job")
    jobs.append(job)
    wait_for(lambda: last_step(run) >= 2, 120, "step 2", job)
    os.kill(job.proc.pid, signal.SIGTERM)  # the batch shell only, as --signal=B:TERM does
    rc = job.wait(timeout=60)
    assert rc == 75, job.output()
    assert "requeue 4242" in log.read_text()
    stopped = int(job.stderr.read_text().split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert latest(run) == f"step-{stopped:06d}"


def test_crash_during_a_save_leaves_the_previous_checkpoint_in_use(reference, train_shards, tokenizer_path,
                                                                   tmp_path):
    """Rank 0 killed by SIGKILL after DeepSpeed wrote step 8's files, before they were marked complete:
    `latest` still names step 4, --resume loads it and continues exactly, and re-saves step 8 whole."""
    run, trace = tmp_path / "run", tmp_path / "trace"
    result = train("torchrun", common(train_shards, tokenizer_path, run, "--max-steps", REFERENCE_STEPS), check=False,
                   env=cpu_env(ANDY_TRACE_SAMPLES=str(trace), ANDY_FAULT_KILL_IN_SAVE="step-000008"))
    assert result.returncode != 0
    ckpt = run / "checkpoints"
    assert latest(run) == "step-000004"
    staging = ckpt / "step-000008.partial"  # every rank's files, not yet marked complete nor swapped in
    assert staging.is_dir() and not (staging / "andy_meta.json").exists() and not (ckpt / "step-000008").exists()

    resumed = resume("torchrun", train_shards, tokenizer_path, run, trace)
    assert resumed_step(resumed.stdout) == 4
    assert_continues_like(reference, run, trace, from_step=4)
    assert (ckpt / "step-000008" / "andy_meta.json").is_file() and not staging.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_rank_file_is_named_in_a_one_line_error(damage, reference, train_shards, tokenizer_path, tmp_path):
    """A checkpoint whose rank-1 optimizer file is gone or cut short: --resume stops with exit 2 and one
    line naming the file, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", run / "checkpoints")
    victim = run / "checkpoints" / "step-000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "missing":
        victim.unlink()
    else:
        os.truncate(victim, victim.stat().st_size // 2)
    result = train("python", common(train_shards, tokenizer_path, run, "--max-steps", 16, "--resume"), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(victim) in error[0], result.stderr[-3000:]
    assert ("is missing" if damage == "missing" else "is truncated") in error[0]


def _tensors(obj, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    found = {}
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}"))
    return found


def _weights_and_optimizer(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Model weights and every optimizer tensor of one checkpoint (our own files, written by this test)."""
    found = {}
    for path in sorted(tag_dir.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        keep = {k: state[k] for k in ("module", "optimizer", "optimizer_state_dict") if k in state}
        found.update(_tensors(keep, path.name))
    return found


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stall_reports(stderr: str, rank: int, last: str) -> list[str]:
    """The stall reports of one rank after `last`: each from its header to that rank's next header
    (both ranks write to the same stream, so their lines may interleave; extra lines do no harm)."""
    header = f"rank {rank}: no progress for "
    return [block for block in stderr.split(header)[1:] if f"(last: {last})" in block.split("\n")[0]]


def test_a_stalled_rank_reports_where_every_rank_waits_and_the_run_goes_on(train_shards, tokenizer_path, tmp_path):
    """Rank 0 stalls 10 s before step 3 with stall_report_s=3: rank 0's report shows the stalled line,
    rank 1's the collective it waits in; once the stall ends the run finishes normally."""
    result = train("torchrun", common(train_shards, tokenizer_path, tmp_path / "run", "--max-steps", 4,
                                      "stall_report_s=3"),
                   env=cpu_env(ANDY_FAULT_STALL="3:10"))
    source = (ROOT / "andy_dist" / "train" / "faults.py").read_text().splitlines()
    stall_line = 1 + next(i for i, line in enumerate(source) if "time.sleep(self.stall[1])" in line)
    rank0, rank1 = _stall_reports(result.stderr, 0, "step 2"), _stall_reports(result.stderr, 1, "step 2")
    assert rank0 and rank1, result.stderr[-5000:]
    assert f'faults.py", line {stall_line} in before_step' in rank0[0]  # where the (injected) stall sits
    assert "all_reduce" in rank1[0]  # the healthy rank waits for its peer in the step's first collective
    assert len(rank0) == 1 and len(rank1) == 1  # once per stall
    assert "done: step 4" in result.stdout


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_non_finite_loss_skips_the_step_and_stops_after_too_many(zero_stage, train_shards, tokenizer_path, tmp_path):
    """NaN loss at step 3, then at 5, 6, 7 with max_bad_steps=3 (fp32; ZeRO-0 drops the gradients itself,
    ZeRO-1 relies on DeepSpeed's overflow check): each bad step leaves weights and optimizer state
    exactly as they were, is counted, and the third in a row stops the run with exit 3 and a checkpoint
    holding the weights from before the divergence."""
    run = tmp_path / "run"
    result = train("torchrun", common(train_shards, tokenizer_path, run, "--max-steps", 12, f"zero_stage={zero_stage}",
                                      "max_bad_steps=3", "save_interval=1", "keep_last=20"),
                   check=False, env=cpu_env(ANDY_FAULT_NAN_STEPS="3,5,6,7"))
    assert result.returncode != 0
    assert "exitcode  : 3" in result.stderr or "exitcode: 3" in result.stderr.replace(" ", ""), result.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss (last at step 7)" in result.stderr
    ckpt = run / "checkpoints"
    assert latest(run) == "step-000007"
    state = {step: _weights_and_optimizer(ckpt / f"step-{step:06d}") for step in range(2, 8)}
    assert _same(state[2], state[3]), "the skipped step 3 changed the weights or optimizer"
    assert not _same(state[3], state[4]), "step 4 should have trained"
    for step in (5, 6, 7):
        assert _same(state[4], state[step]), f"the skipped step {step} changed the weights or optimizer"
    trainer_state = json.loads((ckpt / "step-000007" / "andy_meta.json").read_text())["trainer_state"]
    assert trainer_state["skipped_steps"] == 4 and trainer_state["bad_steps_in_row"] == 3
    logged = {m["step"]: m for m in metrics(run) if "train/loss" in m}
    # The third bad step in a row stops the run before it is logged; its count is in the checkpoint above.
    assert logged[3]["train/skipped_steps"] == 1 and logged[6]["train/skipped_steps"] == 3
    assert all(math.isfinite(logged[s]["train/loss"]) for s in (1, 2, 4))


@pytest.fixture
def small_disk(tmp_path):
    """A 22 MB filesystem (one tiny checkpoint is 14.5 MB) when this process may mount a tmpfs (root);
    else RLIMIT_FSIZE on the training processes, which fails any write past 4 MB (the optimizer files are
    5.4 MB) the same way: an error from write(2) in the middle of torch.save."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(mount)],
                                                   capture_output=True).returncode == 0
    if mounted and not os.environ.get("ANDY_TEST_DISK_FULL_RLIMIT"):
        yield mount, None
        subprocess.run(["umount", "-l", str(mount)], check=False)
    else:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        yield mount, ["prlimit", f"--fsize={4 * 2**20}", "--"]


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(reference, train_shards,
                                                                                   tokenizer_path, tmp_path,
                                                                                   small_disk):
    """Resume from step 4 onto a disk with no room for another checkpoint: the save at step 8 fails on
    every rank with one clear error, the partial tag is removed, `latest` still names step 4, and that
    checkpoint resumes and trains on exactly like the run that never ran out of space."""
    disk, limit = small_disk
    run = disk / "run"
    (run / "checkpoints").mkdir(parents=True)
    source = reference[0] / "checkpoints"
    shutil.copytree(source / "step-000004", run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest").write_text("step-000004\n")
    command = (limit or []) + launcher_command("torchrun", ROOT / "launch" / "train.py") + \
        common(train_shards, tokenizer_path, run, "--max-steps", 8, "--resume")
    result = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, result.stderr[-4000:]  # every rank stops with the same line
    error = errors.pop()
    assert "could not write checkpoint" in error and "step-000008" in error, error
    assert "MB free on that filesystem" in error, error
    assert "the previous checkpoint step-000004 is intact" in error
    assert latest(run) == "step-000004" and not (run / "checkpoints" / "step-000008").exists()

    again = tmp_path / "again"
    shutil.copytree(run, again)
    trace = tmp_path / "trace"
    resumed = resume("torchrun", train_shards, tokenizer_path, again, trace, 6)
    assert resumed_step(resumed.stdout) == 4
    got, want = losses(again), losses(reference[0])
    for step in (5, 6):
        assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])
