"""Fetch (or verify) the shards an epoch reads next, ahead of the read position; evict those it has passed.

One process per node runs a `Prefetcher` (the trainer picks local rank 0), in a background thread.
The training stream tells it the epoch order and, after each step, the position reached
(`ShardSet.follow_epoch`). From the epoch order it knows, for every train shard, the first and the last
position at which the epoch reads it; it then

* fetches the next `depth` shards by first use that this node does not hold yet (for local shard sets
  with `data_verify=once`: hashes them), so readers rarely wait for a download, and afterwards the
  validation shards, which every evaluation reads;
* when the cache holds more than `max_bytes`, deletes the shards whose last use lies behind the
  position (minus a margin of a few global batches, for ranks a step behind), earliest first, and
  prefetches only while the next shard fits under the limit.

A reader that needs a shard the prefetcher has not fetched fetches it itself (`ShardFiles.ensure`), so
the limit is a target: it must at least hold the shards one step reads. Note the epoch order
(`andy_dist.data.batch_plan`) shuffles blocks across all shards, so every shard is read early in an epoch
and again until late: a limit below the train split's size makes shards be fetched more than once
per epoch. Without a limit nothing is evicted and later epochs read from the cache.

Failures here are not reported: the reader that needs the shard meets the same failure and reports it.
"""

from __future__ import annotations

import threading

import numpy as np


def shard_use(order: np.ndarray, first_sample: np.ndarray, shard_of_block: np.ndarray,
              shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) position in `order` at which each shard is read; shards never read get (n, -1)."""
    n = len(order)
    first, last = np.full(shards, n, dtype=np.int64), np.full(shards, -1, dtype=np.int64)
    if n == 0:
        return first, last
    blocks = np.searchsorted(first_sample, order, side="right") - 1
    sequence = shard_of_block[blocks]
    used, at = np.unique(sequence, return_index=True)
    first[used] = at
    used, at_reversed = np.unique(sequence[::-1], return_index=True)
    last[used] = n - 1 - at_reversed
    return first, last


class Prefetcher:
    """See the module doc. `files` is the set's ShardFiles; `train` and `val` its ShardInfo lists."""

    def __init__(self, files, train: list, val: list, first_sample: np.ndarray, shard_of_block: np.ndarray,
                 depth: int = 4, max_bytes: int | None = None):
        self.files, self.train, self.val = files, train, val
        self.first_sample, self.shard_of_block = first_sample, shard_of_block
        self.depth, self.max_bytes = max(0, depth), max_bytes
        self._wake = threading.Condition()
        self._job: tuple[np.ndarray, int, int] | None = None  # (order, epoch, margin)
        self._position = 0
        self._schedule: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None  # epoch, first, last, by first
        self._stop = False
        self._thread: threading.Thread | None = None
        self._val_done = False
        self._failed: set[str] = set()

    def follow(self, order: np.ndarray, epoch: int, margin: int):
        """Start following epoch `epoch` (its sample order); returns `advance(position)` for the stream."""
        with self._wake:
            self._job, self._position = (order, epoch, margin), 0
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="andy-shard-prefetch", daemon=True)
            self._thread.start()
        return self.advance

    def advance(self, position: int) -> None:
        with self._wake:
            self._position = position
            self._failed.clear()  # a new position: retry what failed before (the server may be back)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        seen = None
        while True:
            with self._wake:
                while not self._stop and (self._job is None or seen == (id(self._job), self._position)):
                    self._wake.wait()
                if self._stop:
                    return
                job, position = self._job, self._position
                seen = (id(job), position)
            try:
                self._step(job, position)
            except Exception:  # noqa: BLE001 - the reader that needs the shard reports the failure
                pass

    def _uses(self, order: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._schedule is None or self._schedule[0] != epoch:
            first, last = shard_use(order, self.first_sample, self.shard_of_block, len(self.train))
            self._schedule = (epoch, first, last, np.argsort(first, kind="stable"))
        return self._schedule[1:]

    def _step(self, job: tuple[np.ndarray, int, int], position: int) -> None:
        order, epoch, margin = job
        first, last, by_first_use = self._uses(order, epoch)
        passed_before = position - margin
        held = self._held_bytes()
        if self.max_bytes is not None and held > self.max_bytes:  # readers fetched past the limit
            held -= self._evict_passed(last, passed_before, held - self.max_bytes)
        fetched = 0
        for index in by_first_use:
            if fetched >= self.depth or self._moved(job, position):
                return
            shard = self.train[index]
            if last[index] < position or first[index] >= len(order) or self.files.held(shard.name):
                continue
            if self.files.remote is not None and self.max_bytes is not None:
                if held + shard.bytes > self.max_bytes:
                    held -= self._evict_passed(last, passed_before, held + shard.bytes - self.max_bytes)
                if held + shard.bytes > self.max_bytes:
                    return  # no room until the epoch passes more shards
                held += shard.bytes
            self._fetch(shard)
            fetched += 1
        if not self._val_done and fetched < self.depth:
            for shard in self.val:
                self._fetch(shard)
            self._val_done = True

    def _fetch(self, shard) -> None:
        if shard.name in self._failed:
            return
        try:
            self.files.ensure(shard.name, shard.sha256, shard.bytes, reason="prefetch")
        except Exception:  # noqa: BLE001 - see _run
            self._failed.add(shard.name)

    def _moved(self, job, position: int) -> bool:
        with self._wake:
            return self._stop or self._job is not job or self._position != position

    def _held_bytes(self) -> int:
        if self.files.remote is None:
            return 0  # a local set is not a cache: nothing to evict
        return sum(s.bytes for s in self.train + self.val if self.files.cached(s.name))

    def _evict_passed(self, last: np.ndarray, before: int, excess: int) -> int:
        """Delete passed train shards (last use before `before`), earliest first, until `excess` bytes are freed."""
        freed = 0
        for index in np.argsort(last, kind="stable"):
            if freed >= excess or last[index] >= before:
                break
            if last[index] >= 0 and self.files.cached(self.train[index].name):
                freed += self.files.evict(self.train[index].name)
        return freed
