"""Which samples go where: the epoch order, global batches, length buckets and micro-batches.

Pure arithmetic on sample ids and lengths, no I/O, identical in every process that computes it.
That is what makes the stream exact without any communication between ranks:

1. Epoch order (`EpochOrder`). For epoch e, a generator seeded with (seed, e) permutes the blocks
   (tar members of consecutive samples), lays their samples end to end, and shuffles the samples
   within each window of `window_blocks` consecutive blocks. The order is a permutation of all
   sample ids, new each epoch, and independent of the world size. Shuffling within windows rather
   than globally keeps reads local: a reader touches about `window_blocks` blocks at a time.
2. Global batches. Optimizer step i of an epoch takes the G = M x A x W samples at positions
   [p0 + iG, p0 + (i+1)G) of the order (p0 = 0 except on a resume with a changed global batch). The
   epoch ends when fewer than G samples remain: that remainder (at most G - 1 samples, different ones
   each epoch because the order changes) is dropped, so every rank runs the same number of steps.
3. Length buckets inside a global batch. The step's G lengths are capped by the sequence-length
   schedule, sorted (ties by position), and cut into W x A micro-batches of consecutive sorted
   samples, as evenly as possible in padded tokens (rows x longest row, what a forward pass costs):
   short rows share a micro-batch in greater numbers than long ones, so a micro-batch may hold more or
   fewer than M rows, and the largest one is never larger than with M rows each. The micro-batches
   are then dealt to the ranks, A each, largest first to the rank with the least padded tokens so far
   (ties rotate with the step; `assign_to_ranks`), so no rank is always the one with the longest rows
   (with j -> rank j mod W the last rank always was: the straggler every step waited for). The G
   samples of a step, and the token counts that normalise the loss, are the same for any W with the
   same G; only who computes which rows changes. The loss stays exact whatever the rows per
   micro-batch: the step divides the summed token losses by the global batch's target tokens
   (`andy_dist.train.step`).
4. Optional wider buckets (`bucket_window` L > 1). With few micro-batches per step (W x A small)
   a global batch of mixed lengths still pads a lot. Then the order is cut into windows of L global
   batches, each window sorted by length into L batches that are taken in a seeded random order. This
   is still a function of (seed, epoch, G) only, so resumes stay exact; steps then hold samples of
   similar length (the usual bucketing trade-off).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from andy_dist import UserError


class EpochOrder:
    """The per-epoch permutation of sample ids (step 1 of the module doc)."""

    def __init__(self, block_sizes: np.ndarray, seed: int, window_blocks: int = 16):
        if window_blocks < 1:
            raise UserError(f"shuffle window must be at least 1 block, got {window_blocks}")
        self.block_sizes = np.asarray(block_sizes, dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_sizes)])
        self.num_samples = int(self.block_starts[-1])
        self.seed = int(seed)
        self.window_blocks = window_blocks
        self._cached: tuple[int, np.ndarray] | None = None

    def __call__(self, epoch: int) -> np.ndarray:
        """(num_samples,) int64 sample ids in the order epoch `epoch` visits them."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        blocks = rng.permutation(len(self.block_sizes))
        order = np.concatenate([np.arange(self.block_starts[b], self.block_starts[b + 1]) for b in blocks]
                               ) if len(blocks) else np.zeros(0, np.int64)
        ends = np.concatenate([[0], np.cumsum(self.block_sizes[blocks])])
        for first in range(0, len(blocks), self.window_blocks):
            lo, hi = int(ends[first]), int(ends[min(first + self.window_blocks, len(blocks))])
            order[lo:hi] = order[lo:hi][rng.permutation(hi - lo)]
        self._cached = (epoch, order)
        return order


@dataclass(frozen=True)
class SeqLenSchedule:
    """Sequence-length warm-up: samples are cut to `cap(step)` tokens, growing linearly from `start`
    to `end` over `ramp_steps` optimizer steps (rounded down to a multiple of `multiple_of`).

    Cut samples keep their first cap tokens, and the token after the cut is the last target, so
    nothing is predicted across the cut; the rest of such a sample is not trained on that epoch.
    """

    start: int = 64
    end: int = 512
    ramp_steps: int = 1000
    multiple_of: int = 8

    def __post_init__(self):
        if not 2 <= self.start <= self.end:
            raise UserError(f"seq_len_schedule needs 2 <= start <= end, got start={self.start} end={self.end}")
        if self.ramp_steps < 0 or self.multiple_of < 1:
            raise UserError(f"seq_len_schedule needs ramp_steps >= 0 and multiple_of >= 1, got {self}")

    def cap(self, step: int) -> int:
        if step >= self.ramp_steps:
            return self.end
        length = self.start + (self.end - self.start) * step / self.ramp_steps
        return max(self.start, int(length) // self.multiple_of * self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepPlan:
    """The samples of one optimizer step and how they are split into micro-batches (all ranks)."""

    sample_ids: np.ndarray  # (G,) in epoch order
    micro_batches: list[np.ndarray]  # W*A arrays of sample ids, each sorted by (capped length, position)
    ranks: list[list[int]]  # rank r computes micro_batches[i] for i in ranks[r] (A each, in this order)
    cap: int  # longest sample length this step allows
    tokens: int  # real (capped) tokens of the global batch
    target_tokens: int  # targets (loss terms) of the global batch
    truncated_tokens: int  # tokens cut off by the schedule cap
    lengths: np.ndarray  # (G,) capped lengths of sample_ids: what the step computes (FLOPs at real lengths)

    def for_rank(self, rank: int, world_size: int) -> list[np.ndarray]:
        if world_size != len(self.ranks):
            raise ValueError(f"the plan is for {len(self.ranks)} ranks, not {world_size}")
        return [self.micro_batches[i] for i in self.ranks[rank]]


def balanced_partition(lengths: np.ndarray, parts: int) -> list[int]:
    """Boundaries (parts + 1 indices) cutting ascending `lengths` into `parts` non-empty contiguous groups
    that minimise the largest padded size (rows x longest row) of a group.

    Found by binary search on that size with a greedy check. Equal row counts are one such cut, so the
    largest group is never larger than with equal row counts; usually it is smaller, as the short rows
    gather in fuller groups.
    """
    n = len(lengths)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} rows into {parts} non-empty groups")
    lengths = np.asarray(lengths, dtype=np.int64)

    def greedy(limit: int) -> list[int] | None:
        bounds, start = [0], 0
        while start < n:
            if len(bounds) > parts:
                return None
            # rows [start, end) fit when (end - start) * lengths[end - 1] <= limit (lengths ascending)
            end = start + 1
            while end < n and (end + 1 - start) * lengths[end] <= limit:
                end += 1
            bounds.append(end)
            start = end
        return bounds if len(bounds) <= parts + 1 else None

    lo, hi = int(lengths.max()), int(n * lengths.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    bounds = greedy(lo)
    while len(bounds) < parts + 1:  # fewer groups than parts: split the group with the most rows
        sizes = np.diff(bounds)
        widest = int(np.argmax(sizes))
        bounds.insert(widest + 1, bounds[widest] + int(sizes[widest]) // 2)
    return bounds


def assign_to_ranks(costs: list[int], world_size: int, first: int = 0) -> list[list[int]]:
    """Deal len(costs) = W x A micro-batches to W ranks, A each, balancing each rank's total cost.

    Largest first, each to the rank with the smallest total so far among those still short of A; ties
    go to rank `first`, then first + 1, ... (the planner moves `first` every step, so that with one
    micro-batch per rank the largest one is not always rank 0's). Returns each rank's micro-batch
    indices, ascending.
    """
    per_rank, rest = divmod(len(costs), world_size)
    if rest or not per_rank:
        raise ValueError(f"{len(costs)} micro-batches do not deal evenly to {world_size} ranks")
    totals, ranks = [0] * world_size, [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank),
                   key=lambda r: (totals[r], (r - first) % world_size))
        ranks[rank].append(index)
        totals[rank] += costs[index]
    return [sorted(indices) for indices in ranks]


class BatchPlanner:
    """Steps 2 and 3 of the module doc for one split's lengths and epoch order."""

    def __init__(self, lengths: np.ndarray, order: EpochOrder, world_size: int, micro_batch_size: int,
                 grad_accum: int, max_seq_len: int, schedule: SeqLenSchedule | None = None,
                 bucket_window: int = 1):
        for name, value in (("world_size", world_size), ("micro_batch_size", micro_batch_size),
                            ("grad_accum", grad_accum), ("max_seq_len", max_seq_len)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        self.lengths = lengths
        self.order = order
        self.world_size, self.micro_batch_size, self.grad_accum = world_size, micro_batch_size, grad_accum
        self.max_seq_len = max_seq_len
        self.schedule = schedule
        if bucket_window < 1:
            raise UserError(f"bucket_window must be at least 1 global batch, got {bucket_window}")
        self.bucket_window = bucket_window
        self._window: tuple[tuple[int, int, int], list[np.ndarray]] | None = None

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def micro_batches_per_step(self) -> int:
        return self.world_size * self.grad_accum

    def steps_from(self, position: int) -> int:
        """Whole steps left in an epoch from sample position `position`."""
        return max(0, (self.order.num_samples - position) // self.global_batch)

    def cap(self, global_step: int) -> int:
        cap = self.max_seq_len if self.schedule is None else min(self.max_seq_len, self.schedule.cap(global_step))
        return cap

    def step_samples(self, epoch: int, position: int, origin: int = 0) -> np.ndarray:
        """The G sample ids of the step at `position` (a multiple of G after `origin`).

        bucket_window L = 1: positions [position, position + G) of the epoch order. L > 1: the order
        from `origin` is cut into windows of L global batches; each window is sorted by length and cut
        into L batches of similar lengths, which are taken in a random order (seeded by seed, epoch and
        window). Padding drops a lot; each step then holds samples of similar length.
        """
        G, L = self.global_batch, self.bucket_window
        order = self.order(epoch)
        if L == 1:
            ids = order[position:position + G]
            if len(ids) != G:
                raise IndexError(f"position {position} leaves no whole global batch in the epoch")
            return ids
        step = (position - origin) // G
        if (position - origin) % G or not 0 <= step < self.steps_from(origin):
            raise IndexError(f"position {position} is not a whole step after {origin} in the epoch")
        window, slot = divmod(step, L)
        key = (epoch, origin, window)
        if self._window is None or self._window[0] != key:
            start = origin + window * L * G
            batches = min(L, self.steps_from(origin) - window * L)
            ids = order[start:start + batches * G]
            ids = ids[np.argsort(self.lengths[ids], kind="stable")]
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.order.seed, epoch, origin,
                                                                             window, 1])))
            self._window = (key, [ids[b * G:(b + 1) * G] for b in rng.permutation(batches)])
        return self._window[1][slot]

    def plan(self, epoch: int, position: int, global_step: int, origin: int = 0) -> StepPlan:
        """The step that takes the samples at `position` of epoch `epoch` (see `step_samples`)."""
        ids = self.step_samples(epoch, position, origin)
        cap = self.cap(global_step)
        full = self.lengths[ids].astype(np.int64)
        capped = np.minimum(full, cap)
        by_length = np.argsort(capped, kind="stable")  # ties keep epoch order
        sorted_lengths = capped[by_length]
        bounds = balanced_partition(sorted_lengths, self.micro_batches_per_step)
        groups = [ids[by_length[bounds[j]:bounds[j + 1]]] for j in range(self.micro_batches_per_step)]
        padded = [(bounds[j + 1] - bounds[j]) * int(sorted_lengths[bounds[j + 1] - 1])
                  for j in range(self.micro_batches_per_step)]
        # A cut sample keeps one more target: the token right after the cut.
        targets = capped - (full <= cap)
        ranks = assign_to_ranks(padded, self.world_size, first=global_step)
        return StepPlan(ids, groups, ranks, cap, int(capped.sum()), int(targets.sum()), int((full - capped).sum()),
                        capped)


def validation_plan(lengths: np.ndarray, world_size: int, rank: int, micro_batch_size: int) -> list[np.ndarray]:
    """This rank's validation micro-batches: every sample once over all ranks, the same count per rank.

    Samples are sorted by length (ties by id) and cut into micro-batches of M; micro-batch j goes to
    rank j mod W. Ranks short of ceil(Q / W) get empty micro-batches (returned as empty arrays), which the
    stream turns into one all-PAD row contributing no tokens.
    """
    order = np.argsort(lengths, kind="stable")
    groups = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    per_rank = -(-len(groups) // world_size)
    mine = groups[rank::world_size]
    return mine + [np.zeros(0, dtype=np.int64)] * (per_rank - len(mine))
