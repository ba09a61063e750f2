"""Saving and resuming training through the DeepSpeed engine, safely.

The layout of `RUN/checkpoints/` and the meta are `andy_dist.train.checkpoint_format`. A tag is
complete when its `andy_meta.json` exists: that file is written after every rank has finished
writing, and lists every file of the tag with its size. A crash during a save
therefore leaves a tag without meta, which `--resume` ignores, and `latest` still names the
previous checkpoint. The meta also holds the trainer's state (step, data position, best loss,
early-stopping counter, W&B id) as JSON, so resuming never depends on unpickling client state.

Resuming on a different number of ranks: ZeRO partitions (and the bf16 optimizer's) are tied to
the world size they were saved with, so such a checkpoint is first converted to DeepSpeed's
universal format (`deepspeed.checkpoint.ds_to_universal`, once, kept beside it as TAG_universal)
and loaded with `"checkpoint": {"load_universal": true}`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as torch_dist

from andy_dist import UserError
from andy_dist.train.checkpoint_format import (
    BEST_TAG,
    META_FILE,
    check_file_sizes,
    complete_step_tags,
    read_latest,
    read_meta,
    write_latest,
    write_meta,
)


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
    """Write a checkpoint on every rank; mark it complete and point `latest` at it on rank 0.

    All ranks must call this. `meta` describes the run (model config, precision, ...);
    `trainer_state` must be JSON-serialisable. `before_commit(tag)` runs on rank 0 between the ranks' files
    and the meta (the fault tests kill the process there).
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover of a crashed save (or an older run) must not mix in
    _barrier()
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write (disk full) as RuntimeError
        if not _is_write_failure(err):
            raise
        failure = err
        # DeepSpeed's writes sit between its collectives; the one this rank skipped is the barrier that
        # ends save_checkpoint, where the other ranks now wait. Meet them there, then all agree below.
        _barrier()
    _agree_saved(failure, ckpt_dir, tag)  # every rank's files are on disk before the checkpoint is declared complete
    if _rank() == 0:
        try:
            if before_commit is not None:
                before_commit(tag)
            write_meta(tag_dir, {**meta, "tag": tag, "saved_at": time.time(), "trainer_state": trainer_state})
            if update_latest:
                write_latest(ckpt_dir, tag)
        except OSError as err:
            failure = err
    _agree_saved(failure, ckpt_dir, tag)
    if _rank() == 0 and keep_last:
        rotate(ckpt_dir, keep_last)
    _barrier()
    return tag_dir


def _chain(err: BaseException | None) -> list[BaseException]:
    found = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _is_write_failure(err: Exception) -> bool:
    """A failed file write (disk full, quota, size limit), as opposed to a lost peer (gloo/NCCL errors).

    torch.save reports a failed write as RuntimeError ("file write failed"), and the zip writer's cleanup
    may replace it with another ("unexpected pos"); the original stays in the exception's context."""
    return any(isinstance(e, OSError) or "write" in str(e).lower() or "inline_container" in str(e)
               for e in _chain(err))


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
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    previous = read_latest(ckpt_dir)
    raise UserError(f"could not write checkpoint {ckpt_dir / tag} ({failed[0]}); "
                    + (f"the previous checkpoint {previous} is intact: free space, then --resume" if previous
                       else "no earlier checkpoint exists; free space and start again"))


def _describe(err: Exception) -> str:
    first = _chain(err)[-1]  # the original failure, not what a cleanup raised while handling it
    if isinstance(first, OSError) and first.strerror:
        text = f"{first.strerror}: {first.filename}" if first.filename else first.strerror
    else:
        text = str(first).strip().splitlines()[-1] if str(first).strip() else type(first).__name__
    return text


def save_best(engine, ckpt_dir: str | Path, trainer_state: dict, meta: dict) -> Path:
    """Replace `best/` with the current model, never leaving a moment without a complete best.

    The new one is written as `best.partial`, then swapped in by renames.
    """
    ckpt_dir = Path(ckpt_dir)
    save(engine, ckpt_dir, f"{BEST_TAG}.partial", trainer_state, meta, update_latest=False)
    if _rank() == 0:
        best, partial, old = ckpt_dir / BEST_TAG, ckpt_dir / f"{BEST_TAG}.partial", ckpt_dir / f"{BEST_TAG}.old"
        write_meta(partial, {**read_meta(partial), "tag": BEST_TAG})
        if old.exists():
            shutil.rmtree(old)
        if best.exists():
            os.replace(best, old)
        os.replace(partial, best)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{BEST_TAG}_universal", ignore_errors=True)
    _barrier()
    return ckpt_dir / BEST_TAG


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
    """Convert on rank 0 (once; kept as TAG_universal); returns the tag to load. All ranks call this."""
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
        (target / ".complete").write_text("")
    _barrier()
    return universal_tag


def load(engine, checkpoint: Checkpoint, tag: str | None = None) -> None:
    """Load weights, optimizer and LR schedule into the engine (all ranks)."""
    path, _ = engine.load_checkpoint(str(checkpoint.dir), tag=tag or checkpoint.tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed could not load {checkpoint.dir / (tag or checkpoint.tag)}")
