"""Saving and resuming training through the DeepSpeed engine, safely.

The layout of `RUN/checkpoints/` and the meta are `andy_dist.train.checkpoint_format`. A tag is
complete when its `andy_meta.json` exists. A save survives a crash and a power cut:

1. Every rank writes its files into `TAG.partial/`; each file goes through a Python file object and is
   fsynced by the rank that wrote it (so a failed write also carries its errno: a full disk is told
   from a peer's gloo/NCCL error by `OSError.errno`, never by the words of a message).
2. Once every rank has written, rank 0 fsyncs the whole folder and writes the meta (file, then directory
   entry fsynced), listing every file with its size.
3. Rank 0 swaps `TAG.partial` in: an existing `TAG` (a re-save, and always `best`) is renamed to
   `TAG.old` first and deleted only after the new one is in place, the checkpoint folder's entries
   fsynced; then `latest` is rewritten atomically.

A crash before 3 leaves `TAG.partial` without meta (or complete but not yet swapped in), which `--resume`
ignores: `latest` still names the previous checkpoint. A crash during 3 leaves `TAG.old` beside a
complete `TAG.partial`; the next save or resume finishes that swap (`recover`), so a complete `best/`
exists at all times once one was written. The meta also holds the trainer's state (step, data
position, best loss, early-stopping counter, W&B id) as JSON, so resuming never depends on unpickling
client state.

Resuming on a different number of ranks: ZeRO partitions (and the bf16 optimizer's) are tied to
the world size they were saved with, so such a checkpoint is first converted to DeepSpeed's
universal format (`deepspeed.checkpoint.ds_to_universal`, once, kept beside it as TAG_universal)
and loaded with `"checkpoint": {"load_universal": true}`. Its output is vetted like every other
checkpoint file before DeepSpeed unpickles it, whether converted now or found from an earlier run.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from andy_dist import UserError
from andy_dist.train.checkpoint_format import (
    BEST_TAG,
    META_FILE,
    check_file_sizes,
    complete_step_tags,
    fsync_dir,
    read_latest,
    read_meta,
    verify_checkpoint_files,
    write_latest,
    write_meta,
)

PARTIAL, OLD = ".partial", ".old"  # a tag being written; the tag a re-save replaces, until the swap is done
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


@dataclass
class Checkpoint:
    dir: Path
    tag: str
    meta: dict

    @property
    def path(self) -> Path:
        return self.dir / self.tag

    @property
    def state(self) -> dict:
        return self.meta["trainer_state"]


def save(engine, ckpt_dir: str | Path, tag: str, trainer_state: dict, meta: dict, keep_last: int | None = None,
         update_latest: bool = True, before_commit: Callable[[str], None] | None = None) -> Path:
    """Write a checkpoint on every rank; mark it complete, swap it in and point `latest` at it on rank 0.

    All ranks must call this; the steps are the module doc's. `meta` describes the run (model config,
    precision, ...); `trainer_state` must be JSON-serialisable. `before_commit(tag)` runs on rank 0 between
    the ranks' files and the meta (the fault tests kill the process there).
    """
    ckpt_dir = Path(ckpt_dir)
    staging = ckpt_dir / f"{tag}{PARTIAL}"
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        recover(ckpt_dir)
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a crashed save must not mix in
    _barrier()
    failure = None
    try:
        with _durable_writes(engine):
            engine.save_checkpoint(str(ckpt_dir), tag=staging.name, save_latest=False,
                                   client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    except (OSError, RuntimeError) as err:
        failure = _write_failure(err)
        if failure is None:  # not a failed write (a lost peer, a bug): not ours to explain
            raise
        # DeepSpeed's writes sit between its collectives; the one this rank skipped is the barrier that
        # ends save_checkpoint, where the other ranks now wait. Meet them there, then all agree below.
        _barrier()
    _agree_saved(failure, ckpt_dir, tag)  # every rank's files are on disk before the checkpoint is declared complete
    if _rank() == 0:
        try:
            if before_commit is not None:
                before_commit(tag)
            _fsync_tree(staging)
            write_meta(staging, {**meta, "tag": tag, "saved_at": time.time(), "trainer_state": trainer_state})
            _swap_in(ckpt_dir, tag)
            if update_latest:
                write_latest(ckpt_dir, tag)
        except OSError as err:
            failure = err
    _agree_saved(failure, ckpt_dir, tag)
    if _rank() == 0 and keep_last:
        rotate(ckpt_dir, keep_last)
    _barrier()
    return ckpt_dir / tag


@contextmanager
def _durable_writes(engine):
    """Route the files DeepSpeed's torch checkpoint engine writes through Python file objects, fsynced.

    torch.save to a path reports a failed write as a RuntimeError without an errno ("file write failed");
    through a file object the OSError itself is raised (chained under torch's error). Other checkpoint
    engines (DeepSpeed's fast or decoupled writers) keep their own I/O; `_fsync_tree` still covers them
    on a filesystem every rank shares."""
    writer = getattr(engine, "checkpoint_engine", None)
    if type(writer).__name__ != "TorchCheckpointEngine":
        yield
        return

    def save(state_dict, path):
        with open(path, "wb") as handle:
            torch.save(state_dict, handle, _use_new_zipfile_serialization=writer.zipfile_serialization)
            handle.flush()
            os.fsync(handle.fileno())

    writer.save = save  # an instance attribute: the class's own method again once removed below
    try:
        yield
    finally:
        vars(writer).pop("save", None)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, deepest first, then `folder` itself."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            fsync_dir(path)
        else:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def _swap_in(ckpt_dir: Path, tag: str) -> None:
    """Put the complete `TAG.partial` in place of `TAG`, deleting the replaced one only afterwards."""
    final, staging, old = ckpt_dir / tag, ckpt_dir / f"{tag}{PARTIAL}", ckpt_dir / f"{tag}{OLD}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)  # converted from the replaced checkpoint


def recover(ckpt_dir: Path) -> None:
    """Finish what a crash during `_swap_in` left: a complete `TAG.partial` with no `TAG` goes in place; a
    complete `TAG.old` with no `TAG` (the new one never completed) comes back; a replaced `TAG.old` goes."""
    for staging in sorted(Path(ckpt_dir).glob(f"*{PARTIAL}")):
        final = staging.with_name(staging.name[:-len(PARTIAL)])
        if not final.exists() and (staging / META_FILE).is_file():
            os.replace(staging, final)
    for old in sorted(Path(ckpt_dir).glob(f"*{OLD}")):
        final = old.with_name(old.name[:-len(OLD)])
        if not final.exists() and (old / META_FILE).is_file():
            os.replace(old, final)
        elif (final / META_FILE).is_file():
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(ckpt_dir)


def _chain(err: BaseException | None) -> list[BaseException]:
    found = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _write_failure(err: Exception) -> OSError | None:
    """The failed file write behind `err` (disk full, quota, size limit, I/O error), or None.

    Told by type and errno: an OSError anywhere in the exception's chain (torch.save through a file
    object keeps it as the context of its own RuntimeError). A peer's gloo or NCCL error ("Write error
    ... Broken pipe") carries no OSError, whatever its words, and is not taken for a full disk."""
    return next((e for e in _chain(err) if isinstance(e, OSError)), None)


def _agree_saved(failure: Exception | None, ckpt_dir: Path, tag: str) -> None:
    """A barrier that also tells every rank whether any rank failed to write its part of the checkpoint.

    A full disk (or a quota, or a file size limit) fails on some ranks only; if those ranks simply raised,
    the others would wait in the next collective until the process-group timeout. Instead all ranks
    learn of it here and stop with the same one-line error; rank 0 removes the partial tag (freeing the
    space it took) and `latest` keeps naming the previous complete checkpoint.
    """
    # torch.save's messages for a full disk are cryptic ("iostream error"): the free space says what happened.
    mine = None if failure is None else (f"rank {_rank()}: {_describe(failure)}; "
                                         f"{shutil.disk_usage(ckpt_dir).free / 2**20:.0f} MB free on that filesystem")
    if torch_dist.is_available() and torch_dist.is_initialized():
        reports: list = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(reports, mine)
    else:
        reports = [mine]
    failed = [report for report in reports if report]
    if not failed:
        return
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0:
        shutil.rmtree(ckpt_dir / f"{tag}{PARTIAL}", ignore_errors=True)  # the complete tags stay as they were
    previous = read_latest(ckpt_dir)
    raise UserError(f"could not write checkpoint {ckpt_dir / tag} ({failed[0]}); "
                    + (f"the previous checkpoint {previous} is intact: free space, then --resume" if previous
                       else "no earlier checkpoint exists; free space and start again"))


def _describe(err: Exception) -> str:
    first = _chain(err)[-1]  # the original failure, not what a cleanup raised while handling it
    if isinstance(first, OSError) and first.strerror:
        text = f"{first.strerror}: {first.filename}" if first.filename else first.strerror
        if first.errno in _DISK_FULL:
            text += " (the disk, a quota or a file size limit is full)"
    else:
        text = str(first).strip().splitlines()[-1] if str(first).strip() else type(first).__name__
    return text


def save_best(engine, ckpt_dir: str | Path, trainer_state: dict, meta: dict) -> Path:
    """Replace `best/` with the current model; a complete `best/` exists at every moment once one was written."""
    return save(engine, ckpt_dir, BEST_TAG, trainer_state, meta, update_latest=False)


def rotate(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete step checkpoints (never `best`, never `latest`)."""
    complete = complete_step_tags(ckpt_dir)
    latest = read_latest(ckpt_dir)
    for _, tag in complete[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)


def load_meta(ckpt_dir: str | Path, tag: str) -> Checkpoint:
    """Read and verify a checkpoint's meta: every listed file present with its recorded size."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir / tag)
    check_file_sizes(ckpt_dir / tag, meta)
    return Checkpoint(ckpt_dir, tag, meta)


def find_resume(ckpt_dir: str | Path) -> Checkpoint | None:
    """The checkpoint `--resume` uses: `latest` if complete, else the newest complete step tag."""
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0 and ckpt_dir.is_dir():
        recover(ckpt_dir)  # a save interrupted while swapping its tag in (a crash, a power cut)
    _barrier()
    if not ckpt_dir.is_dir():
        return None
    latest = read_latest(ckpt_dir)
    if latest and (ckpt_dir / latest / META_FILE).is_file():
        return load_meta(ckpt_dir, latest)
    complete = complete_step_tags(ckpt_dir)
    return load_meta(ckpt_dir, complete[-1][1]) if complete else None


def needs_universal(checkpoint: Checkpoint, world_size: int) -> bool:
    """True when the checkpoint holds partitioned optimizer state saved by another number of ranks."""
    partitioned = any("zero_pp_rank" in name for name in checkpoint.meta.get("files", {}))
    return partitioned and checkpoint.meta.get("world_size") != world_size


def convert_to_universal(checkpoint: Checkpoint) -> str:
    """Convert on rank 0 (once; kept as TAG_universal); returns the tag to load. All ranks call this.

    The output is vetted on every rank before anyone loads it (DeepSpeed unpickles these files with
    weights_only=False), also when an earlier run's `.complete` says it is there already: a folder beside
    the checkpoint is no more trusted than the checkpoint itself."""
    universal_tag = f"{checkpoint.tag}_universal"
    target = checkpoint.dir / universal_tag
    if _rank() == 0 and not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        print(f"converting {checkpoint.path} ({checkpoint.meta.get('world_size')} ranks) to a universal checkpoint")
        result = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint.path),
             "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"could not convert {checkpoint.path} to a universal checkpoint: "
                            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
        _fsync_tree(target)
        (target / ".complete").write_text("")
        fsync_dir(target)
    _barrier()
    verify_checkpoint_files(target)
    return universal_tag


def load(engine, checkpoint: Checkpoint, tag: str | None = None) -> None:
    """Load weights, optimizer and LR schedule into the engine (all ranks)."""
    path, _ = engine.load_checkpoint(str(checkpoint.dir), tag=tag or checkpoint.tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed could not load {checkpoint.dir / (tag or checkpoint.tag)}")
