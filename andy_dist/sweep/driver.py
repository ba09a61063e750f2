"""The sweep worker: claim a trial of the study, run it as a training run, tell the study how it ended.

Any number of workers (one per machine, per SLURM array task, or several on one machine) run this
loop on one study; the storage hands each a different trial. A worker stops claiming when the study
holds its `--trials` (a failed trial that was re-queued counts once), then waits for the trials other
workers still run, so that one whose worker died is failed and retried here. Its last act is the
summary (table, best.yaml, report.html).

How a trial ends, from the exit status of its launcher:
    0    COMPLETE, valued at the best validation loss in its metrics.jsonl
    76   PRUNED: rank 0 was told to prune at an evaluation; the run stopped at that step, checkpointed.
         Rank 0 also marks the trial in the study, as torchrun reports every failed rank's status as 1
    75   interrupted (SIGTERM reached the ranks): FAIL, and re-queued, so a rerun picks it up
    else FAIL (a crash, a diverged run: exit 3); the reason is the last lines of trial-NNNN/train.log
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from andy_dist import UserError
from andy_dist.sweep.checks import refusal
from andy_dist.sweep.launching import TrialProcess, last_lines, launcher_command, train_script
from andy_dist.sweep.space import SearchSpace
from andy_dist.sweep.storage import fail_dead_trials, heartbeat, redact, requeue
from andy_dist.sweep.summary import read_trial_metrics
from andy_dist.sweep.trial_hook import PRUNED_AT, TRIAL_ENV

EXIT_PREEMPTED = 75  # andy_dist.train.trainer's code for SIGTERM (importing it would load torch)
WAIT_POLL_S = 5
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class SweepPlan:
    """Everything a worker needs, resolved from the command line and the space file."""

    space: SearchSpace
    ds_config: str
    data: str
    out: Path
    trials: int
    study: str
    storage_url: str | None
    nproc: int = 1
    launcher: str = "python"
    max_steps: int | None = None
    timeout_s: float | None = None
    sampler: str = "tpe"
    pruner: dict = field(default_factory=lambda: {"name": "median", "startup_trials": 3})
    seed: int | None = None
    tokenizer: str | None = None
    heartbeat_s: int = 60

    def record(self) -> dict:
        """What --summary needs to find the study again (no password: an RDB URL is stored redacted)."""
        return {"study": self.study, "storage": redact(self.storage_url) if self.storage_url else None,
                "space": str(self.space.path), "ds_config": self.ds_config, "data": self.data,
                "max_steps": self.max_steps, "nproc": self.nproc, "launcher": self.launcher}

    def fingerprint(self) -> str:
        """What makes trials comparable: a rerun or another worker must agree on all of it."""
        return json.dumps({"space": self.space.fingerprint(), "ds_config": self.ds_config, "nproc": self.nproc,
                           "max_steps": self.max_steps, "data": self.data}, sort_keys=True)


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    """The pruner from its settings (the trial's rank 0 rebuilds the worker's pruner from the same dict)."""
    if spec["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec["startup_trials"], n_warmup_steps=0)
    if spec["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.get("min_resource", 1),
                                              max_resource=spec.get("max_resource") or "auto")
    return optuna.pruners.NopPruner()


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its Study.stop() at the last grid point: that works only inside
    study.optimize(), and the worker's budget already ends at the grid's size."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return _GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a trial still running counts as a poor result, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def open_study(plan: SweepPlan, storage) -> optuna.Study:
    """Create the study, or load it for a rerun or another worker; a different plan is refused."""
    with _claim_lock(plan.out):  # workers starting together: one creates the study and queues `first:`
        existing = {s.study_name for s in storage.get_all_studies()}
        if plan.study not in existing and any(plan.out.glob("trial-*")):
            raise UserError(f"--out {plan.out} holds trial folders but its storage has no study {plan.study!r}; "
                            f"choose an empty --out, or the --study and --storage those trials belong to")
        study = optuna.create_study(study_name=plan.study, storage=storage, direction="minimize",
                                    sampler=make_sampler(plan.sampler, plan.space, plan.seed),
                                    pruner=make_pruner(plan.pruner), load_if_exists=True)
        fingerprint = study.user_attrs.get("plan")
        if fingerprint is None:
            for point in plan.space.first:
                study.enqueue_trial(point)
            study.set_user_attr("plan", plan.fingerprint())
    if fingerprint is not None and fingerprint != plan.fingerprint():
        raise UserError(f"study {plan.study!r} was started with another space, ds_config, data, --nproc or "
                        f"--max-steps; rerun it with the same ones, or start a new --study")
    return study


@dataclass
class Tally:
    """The study's trials as the budget sees them."""

    claimed: int  # trials that use up the budget: all but the failed ones that were re-queued
    waiting: int
    running: int
    finished: int

    @classmethod
    def of(cls, study: optuna.Study) -> "Tally":
        trials = study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        states = [t.state for t in trials]
        claimed = sum(1 for t in trials if t.state != TrialState.FAIL or t.number not in retried)
        return cls(claimed, states.count(TrialState.WAITING), states.count(TrialState.RUNNING),
                   sum(1 for s in states if s.is_finished()))


class Worker:
    """One sweep worker process."""

    def __init__(self, plan: SweepPlan, study: optuna.Study, write=print, progress=None):
        """write(line): the worker's reports; progress(finished trials of the study), after each trial."""
        self.plan, self.study, self.write, self.progress = plan, study, write, progress
        self.deadline = time.monotonic() + plan.timeout_s if plan.timeout_s else None
        # A grid ends when every point was tried (after the `first:` points, which the grid does not count).
        self.budget = min(plan.trials, _grid_size(plan) + len(plan.space.first)) if plan.sampler == "grid" \
            else plan.trials
        self._stop_signal: int | None = None
        self._running: TrialProcess | None = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Run trials until the study is full; 0, or the exit status of an interruption (130, 75)."""
        with self._signals_forwarded():
            while self._stop_signal is None:
                fail_dead_trials(self.study)
                trial, tally = self._claim()
                if trial is not None:
                    self._run_claimed(trial)
                    if self.progress is not None:
                        self.progress(Tally.of(self.study).finished)
                elif tally.running and not self._past_deadline():
                    # Others' trials: wait for them, so that one whose worker dies is failed and retried here.
                    self._sleep(min(self.plan.heartbeat_s, WAIT_POLL_S))
                else:
                    break
        if self._stop_signal is not None:
            self.write("sweep: interrupted; run the same command again to continue the study")
            return 130 if self._stop_signal == signal.SIGINT else EXIT_PREEMPTED
        return 0

    def _claim(self) -> tuple[optuna.Trial | None, Tally]:
        """Ask the study for a trial if the budget allows; one worker at a time (a lock file in --out)."""
        with _claim_lock(self.plan.out):
            tally = Tally.of(self.study)
            if self._past_deadline() or not (tally.waiting or tally.claimed < self.budget):
                return None, tally
            return self.study.ask(), tally

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < end:
            time.sleep(0.5)

    # ------------------------------------------------------------------ one trial
    def _run_claimed(self, trial: optuna.Trial) -> None:
        values = {p.name: p.suggest(trial) for p in self.plan.space.params}
        overrides = self.plan.space.overrides(values)
        trial_dir = self.plan.out / f"trial-{trial.number:04d}"
        _set_attrs(trial, dir=str(trial_dir), overrides=overrides, settings={**self.plan.space.fixed, **values},
                   outcome="running",
                   worker=f"{socket.gethostname()}:{os.getpid()}")
        reason = refusal(self.plan.ds_config, overrides, self.plan.nproc, self.plan.max_steps)
        if reason:
            self._tell(trial, TrialState.FAIL, None, "refused", f"the trainer refuses these settings: {reason}")
            return
        self.write(f"trial {trial.number}: {' '.join(overrides[len(self.plan.space.fixed):]) or '(no parameters)'}"
                   f" -> {trial_dir}/train.log")
        code = self._launch(trial, trial_dir, overrides)
        steps, best = read_trial_metrics(trial_dir)
        _set_attrs(trial, steps=steps, exit_status=code)
        pruned_at = self.study._storage.get_trial(trial._trial_id).system_attrs.get(PRUNED_AT)
        if pruned_at is not None and code != 0:  # exit 76; under torchrun 1 (it reports any rank's failure as 1)
            self._tell(trial, TrialState.PRUNED, None, "pruned", f"pruned at step {pruned_at}")
        elif self._stop_signal is not None or code == EXIT_PREEMPTED:
            self._requeue(trial, steps)
        elif code == 0 and best is not None:
            self._tell(trial, TrialState.COMPLETE, best, "complete", f"best validation loss {best:.4f}")
        else:
            why = "no validation loss was logged" if code == 0 else f"exit status {code}"
            self._tell(trial, TrialState.FAIL, None, "diverged" if code == 3 else "crashed",
                       f"{why}: {last_lines(trial_dir / 'train.log')}")

    def _launch(self, trial: optuna.Trial, trial_dir: Path, overrides: list[str]) -> int:
        plan = self.plan
        command = launcher_command(plan.launcher, plan.nproc) + [
            str(train_script()), "--ds_config", plan.ds_config, "--data", plan.data, "--out", str(trial_dir),
            *(["--max-steps", str(plan.max_steps)] if plan.max_steps else []),
            *(["--tokenizer", plan.tokenizer] if plan.tokenizer else []),
            *overrides, f"run_name={plan.study}-trial-{trial.number:04d}", f"wandb_group={plan.study}"]
        spec = {"storage": plan.storage_url, "out": str(plan.out), "study": plan.study, "trial_id": trial._trial_id,
                "number": trial.number, "pruner": plan.pruner, "worker_pid": os.getpid(),
                "host": socket.gethostname()}
        self._running = TrialProcess(command, {**os.environ, TRIAL_ENV: json.dumps(spec)}, trial_dir / "train.log")
        try:
            with heartbeat(self.study, trial):  # started after the launch: no thread is running at fork
                return self._running.wait()
        finally:
            self._running = None

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | None, outcome: str, note: str) -> bool:
        """Finish the trial in the study; False if another worker had failed it already."""
        if not _set_attrs(trial, outcome=outcome, note=note):
            self.write(f"trial {trial.number}: {outcome}, but another worker had failed it already "
                       f"(this worker missed heartbeats); its result is not counted")
            return False
        self.study.tell(trial, value, state=state, skip_if_finished=True)
        self.write(f"trial {trial.number}: {outcome}: {note}")
        return True

    def _requeue(self, trial: optuna.Trial, steps: int | None) -> None:
        """An interrupted trial: failed, and queued again with the same parameters for the next worker."""
        if self._tell(trial, TrialState.FAIL, None, "interrupted", f"interrupted at step {steps}; queued to run again"):
            requeue(self.study, trial._trial_id)

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _signals_forwarded(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM: the running trial gets SIGTERM (it checkpoints), then the loop ends."""
        def on_signal(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop waiting
            self._stop_signal = signum
            if self._running is not None:
                self.write("sweep: stopping; the running trial writes a checkpoint first")
                os.killpg(self._running.proc.pid, signal.SIGTERM)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _set_attrs(trial: optuna.Trial, **attrs) -> bool:
    """Record user attributes; False if the trial is finished already (failed by another worker)."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    except UpdateFinishedTrialError:
        return False
    return True


def _grid_size(plan: SweepPlan) -> int:
    size = 1
    for values in plan.space.grid().values():
        size *= len(values)
    return size


@contextmanager
def _claim_lock(out: Path) -> Iterator[None]:
    """Workers sharing --out check the budget and claim a trial one at a time."""
    with open(out / ".claim.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
