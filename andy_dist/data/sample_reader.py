"""Random access to a shard set's samples by id.

`SampleReader` gives random access by sample id. The manifest records each block's sample count and
the byte offset of its first tar header, so reading a sample costs one seek plus one block read:
WebDataset's `tar_file_iterator` parses the two members from there and its npy decoder decodes them
(no pickle). A small LRU cache keeps recently used blocks, since the shuffled order visits a window of
blocks at a time (see `andy_dist.data.batch_plan`).
Files are opened through the set's `ShardFiles` (fetched into the node's cache first when remote),
and at most `MAX_OPEN_FILES` stay open.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import webdataset as wds
from webdataset.autodecode import npy_loads

from andy_dist import UserError
from andy_dist.data.shard_format import LENGTHS_MEMBER, REMAKE, TOKENS_MEMBER, block_key

if TYPE_CHECKING:
    from andy_dist.data.shard_reader import ShardInfo, ShardSet


class SampleReader:
    """Reads samples by id (0..N-1 within a split); one per process (it keeps files open)."""

    MAX_OPEN_FILES = 8  # shards kept open: bounded, so the cache's evicted files free their space

    def __init__(self, shard_set: ShardSet, split: str, cache_blocks: int = 32):
        self.split = split
        self.files = shard_set.files
        self.index = shard_set.block_index(split)
        self.vocab_size = shard_set.vocab_size
        self.cache_blocks = cache_blocks
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._files: OrderedDict[str, object] = OrderedDict()
        self.blocks_read = 0

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block, position in block) of each sample id."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        blocks = np.searchsorted(self.index.first_sample, sample_ids, side="right") - 1
        return blocks, sample_ids - self.index.first_sample[blocks]

    def read(self, sample_ids) -> list[np.ndarray]:
        """The token arrays of the samples, in the order asked."""
        blocks, positions = self.locate(sample_ids)
        out = []
        for block, position in zip(blocks.tolist(), positions.tolist()):
            tokens, starts = self.block(block)
            out.append(tokens[starts[position]:starts[position + 1]])
        return out

    def block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, starts) of a block: sample i is tokens[starts[i]:starts[i + 1]]."""
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        entry = self._read_block(number)
        self._cache[number] = entry
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return entry

    def _handle(self, shard: ShardInfo):
        handle = self._files.get(shard.name)
        if handle is None:
            handle = self._files[shard.name] = self.files.open(shard.name, shard.sha256, shard.bytes)
            if len(self._files) > self.MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard.name)
        return handle

    def _read_block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        shard = self.index.shards[number]
        path = self.files.describe(shard.name)
        offset = int(self.index.offsets[number])
        expected = int(self.index.sizes[number])
        key = None
        try:
            handle = self._handle(shard)
            handle.seek(offset)
            members = {}
            for member in wds.tariterators.tar_file_iterator(handle):
                key, suffix = wds.tariterators.base_plus_ext(member["fname"])
                members[suffix] = member["data"]
                if len(members) == 2:
                    break
            lengths = npy_loads(members[LENGTHS_MEMBER]).astype(np.int64)
            tokens = npy_loads(members[TOKENS_MEMBER])
        except UserError:
            raise
        except OSError as err:
            raise UserError(f"cannot read shard {path} ({err}); check the file or {REMAKE}") from None
        except Exception as err:
            raise UserError(f"shard {path} is corrupt at byte {offset} ({type(err).__name__}); "
                            f"run open_shards(verify='full') to check it, and copy it again or {REMAKE}") from None
        if key != block_key(number) or len(lengths) != expected \
                or int(lengths.sum()) != tokens.size:
            raise UserError(f"shard {path} block at byte {offset} does not match the manifest; {REMAKE}")
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise UserError(f"shard {path} holds token id {int(tokens.max())}, outside the vocabulary of "
                            f"{self.vocab_size}; {REMAKE} using the run's tokenizer")
        self.blocks_read += 1
        starts = np.concatenate([[0], np.cumsum(lengths)])
        return tokens, starts

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __getstate__(self):  # a fresh process opens its own files
        state = self.__dict__.copy()
        state["_files"], state["_cache"] = OrderedDict(), OrderedDict()
        return state
