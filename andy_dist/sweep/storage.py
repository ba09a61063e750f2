"""Where a study lives, and how a trial whose worker died is found and retried.

* Default: Optuna's journal storage, a file in --out (`optuna.journal`). Every process on the machine
  (or on nodes sharing that file system) can open it at once; it locks the file for each append.
* `--storage postgresql://...`, `mysql://...` (or `sqlite:///...`): Optuna's RDB storage, for workers
  on many nodes.

Dead workers: a worker records a heartbeat for the trial it runs every `heartbeat_s` seconds; a
RUNNING trial whose heartbeat is older than `GRACE_FACTOR` intervals is failed by the next worker
that looks (`fail_stale_trials`) and re-queued once as a WAITING copy with the same parameters
(`RetryHeartbeatStaleTrialCallback(max_retry=1)`). RDB storage has this built in. Optuna 5.0's
journal storage has no heartbeat, so `HeartbeatJournalStorage` adds Optuna's heartbeat interface to
it (a timestamp in the trial's system attributes), and Optuna's own machinery does the rest. This is
the only module that touches Optuna's private heartbeat interface.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from andy_dist import UserError

JOURNAL_NAME = "optuna.journal"
GRACE_FACTOR = 3  # a heartbeat this many intervals old marks the trial's worker dead
HEARTBEAT_ATTR = "andy_heartbeat"
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")

warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeat and retry are "experimental"
# Optuna expects heartbeats under study.optimize(); the worker runs its own loop (ask, heartbeat, tell).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with the heartbeat interface its RDB storage has."""

    def __init__(self, path: Path, heartbeat_s: int, on_stale: Callable | None):
        super().__init__(JournalFileBackend(str(path)))
        self._heartbeat_s = heartbeat_s
        self._on_stale = on_stale

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # another worker already failed it: nothing left to keep alive
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        oldest = time.time() - GRACE_FACTOR * self._heartbeat_s
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if _last_heartbeat(t) < oldest]

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._on_stale


def _last_heartbeat(trial: FrozenTrial) -> float:
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    return float(beat) if beat is not None else trial.datetime_start.timestamp()


def retry_once() -> RetryHeartbeatStaleTrialCallback:
    return RetryHeartbeatStaleTrialCallback(max_retry=1)


def requeue(study: optuna.Study, trial_id: int) -> None:
    """Queue a failed trial again (same parameters, as a WAITING trial), however often it was before."""
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study._storage.get_trial(trial_id))


def redact(url: str) -> str:
    """The URL without its password, for logs and files."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands: show the scheme only
        return url.split("://", 1)[0] + "://..."


def open_storage(url: str | None, out: Path, heartbeat_s: int,
                 with_heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """The study's storage; a storage that cannot be reached is a one-line UserError.

    with_heartbeat=False opens it for a trial's reporting only (the worker keeps the heartbeat).
    """
    on_stale = retry_once() if with_heartbeat else None
    if not url:
        path = Path(out) / JOURNAL_NAME
        return HeartbeatJournalStorage(path, heartbeat_s, on_stale) if with_heartbeat else \
            JournalStorage(JournalFileBackend(str(path)))
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise UserError(f"--storage {redact(url)}: use postgresql://USER:PASSWORD@HOST/DB or mysql://... "
                        f"(or leave it out for the journal file in --out)")
    kwargs = {"heartbeat_interval": heartbeat_s, "grace_period": GRACE_FACTOR * heartbeat_s,
              "heartbeat_stale_trial_callback": on_stale} if with_heartbeat else {}
    connect_args = {"connect_timeout": 10} if scheme in ("postgresql", "mysql") else {}
    try:
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args}, **kwargs)
    except ImportError as err:
        raise UserError(f"--storage {redact(url)}: the database driver is missing ({err}); "
                        f"pip install 'andy-dist[rdb]'") from None
    except Exception as err:  # SQLAlchemy's connection and URL errors have no common base worth naming
        first = " ".join(str(getattr(err, "orig", None) or err).split())[:300]
        raise UserError(f"--storage {redact(url)} cannot be reached: {first}") from None


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Keep `trial` marked alive while the block runs (a thread records a heartbeat every interval)."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail RUNNING trials whose worker stopped beating; each is re-queued once (see module doc)."""
    optuna.storages.fail_stale_trials(study)
