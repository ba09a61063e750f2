"""One trial = one `launch/train.py` run under the chosen launcher, its output in trial-NNNN/train.log.

The trial runs in a session of its own, so a Ctrl-C at the sweep's terminal reaches the sweep worker
only; the worker then sends SIGTERM to the trial's whole process group, which every launcher handles
(the ranks write a checkpoint of the current step and exit 75, see RELIABILITY.md). On Linux the
launcher process also gets SIGTERM if the worker is killed outright (PR_SET_PDEATHSIG), and rank 0
stops at its next evaluation when it finds its worker gone (`trial_hook`), whatever the launcher.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from andy_dist import UserError
from andy_dist.train.distenv import free_port

LAUNCHERS = ("deepspeed", "torchrun", "python")
TERM_WAIT_S = 300  # how long a trial may take to checkpoint after SIGTERM before it is killed
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded here, not after fork


def train_script() -> Path:
    """launch/train.py of this checkout (the sweep runs from a clone, like the other tools)."""
    script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
    if not script.is_file():
        raise UserError(f"cannot find {script}: run the sweep from a clone of the project (pip install -e .)")
    return script


def check_launcher(launcher: str, nproc: int) -> None:
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if launcher == "python" and nproc != 1:
        raise UserError(f"--launcher python runs one process; use --nproc 1, or --launcher deepspeed/torchrun "
                        f"for {nproc} ranks")
    if launcher == "deepspeed" and not _deepspeed_exe():
        raise UserError("--launcher deepspeed: the deepspeed command is not on PATH; install deepspeed or use torchrun")


def _deepspeed_exe() -> str | None:
    return shutil.which("deepspeed") or next(
        (str(p) for p in [Path(sys.executable).parent / "deepspeed"] if p.exists()), None)


def launcher_command(launcher: str, nproc: int) -> list[str]:
    """The launcher's words before the script: each trial gets a free port (trials may run side by side)."""
    port = str(free_port())
    if launcher == "deepspeed":
        return [_deepspeed_exe(), "--num_gpus", str(nproc), "--master_port", port]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    return [sys.executable]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM this process when the sweep worker dies (Linux)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class TrialProcess:
    """A running trial: its launcher started in a new session, output appended to `log`."""

    def __init__(self, command: list[str], env: dict, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent if _LIBC is not None else None)

    def wait(self) -> int:
        return self.proc.wait()

    def terminate(self) -> int:
        """SIGTERM to the trial's process group (the ranks checkpoint and exit 75); SIGKILL if it lingers."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            return self.proc.wait(timeout=TERM_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
        except ProcessLookupError:
            return self.proc.wait()


def last_lines(log: Path, count: int = 3) -> str:
    """Why a trial failed, in one line: the trainer's own `error: ...` line or the last exception line in its
    log (launchers print their own banners after it), else the log's last lines."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()[-400:] if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error: ") or (re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)
                                          and "ChildFailedError" not in line):  # torchrun's banner
            return line[:400]
    return " | ".join(lines[-count:])[-400:]
