"""What every command-line tool shares: one-line errors for user mistakes, atomic output files,
output paths and devices checked before any work starts."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from andy_dist import UserError

# Errors of the filesystem rather than of the program: reported as one line, like a UserError.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)


def run_tool(main: Callable[[], int | None]) -> None:
    """Run a tool's main(); a UserError becomes one line on stderr and exit status 2, no traceback."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    except Exception:
        if not _process_group_alive():
            raise
        traceback.print_exc()
        _exit(1)
    _exit(code or 0)


# Set once this process has started a process group (engine.init_distributed, or a test script's own).
_ran_distributed = False


def mark_distributed_process() -> None:
    """Record that this process started a process group: it will leave without interpreter teardown."""
    global _ran_distributed
    _ran_distributed = True


def _process_group_alive() -> bool:
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    return dist is not None and dist.is_available() and dist.is_initialized()


def _exit(code: int) -> None:
    """Exit with `code`; a process that ran a process group leaves without interpreter teardown.

    gloo (and DeepSpeed's CPU communication op) keep C++ threads and work objects that can outlive
    even destroy_process_group; an interpreter torn down around them now and then aborts with
    SIGABRT ("terminate called without an active exception"), which replaces the exit status the
    user and the launcher rely on: seen about once per 60 launches in CI, after runs that had
    succeeded. Everything such a process writes is closed by then (checkpoints, metrics, W&B), so
    after flushing stdout and stderr it leaves at once. After an error the same holds, and the group
    cannot be left in step anyway (a peer may be dead, so a barrier could hang).
    """
    if _ran_distributed or _process_group_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def read_text_file(path: str | Path, option: str) -> str:
    """The UTF-8 text of a user-named file; a missing, non-file or non-UTF-8 one is a UserError."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"{option} {path} {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{option} {path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    except OSError as err:
        raise UserError(f"{option} {path} cannot be read: {err.strerror}") from None


def check_output_path(path: str | Path, option: str, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written, before the tool does any work.

    directory: the output is a folder (else a file). An existing output of the other kind, a parent
    that is a file, and a parent folder without write permission are UserErrors that name `option`.
    Missing parent folders are fine: they are created when the output is written.
    """
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise UserError(f"{option} {path} exists and is not a directory; choose another {option}")
        if not directory and path.is_dir():
            raise UserError(f"{option} {path} is a directory; give a file name, e.g. {option} {path / 'NAME'}")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} cannot be created: no write permission in {parent}")
    return path


def resolve_device(name: str, option: str = "--device") -> str:
    """`name` if torch can use that device here; a UserError otherwise (cuda without a GPU, a typo)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {name!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"{option} {name!r} is not supported; use cpu or cuda")
    return name


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    A crash or error leaves no half-written file under the final name (a previous file stays as it
    was). A final path that is a directory, a parent that cannot be created, and a full or read-only
    disk are UserErrors.
    """
    final = Path(final)
    if final.is_dir():
        raise UserError(f"{final} is a directory; the output must be a file name")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder for {final}: {err.strerror or err}") from None
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        if err.errno in _WRITE_ERRNOS:
            raise UserError(f"could not write {final}: {err.strerror}") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
