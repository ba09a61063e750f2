"""Stale build locks of torch C++ extensions: found and removed before they hang a run.

DeepSpeed loads its CPU communication op (and others) through `torch.utils.cpp_extension.load`, which
guards each build folder with a lock file (`TORCH_EXTENSIONS_DIR` or `~/.cache/torch_extensions/
py311_cpu/NAME/lock`) and waits, silently and forever, while it exists. A job killed during that build
leaves the file behind, and every later run on the machine hangs in `init_distributed`, printing nothing.

A lock counts as stale when it is older than `STALE_AFTER_S` (no build of these ops takes that long
here) and no process on this machine builds in its folder (no process with that folder as its
working directory or on its command line: ninja and the compilers it runs). A stale lock is deleted
with one line on stderr naming it; if it cannot be deleted, the run stops with one line saying how.
`watch_build_locks` also keeps checking while the process group starts, so a lock left by a build
killed a moment ago is cleared once it turns stale instead of hanging the run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from andy_dist import UserError

STALE_AFTER_S = 300.0
CHECK_EVERY_S = 15.0


def extensions_root() -> Path:
    """Where torch builds C++ extensions: $TORCH_EXTENSIONS_DIR, else its default root (~/.cache/torch_extensions)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """Every extension's lock under `root` ($TORCH_EXTENSIONS_DIR/NAME/lock or ROOT/pyXY_cpu/NAME/lock)."""
    if not root.is_dir():
        return []
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def _builds_in(folder: Path) -> bool:
    """Whether a process on this machine works in `folder` (its working directory or on its command line)."""
    target, me = str(folder.resolve()), os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            cmdline = ""
        if cwd == target or cwd.startswith(target + "/") or target in cmdline:
            return True
    return False


def stale_age(lock: Path, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> float | None:
    """The lock's age in seconds if it is stale (see the module doc), else None (also when it is gone)."""
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    return age if age >= stale_after_s and not _builds_in(lock.parent) else None


def clear_stale_build_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S, stream=None) -> list[Path]:
    """Delete the stale locks under `root` (default: `extensions_root()`), one line each; returns them.

    Every rank of a node may do this at once: a lock another rank removed first is skipped."""
    root = extensions_root() if root is None else root
    stream = stream or sys.stderr
    removed = []
    for lock in build_locks(root):
        age = stale_age(lock, stale_after_s=stale_after_s)
        if age is None:
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise UserError(f"{lock} is a stale build lock ({age / 60:.0f} min old, no build running) that "
                            f"would hang this run, and it cannot be removed ({err.strerror}): delete it "
                            f"(rm {lock}) and start again") from None
        print(f"removed {lock}: a build lock {age / 60:.0f} min old with no build running (left by a job killed "
              f"while it built this op); it would have hung the run", file=stream, flush=True)
        removed.append(lock)
    return removed


@contextmanager
def watch_build_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S,
                      every_s: float = CHECK_EVERY_S) -> Iterator[None]:
    """Clear stale locks now, and every `every_s` seconds in the background until the block ends."""
    root = extensions_root() if root is None else root
    clear_stale_build_locks(root, stale_after_s)
    done = threading.Event()

    def watch():
        while not done.wait(every_s):
            try:
                clear_stale_build_locks(root, stale_after_s)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=watch, name="andy-build-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
