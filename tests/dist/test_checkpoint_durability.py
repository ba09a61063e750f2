"""Checkpoints that survive a power cut, on a real DeepSpeed engine (one rank, gloo): the order of fsyncs and
renames of a save, a re-save interrupted before its commit and completed, and a write that fails with an
errno (andy_dist.train.checkpoint; the engine runs in tests/dist/scripts/checkpoint_durability.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.launching import ROOT, cpu_env, launcher_command

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("durability")
    out, ckpt_dir = base / "found.json", base / "checkpoints"
    command = launcher_command("python", ROOT / "tests" / "dist" / "scripts" / "checkpoint_durability.py")
    result = subprocess.run(command + [str(out), str(ckpt_dir)], cwd=ROOT, env=cpu_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text()), ckpt_dir


def test_every_file_meta_and_folder_is_fsynced_before_the_tag_counts(observed):
    found, ckpt_dir = observed
    events, tag, staging = found["events"], ckpt_dir / "step-000001", ckpt_dir / "step-000001.partial"
    swap = next(i for i, e in enumerate(events) if e[0] == "replace" and e[1:] == [str(staging), str(tag)])
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(ckpt_dir / "latest"))
    assert swap < latest
    synced_before_swap = {e[1] for e in events[:swap] if e[0] == "fsync"}
    # A file written atomically is fsynced under its temporary name, then renamed: it counts as its final name.
    synced_before_swap |= {e[2] for e in events[:swap] if e[0] == "replace" and e[1] in synced_before_swap}
    written = {str(staging / Path(f).relative_to(tag)) for f in found["files"]}
    assert str(staging / "andy_meta.json") in written
    assert written <= synced_before_swap, sorted(written - synced_before_swap)  # every rank's files and the meta
    assert str(staging) in synced_before_swap  # the tag's own directory entries
    assert str(ckpt_dir) in {e[1] for e in events[swap:latest] if e[0] == "fsync"}  # the swap's rename
    assert str(ckpt_dir) in {e[1] for e in events[latest:] if e[0] == "fsync"}  # latest's rename


def test_a_resave_keeps_the_old_tag_until_the_new_one_is_complete(observed):
    found, _ = observed
    assert found["crash"] == "power cut before step-000001 was committed"
    assert found["after_crash"]["meta_unchanged"]  # the complete tag of the first save is untouched
    assert found["after_crash"]["listing"] == ["latest", "step-000001", "step-000001.partial"]
    assert found["after_resave"]["meta_changed"]
    assert found["after_resave"]["listing"] == ["latest", "step-000001"]  # swapped in, nothing left behind


def test_a_failed_write_is_told_by_its_errno_and_keeps_the_previous_checkpoint(observed):
    found, ckpt_dir = observed
    error = found["size_limit"]
    assert error.startswith(f"could not write checkpoint {ckpt_dir / 'step-000002'} (rank 0: File too large")
    assert "a file size limit is full" in error and "the previous checkpoint step-000001 is intact" in error
    assert found["after_size_limit"] == {"listing": ["latest", "step-000001"], "meta_unchanged": True}
