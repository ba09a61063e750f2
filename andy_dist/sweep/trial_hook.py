"""Inside a trial: rank 0 reports each validation loss to the study and asks whether to prune.

The sweep worker starts `launch/train.py` with `ANDY_SWEEP_TRIAL` in the environment (the storage,
the study, the trial and the pruner's settings, as JSON). `launch/train.py` then hands the trainer the
callback below; without that variable it gets None and trains as usual. The trainer calls it on every
rank after each evaluation and stops at that step, checkpointed, with exit status 76 if any rank says
so. Only rank 0 talks to the study; the other ranks answer False and follow rank 0's decision.

Rank 0 also stops the run when the trial is no longer its to run: its sweep worker has died (same host,
the process is gone) or the study has failed the trial (the worker missed its heartbeats), so an
orphaned trial ends at its next evaluation instead of training on for nobody. Optuna is imported only
when a trial first reports, so a plain training run never loads it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Callable

TRIAL_ENV = "ANDY_SWEEP_TRIAL"
PRUNED_AT = "andy_pruned_at_step"  # set on the trial in the study when rank 0 prunes it


def trial_evaluation_hook(is_main: bool) -> Callable[[int, float], bool] | None:
    """The trainer's `on_evaluation` callback for this process, or None when it is no sweep trial."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec:
        return None
    if not is_main:
        return lambda step, val_loss: False
    return TrialReporter(json.loads(spec))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class TrialReporter:
    """Rank 0's link to the study: report(step, val_loss) to Optuna, then should_prune()."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._trial = None
        self._broken = False

    def __call__(self, step: int, val_loss: float) -> bool:
        if self._broken:
            return False
        try:
            return self._decide(step, val_loss)
        except Exception as err:  # the study being unreachable must not cost the training run
            self._broken = True
            print(f"sweep: trial {self.spec['number']} could not report to its study ({err}); "
                  f"it runs to its end unpruned", file=sys.stderr, flush=True)
            return False

    def _decide(self, step: int, val_loss: float) -> bool:
        number = self.spec["number"]
        if socket.gethostname() == self.spec["host"] and not _process_alive(self.spec["worker_pid"]):
            print(f"sweep: the sweep worker (pid {self.spec['worker_pid']}) is gone; trial {number} stops "
                  f"at step {step}", flush=True)
            return True
        trial = self._open()
        state = trial.storage.get_trial(trial._trial_id).state
        if state.name != "RUNNING":
            print(f"sweep: the study marked trial {number} {state.name} (its worker missed heartbeats); "
                  f"it stops at step {step}", flush=True)
            return True
        trial.report(val_loss, step)
        if trial.should_prune():
            # The worker reads this, not only the exit status: torchrun turns every failed rank's status into 1.
            trial.storage.set_trial_system_attr(trial._trial_id, PRUNED_AT, step)
            print(f"sweep: trial {number} pruned at step {step}: validation loss {val_loss:.4f} is worse than "
                  f"the {self.spec['pruner']['name']} pruner allows", flush=True)
            return True
        return False

    def _open(self):
        if self._trial is None:
            import optuna

            from andy_dist.sweep.driver import make_pruner
            from andy_dist.sweep.storage import open_storage

            storage = open_storage(self.spec["storage"], self.spec["out"], heartbeat_s=1, with_heartbeat=False)
            # The random sampler: constructing a Trial calls the sampler's before_trial(), which must not
            # change anything; the parameters were sampled by the worker already.
            study = optuna.load_study(study_name=self.spec["study"], storage=storage,
                                      sampler=optuna.samplers.RandomSampler(),
                                      pruner=make_pruner(self.spec["pruner"]))
            self._trial = optuna.trial.Trial(study, self.spec["trial_id"])
        return self._trial
