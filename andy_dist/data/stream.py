"""Shards -> micro-batches per rank: an exact, resumable training stream and a validation stream.

    shards = open_shards("shards/NAME", tokenizer=tok, vocab_size=cfg.vocab_size)
    stream = TrainStream(shards, rank=r, world_size=W, micro_batch_size=M, grad_accum=A, seed=S,
                         num_workers=K, seq_len_schedule=SeqLenSchedule(64, 512, 1000))
    for step in stream.iter_epoch():          # one item per optimizer step, A micro-batches each
        for mb in step.micro_batches: ...     # MicroBatch: input_ids, targets, attention_mask (B, T)
        checkpoint["data"] = stream.state_dict()

What WebDataset gives and what this package adds. From `webdataset` we take the shard format
(plain tar, samples grouped by key), `TarWriter` to write it, `tar_file_iterator` and the npy decoder
to read it, and a `SimpleShardList -> tarfile_to_samples` pipeline to check whole shards.
WebDataset's own node/worker splitting hands out whole shards and has no resumable position, so
ranks can get unequal work, fewer shards than readers leaves readers idle, and a resume replays or
skips data. Instead this module plans at the level of samples (`andy_dist.data.batch_plan`): every process
derives the same epoch order and the same global batches from (seed, epoch, lengths index), takes its
own rows, and reads them by seeking to the blocks that hold them (`andy_dist.data.shard_reader`). Hence:

* Exactly once, disjoint: each step's G = M x A x W samples are a slice of a permutation of the train
  split, split into W x A micro-batches; a rank's micro-batch j (counting through the epoch) is built
  by DataLoader worker j mod K only, and PyTorch returns worker results round-robin, so the rank sees
  its micro-batches in order for any K.
* Equal counts: every rank runs steps_per_epoch = N div G steps of exactly A micro-batches. The epoch
  remainder (N mod G < G samples, different ones each epoch) is dropped.
* Any shard count >= 1 works, since readers split samples, not shards.
* Resume: the state is (epoch, sample position in the epoch order, steps done, seed, schedule), all
  independent of W and K; loading it only moves the position, and nothing skipped is read. A resume
  with another world size at the same G continues with the same global batches.
* Batches: right-padded with PAD; attention_mask 1 on real tokens; targets are the next tokens with
  PAD where there is none (padding, a sample's last token). Padding is low because micro-batches are
  length buckets of the global batch, and lower still with `bucket_window` > 1, which sorts windows
  of several global batches (see `andy_dist.data.batch_plan`; `MicroBatch.padding_fraction` reports it).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from andy_dist import PAD_ID, UserError
from andy_dist.data.batch_plan import BatchPlanner, EpochOrder, SeqLenSchedule, StepPlan, validation_plan
from andy_dist.data.shard_reader import ShardSet

__all__ = ["MicroBatch", "TrainStep", "TrainStream", "ValStream", "collate"]

STATE_VERSION = 1


@dataclass
class MicroBatch:
    """One micro-batch of B rows padded to T tokens."""

    input_ids: torch.Tensor  # (B, T) int64, PAD after each row's tokens
    targets: torch.Tensor  # (B, T) int64, next token; PAD where the input is padding or has no next token
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    sample_ids: torch.Tensor  # (B,) int64 ids within the split; -1 for a filler row
    num_tokens: int  # real input tokens
    num_target_tokens: int  # loss terms (targets != PAD)
    step: int = -1  # which item of the iteration produced it (order check)
    index: int = -1  # which micro-batch of that step
    worker: int = -1  # the DataLoader worker that built it (-1: the main process)

    @property
    def padding_fraction(self) -> float:
        """Share of the B x T positions that are padding."""
        return 1.0 - self.num_tokens / max(1, self.input_ids.numel())

    def pin_memory(self) -> "MicroBatch":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        return MicroBatch(self.input_ids.pin_memory(), self.targets.pin_memory(), self.attention_mask.pin_memory(),
                          self.sample_ids, self.num_tokens, self.num_target_tokens, self.step, self.index, self.worker)

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.targets), move(self.attention_mask), self.sample_ids,
                          self.num_tokens, self.num_target_tokens, self.step, self.index, self.worker)


def collate(samples: list[np.ndarray], cap: int, sample_ids, step: int = -1, index: int = -1) -> MicroBatch:
    """Pad samples (cut to `cap` tokens) into a MicroBatch. No samples: one all-PAD row (0 tokens)."""
    if not samples:
        empty = torch.full((1, 1), PAD_ID, dtype=torch.int64)
        return MicroBatch(empty, empty.clone(), torch.zeros(1, 1, dtype=torch.int64),
                          torch.full((1,), -1, dtype=torch.int64), 0, 0, step, index)
    lengths = [min(len(s), cap) for s in samples]
    rows, width = len(samples), max(lengths)
    input_ids = np.full((rows, width), PAD_ID, dtype=np.int64)
    targets = np.full((rows, width), PAD_ID, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        input_ids[row, :length] = sample[:length]
        mask[row, :length] = 1
        predicted = min(len(sample) - 1, length)  # a cut sample also predicts the token after the cut
        targets[row, :predicted] = sample[1:1 + predicted]
    num_targets = int(sum(min(len(s) - 1, n) for s, n in zip(samples, lengths)))
    return MicroBatch(torch.from_numpy(input_ids), torch.from_numpy(targets), torch.from_numpy(mask),
                      torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)), int(sum(lengths)), num_targets,
                      step, index)


# ---------------------------------------------------------------------------------------------
# Work lists: what micro-batch number j of one pass is; shared by the main process and workers.


class _TrainJob:
    """The rank's micro-batches of an epoch from a position: item j = step j div A, micro-batch j mod A."""

    def __init__(self, planner: BatchPlanner, epoch: int, position: int, global_step: int, steps: int, rank: int,
                 origin: int = 0):
        self.planner, self.epoch, self.position, self.global_step = planner, epoch, position, global_step
        self.steps, self.rank, self.origin = steps, rank, origin
        self._plan: tuple[int, StepPlan] | None = None

    def plan(self, step: int) -> StepPlan:
        if self._plan is None or self._plan[0] != step:
            position = self.position + step * self.planner.global_batch
            self._plan = (step, self.planner.plan(self.epoch, position, self.global_step + step, self.origin))
        return self._plan[1]

    def __len__(self) -> int:
        return self.steps * self.planner.grad_accum

    def item(self, j: int) -> tuple[np.ndarray, int, int, int]:
        step, index = divmod(j, self.planner.grad_accum)
        plan = self.plan(step)
        return plan.for_rank(self.rank, self.planner.world_size)[index], plan.cap, step, index


class _ValJob:
    def __init__(self, groups: list[np.ndarray], cap: int):
        self.groups, self.cap = groups, cap

    def __len__(self) -> int:
        return len(self.groups)

    def item(self, j: int) -> tuple[np.ndarray, int, int, int]:
        return self.groups[j], self.cap, j, 0


@dataclass
class _Failure:
    """A UserError raised in a worker, carried to the main process as a value (a clean message)."""

    message: str


class _MicroBatches(IterableDataset):
    """Builds a job's micro-batches; DataLoader worker k of K builds items k, k + K, k + 2K, ..."""

    def __init__(self, shard_set: ShardSet, split: str, job):
        self.shard_set, self.split, self.job = shard_set, split, job

    def __iter__(self) -> Iterator[MicroBatch | _Failure]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.shard_set.reader(self.split)
        try:
            for j in range(worker, len(self.job), workers):
                ids, cap, step, index = self.job.item(j)
                try:
                    batch = collate(reader.read(ids), cap, ids, step, index)
                    batch.worker = worker if info is not None else -1
                    yield batch
                except UserError as err:
                    yield _Failure(str(err))
                    return
        finally:
            reader.close()


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # K workers per rank share the cores with the training process
    # A SIGTERM sent to a whole process group (a launcher's, a terminal's, a scheduler's) is meant for
    # the rank, which finishes its step, checkpoints and exits; a worker killed by it would crash the
    # rank's DataLoader first and lose that checkpoint. The worker ends with its rank instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _iterate(dataset: _MicroBatches, num_workers: int, prefetch_factor: int,
             pin_memory: bool = False) -> Iterator[MicroBatch]:
    """The dataset's micro-batches in order, through K DataLoader workers (0: in this process)."""
    if num_workers == 0:
        source = iter(dataset)
        loader_iter = None
    else:
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor,
                            worker_init_fn=_worker_init, persistent_workers=False, pin_memory=pin_memory)
        source = loader_iter = iter(loader)
    try:
        for item in source:
            if isinstance(item, _Failure):
                raise UserError(item.message)
            yield item
    finally:
        if loader_iter is not None:
            loader_iter._shutdown_workers()  # the consumer may stop early (end of training)


def _check_lengths(shard_set: ShardSet, split: str, max_seq_len: int) -> np.ndarray:
    lengths = shard_set.lengths(split)
    if len(lengths) and int(lengths.max()) > max_seq_len:
        raise UserError(f"{shard_set.location} holds {split} samples of up to {int(lengths.max())} tokens, more than "
                        f"max_seq_len={max_seq_len}; re-create the shards with tools/make_shards.py "
                        f"--max-seq-len {max_seq_len}")
    return lengths


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainStep:
    """One optimizer step's data for this rank."""

    epoch: int
    step_in_epoch: int
    global_step: int  # optimizer steps before this one, over all epochs (the schedule position)
    micro_batches: list[MicroBatch]  # exactly grad_accum, on every rank
    sample_ids: np.ndarray  # this rank's sample ids, micro-batch by micro-batch
    global_sample_ids: np.ndarray  # the G samples of the step, all ranks, in epoch order
    seq_len: int  # the length cap this step
    global_tokens: int  # real tokens in the whole global batch
    global_target_tokens: int  # loss terms in the whole global batch: divide the summed loss by this
    truncated_tokens: int  # tokens of the global batch cut off by the sequence-length schedule
    global_lengths: np.ndarray  # (G,) the real (capped) length of each sample of the global batch

    @property
    def padding_fraction(self) -> float:
        positions = sum(mb.input_ids.numel() for mb in self.micro_batches)
        return 1.0 - sum(mb.num_tokens for mb in self.micro_batches) / max(1, positions)


class TrainStream:
    """The training split as optimizer steps for one rank; see the module doc for the guarantees."""

    def __init__(self, shards: ShardSet, rank: int, world_size: int, micro_batch_size: int, grad_accum: int = 1,
                 seed: int = 0, num_workers: int = 0, seq_len_schedule: SeqLenSchedule | None = None,
                 max_seq_len: int = 512, shuffle_window_blocks: int = 16, prefetch_factor: int = 4,
                 pin_memory: bool = False, bucket_window: int = 1):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.seed, self.num_workers, self.prefetch_factor = int(seed), num_workers, prefetch_factor
        self.pin_memory = pin_memory and num_workers > 0 and torch.cuda.is_available()
        lengths = _check_lengths(shards, "train", max_seq_len)
        self.order = EpochOrder(shards.block_index("train").sizes, self.seed, shuffle_window_blocks)
        self.planner = BatchPlanner(lengths, self.order, world_size, micro_batch_size, grad_accum, max_seq_len,
                                    seq_len_schedule, bucket_window)
        if self.steps_per_epoch == 0:
            raise UserError(f"the train split of {shards.location} has {len(lengths)} samples, fewer than one global "
                            f"batch of {self.global_batch} (micro_batch_size x grad_accum x world_size); "
                            f"lower the batch size or add data")
        self.epoch = 0
        self.samples_in_epoch = 0
        self.bucket_origin = 0  # where this epoch's bucket windows start (moves only on a resume with a new G)
        self.steps_in_epoch = 0
        self.consumed_samples = 0
        self.consumed_steps = 0

    @property
    def global_batch(self) -> int:
        return self.planner.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a whole epoch, the same on every rank: N div G."""
        return self.planner.steps_from(0)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out at the end of each epoch (N mod G, always < G)."""
        return self.order.num_samples - self.steps_per_epoch * self.global_batch

    def iter_epoch(self) -> Iterator[TrainStep]:
        """The steps from the current position to the end of the current epoch.

        The position moves as each step is handed out, so `state_dict()` taken while step i is being
        trained (or after) resumes at step i + 1. After the last step the stream is at the start of the
        next epoch.
        """
        epoch, start, global_step = self.epoch, self.samples_in_epoch, self.consumed_steps
        steps = self.planner.steps_from(start)
        if steps == 0:
            self._move_to(start)
            return
        # A remote shard set is fetched ahead of this position (and evicted behind it) by one process per node.
        margin = (self.planner.bucket_window + 2) * self.global_batch
        follow = self.shards.follow_epoch(self.order(epoch), epoch, margin)
        if follow is not None:
            follow(start)
        job = _TrainJob(self.planner, epoch, start, global_step, steps, self.rank, self.bucket_origin)
        batches = _iterate(_MicroBatches(self.shards, "train", job), self.num_workers, self.prefetch_factor,
                           self.pin_memory)
        grad_accum = self.planner.grad_accum
        try:
            for step in range(steps):
                plan = job.plan(step)
                micro_batches = [next(batches) for _ in range(grad_accum)]
                for index, mb in enumerate(micro_batches):
                    assert (mb.step, mb.index) == (step, index), "micro-batches arrived out of order"
                step_in_epoch = self.steps_in_epoch
                self.steps_in_epoch += 1
                self.consumed_steps += 1
                self.consumed_samples += self.global_batch
                self._move_to(start + (step + 1) * self.global_batch)
                if follow is not None:
                    follow(start + (step + 1) * self.global_batch)
                yield TrainStep(
                    epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step + step,
                    micro_batches=micro_batches,
                    sample_ids=np.concatenate([mb.sample_ids.numpy() for mb in micro_batches]),
                    global_sample_ids=plan.sample_ids, seq_len=plan.cap, global_tokens=plan.tokens,
                    global_target_tokens=plan.target_tokens, truncated_tokens=plan.truncated_tokens,
                    global_lengths=plan.lengths)
        finally:
            batches.close()

    def _move_to(self, position: int) -> None:
        """Set the position in the epoch order; with no whole step left, go to the next epoch's start."""
        self.samples_in_epoch = position
        if self.planner.steps_from(position) == 0:
            self.epoch += 1
            self.samples_in_epoch = 0
            self.bucket_origin = 0
            self.steps_in_epoch = 0

    def _identity(self) -> dict:
        """What must agree between a saved state and this stream for the continuation to be exact."""
        schedule = self.planner.schedule
        return {
            "seed": self.seed,
            "train_fingerprint": self.shards.fingerprint("train"),
            "num_samples": self.order.num_samples,
            "shuffle_window_blocks": self.order.window_blocks,
            "max_seq_len": self.planner.max_seq_len,
            "seq_len_schedule": schedule.to_dict() if schedule is not None else None,
            "bucket_window": self.planner.bucket_window,
        }

    def state_dict(self) -> dict:
        """A small JSON-able position, independent of the world size and the number of workers."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "steps_in_epoch": self.steps_in_epoch,
            "consumed_samples": self.consumed_samples,
            "consumed_steps": self.consumed_steps,
            "global_batch": self.global_batch,
            "bucket_origin": self.bucket_origin,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken, without reading anything in between.

        The world size may differ; with the same global batch the steps are exactly those of an
        uninterrupted run. With a different global batch the run continues from the same sample
        position (still exactly once per epoch), in batches of the new size.
        """
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data state version {state.get('version')} is not {STATE_VERSION}; "
                            f"it was saved by another version of andy_dist")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise UserError(f"cannot resume the data stream: the checkpoint has {key}={state.get(key)!r}, "
                                f"this run has {mine!r}; run with the checkpoint's {key} (same shards, seed, "
                                f"max_seq_len and sequence-length schedule)")
        position, origin = int(state["samples_in_epoch"]), int(state.get("bucket_origin", 0))
        if int(state["global_batch"]) != self.global_batch and self.planner.bucket_window > 1:
            window = self.planner.bucket_window * int(state["global_batch"])
            if (position - origin) % window:
                raise UserError(f"cannot change the global batch ({state['global_batch']} -> {self.global_batch}) "
                                f"in the middle of a length-bucket window (bucket_window="
                                f"{self.planner.bucket_window}); resume with the old global batch")
            origin = position  # the new run's windows start where the old ones stopped
        self.bucket_origin = origin
        self.epoch = int(state["epoch"])
        self.steps_in_epoch = int(state["steps_in_epoch"])
        self.consumed_samples = int(state["consumed_samples"])
        self.consumed_steps = int(state["consumed_steps"])
        self._move_to(position)


# ---------------------------------------------------------------------------------------------
# Validation


class ValStream:
    """Every validation sample exactly once per pass over all ranks; the same micro-batch count on each.

    Iterate it once per evaluation. Ranks with fewer real micro-batches get all-PAD ones (one row,
    no tokens, no targets) so no rank waits for another in a collective. Samples are bucketed by
    length (sorted, then cut into micro-batches of M) to keep padding low.

    Bits per byte: one pass sums the loss over `target_tokens` predictions (every token but each
    sample's first), so bpb = summed loss / ln 2 / `text_bytes`. The first token of a continuation
    piece of a cut document is not predicted, so this slightly under-counts on long documents.
    """

    def __init__(self, shards: ShardSet, rank: int, world_size: int, micro_batch_size: int,
                 max_seq_len: int = 512, num_workers: int = 0, prefetch_factor: int = 4):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if micro_batch_size < 1:
            raise UserError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if shards.num_samples("val") == 0:
            raise UserError(f"the val split of {shards.location} is empty; re-create the shards with "
                            f"--val-fraction > 0")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        lengths = _check_lengths(shards, "val", max_seq_len)
        self.job = _ValJob(validation_plan(lengths, world_size, rank, micro_batch_size), max_seq_len)

    def __len__(self) -> int:
        return len(self.job)

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples("val")

    @property
    def target_tokens(self) -> int:
        """Loss terms of one whole pass over all ranks."""
        return self.shards.target_tokens("val")

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the validation text: bits per byte = summed loss / ln 2 / text_bytes."""
        return self.shards.text_bytes("val")

    def __iter__(self) -> Iterator[MicroBatch]:
        return _iterate(_MicroBatches(self.shards, "val", self.job), self.num_workers, self.prefetch_factor)
