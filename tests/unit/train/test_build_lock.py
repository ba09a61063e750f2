"""Stale torch-extension build locks (andy_dist.train.build_lock): found on real files, with real processes.

The launch that such a lock would hang is tests/dist/test_multinode.py's local run, which starts with a
stale lock planted in its (copied) extension folder."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from andy_dist.train.build_lock import build_locks, clear_stale_build_locks, watch_build_locks


def lock_in(root, name="deepspeed_shm_comm", age_s=0.0):
    folder = root / "py311_cpu" / name
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.write_text("")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_lock_left_minutes_ago_with_no_build_running_is_removed_with_one_line(tmp_path):
    lock = lock_in(tmp_path, age_s=600)
    fresh = lock_in(tmp_path, "fused_adam", age_s=10)
    said = io.StringIO()
    assert clear_stale_build_locks(tmp_path, stream=said) == [lock]
    assert not lock.exists() and fresh.exists()  # a lock a few seconds old belongs to a build under way
    lines = said.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"removed {lock}: a build lock 10 min old with no build running")


def test_a_lock_of_a_build_that_is_running_is_kept(tmp_path):
    lock = lock_in(tmp_path, age_s=600)
    # A long build: a process working in the op's folder, as ninja and the compiler do.
    build = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=lock.parent)
    try:
        time.sleep(0.2)
        assert clear_stale_build_locks(tmp_path, stream=io.StringIO()) == []
        assert lock.exists()
    finally:
        build.kill()
        build.wait()
    assert clear_stale_build_locks(tmp_path, stream=io.StringIO()) == [lock]


def test_the_watch_clears_a_lock_that_turns_stale_while_the_process_group_starts(tmp_path):
    lock = lock_in(tmp_path, age_s=0)
    with watch_build_locks(tmp_path, stale_after_s=0.5, every_s=0.1):
        assert lock.exists()
        deadline = time.monotonic() + 10
        while lock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not lock.exists()


@pytest.mark.parametrize("layout", ["TORCH_EXTENSIONS_DIR/NAME/lock", "ROOT/py311_cpu/NAME/lock"])
def test_both_folder_layouts_are_searched(tmp_path, layout):
    folder = tmp_path / "deepspeed_shm_comm" if layout.startswith("TORCH") else tmp_path / "py311_cpu" / "op"
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")
    assert build_locks(tmp_path) == [folder / "lock"]
