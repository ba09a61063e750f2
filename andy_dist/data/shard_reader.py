"""Open and check a shard set, and read its samples by id (the format: `andy_dist.data.shard_format`).

The set is a local folder or a URL (`andy_dist.data.remote`); its files are reached through
`andy_dist.data.shard_cache.ShardFiles`, which copies remote files into the node's cache and checks
each file before its first read. `open_shards()` checks what can be checked before training starts
and turns each problem into a `UserError` that names the file and the fix: a missing or malformed
manifest, a missing, truncated or modified shard, a shard set made with another tokenizer or
vocabulary, token ids outside the vocabulary, an empty split. How much is read at the start is
`verify`:

    size    the manifest, the lengths files and (local sets) every shard's size; nothing else
    once    as size, and each shard's sha256 checked once per node before its first read, the result
            remembered (the trainer's default: start-up does not read the dataset)
    sha256  as size, and every shard hashed at every start (remote: every shard downloaded first)
    full    as sha256, and every shard read through a plain WebDataset pipeline
(`SimpleShardList -> tarfile_to_samples`; only the two .npy members are decoded, never by pickle)
and checks every block: its members, key, sample count, lengths against the lengths file, and its
largest token id.

Reading samples by id: `andy_dist.data.sample_reader`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import webdataset as wds
from webdataset.autodecode import npy_loads

from andy_dist import UserError
from andy_dist.data.prefetch import Prefetcher
from andy_dist.data.shard_cache import VERIFY_LEVELS, DataAccess, ShardFiles
from andy_dist.data.shard_format import LENGTHS_MEMBER, MANIFEST, REMAKE, SPLITS, TOKENS_MEMBER, block_key
from andy_dist.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from andy_dist.data.sample_reader import SampleReader

__all__ = ["VERIFY_LEVELS", "BlockIndex", "ShardInfo", "ShardSet", "open_shards"]


@dataclass(frozen=True)
class ShardInfo:
    name: str  # the file name the manifest gives
    path: Path  # where it is read: the shard set's folder, or this node's cache
    samples: int
    tokens: int
    sha256: str
    bytes: int
    max_token_id: int
    block_offsets: tuple[int, ...]
    block_samples: tuple[int, ...]


@dataclass(frozen=True)
class BlockIndex:
    """Where every block of a split lives: shard path, byte offset, first sample id, sample count."""

    paths: tuple[Path, ...]  # per block
    shards: tuple[ShardInfo, ...]  # per block
    offsets: np.ndarray  # (blocks,) byte offset of the block's first tar header
    first_sample: np.ndarray  # (blocks + 1,) cumulative sample counts
    shard_of_block: np.ndarray  # (blocks,)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.first_sample)

    def __len__(self) -> int:
        return len(self.offsets)


class ShardSet:
    """A checked shard set: manifest, shard lists per split, sample lengths and block index."""

    def __init__(self, files: ShardFiles, manifest: dict):
        self.files = files
        self.dir = files.directory  # where the files are read (the node's cache for a remote set)
        self.location = files.location  # what the user named: a folder or a URL
        self.manifest = manifest
        self._shards = {split: [_shard_info(files, entry) for entry in manifest["splits"][split]["shards"]]
                        for split in SPLITS}
        self._lengths: dict[str, np.ndarray] = {}
        self._prefetcher: Prefetcher | None = None

    # --- what the manifest says -----------------------------------------------------------------
    @property
    def train(self) -> list[ShardInfo]:
        return self._shards["train"]

    @property
    def val(self) -> list[ShardInfo]:
        return self._shards["val"]

    def shards(self, split: str) -> list[ShardInfo]:
        return self._shards[_check_split(split)]

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    def _split(self, split: str) -> dict:
        return self.manifest["splits"][_check_split(split)]

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def tokens(self, split: str) -> int:
        """Tokens in the split's samples, BOS and EOS included."""
        return int(self._split(split)["tokens"])

    def target_tokens(self, split: str) -> int:
        """Next-token predictions in the split: the sum over samples of (length - 1)."""
        return int(self._split(split)["target_tokens"])

    def text_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text the split's samples cover (for bits per byte)."""
        return int(self._split(split)["text_bytes"])

    def documents(self, split: str) -> int:
        return int(self._split(split)["documents"])

    def fingerprint(self, split: str) -> str:
        """A short hash of the split's shard hashes: names the exact data a stream position refers to."""
        digest = hashlib.sha256("".join(s.sha256 for s in self.shards(split)).encode()).hexdigest()
        return digest[:16]

    # --- indexes ----------------------------------------------------------------------------------
    def lengths(self, split: str) -> np.ndarray:
        """(samples,) uint32 token count of every sample, by sample id."""
        if split not in self._lengths:
            entry = self._split(split)
            path = self.files.ensure(entry["lengths_file"], entry.get("lengths_sha256"), None)
            self._lengths[split] = _load_lengths(path, self.num_samples(split))
        return self._lengths[split]

    def block_index(self, split: str) -> BlockIndex:
        paths, shards, offsets, sizes, shard_of_block = [], [], [], [], []
        for shard_number, shard in enumerate(self.shards(split)):
            for offset, samples in zip(shard.block_offsets, shard.block_samples):
                paths.append(shard.path)
                shards.append(shard)
                offsets.append(offset)
                sizes.append(samples)
                shard_of_block.append(shard_number)
        return BlockIndex(tuple(paths), tuple(shards), np.asarray(offsets, dtype=np.int64),
                          np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]),
                          np.asarray(shard_of_block, dtype=np.int64))

    def reader(self, split: str, cache_blocks: int = 32) -> "SampleReader":
        from andy_dist.data.sample_reader import SampleReader

        return SampleReader(self, split, cache_blocks)

    # --- fetching ahead (remote sets, or verification once per node) ---------------------------
    def start_prefetch(self, depth: int, max_bytes: int | None) -> None:
        """Fetch (or verify) train shards ahead of the position `follow_epoch` reports, in this process."""
        if self._prefetcher is None and (self.files.remote is not None or self.files.verify == "once"):
            index = self.block_index("train")
            self._prefetcher = Prefetcher(self.files, self.train, self.val, index.first_sample, index.shard_of_block,
                                          depth, max_bytes)

    def follow_epoch(self, order: np.ndarray, epoch: int, margin: int):
        """`advance(position)` for the stream to call after each step of epoch `epoch` (None: no prefetching).

        order: the epoch's sample ids in reading order; margin: samples behind the position that ranks a
        step behind may still read (their shards are not evicted yet)."""
        if self._prefetcher is None:
            return None
        return self._prefetcher.follow(order, epoch, margin)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __getstate__(self):  # DataLoader workers read; only the process that started it prefetches
        state = self.__dict__.copy()
        state["_prefetcher"] = None
        return state

    def __repr__(self) -> str:
        return (f"ShardSet({self.location}, train={self.num_samples('train')} samples/{len(self.train)} shards, "
                f"val={self.num_samples('val')} samples/{len(self.val)} shards)")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _shard_info(files: ShardFiles, entry: dict) -> ShardInfo:
    blocks = entry["blocks"]
    return ShardInfo(entry["file"], files.path(entry["file"]), int(entry["samples"]), int(entry["tokens"]),
                     entry["sha256"], int(entry["bytes"]), int(entry["max_token_id"]), tuple(int(b[0]) for b in blocks),
                     tuple(int(b[1]) for b in blocks))


def _load_lengths(path: Path, samples: int) -> np.ndarray:
    try:
        lengths = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is missing or unreadable ({err}); {REMAKE}") from None
    if lengths.shape != (samples,):
        raise UserError(f"{path} holds {lengths.size} lengths, the manifest says {samples} samples; {REMAKE}")
    return lengths


# ---------------------------------------------------------------------------------------------
# Opening and checking


def open_shards(
    location: str | Path | ShardFiles,
    tokenizer: Tokenizer | str | Path | None = None,
    vocab_size: int | None = None,
    verify: str = "full",
    require_val: bool = True,
    access: DataAccess | None = None,
) -> ShardSet:
    """Open `location` (a shard set written by tools/make_shards.py: a folder or a URL) and check it.

    tokenizer: the run's tokenizer (object or path); its sha256 must match the one the shards were made with.
    vocab_size: the model's vocabulary size; it must equal the shards' and exceed every token id.
    verify: "size", "once", "sha256" or "full"; see the module doc.
    require_val: an empty validation split is an error (the trainer evaluates on it).
    access: cache, credentials, retries and prefetching (`andy_dist.data.shard_cache.DataAccess`).
    A `ShardFiles` already made for the location (to read its tokenizer first) may replace `location`.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    access = access or DataAccess()
    files = location if isinstance(location, ShardFiles) else ShardFiles(location, access, verify)
    shard_set = ShardSet(files, files.manifest())
    where = files.describe(MANIFEST)
    _check_tokenizer(shard_set, tokenizer, vocab_size)
    for split in SPLITS:
        if shard_set.num_samples(split) == 0 and (split == "train" or require_val):
            raise UserError(f"{where}: the {split} split is empty; "
                            f"{'add text to the input' if split == 'train' else 'make it with --val-fraction > 0'} "
                            f"and {REMAKE}")
        for shard in shard_set.shards(split):
            _check_file(files, shard, verify)
        lengths = shard_set.lengths(split)
        if int(lengths.sum(dtype=np.int64)) != shard_set.tokens(split):
            raise UserError(f"{files.describe(shard_set._split(split)['lengths_file'])} does not match the "
                            f"manifest's token count for {split}; {REMAKE}")
        if verify == "full":
            _check_blocks(shard_set, split)
    if access.prefetch:
        shard_set.start_prefetch(access.prefetch_shards, access.max_bytes)
    return shard_set


def _check_tokenizer(shard_set: ShardSet, tokenizer, vocab_size: int | None) -> None:
    where = shard_set.files.describe(MANIFEST)
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
        if tok.sha256 != shard_set.tokenizer_sha256:
            raise UserError(f"{shard_set.location} was made with a different tokenizer (sha256 "
                            f"{shard_set.tokenizer_sha256[:12]}) than this run's (sha256 {tok.sha256[:12]}); "
                            f"re-create the shards with this tokenizer (tools/make_shards.py --tokenizer) "
                            f"or use the tokenizer they were made with")
        if tok.vocab_size != shard_set.vocab_size:
            raise UserError(f"{where} says vocab_size {shard_set.vocab_size} but the tokenizer has "
                            f"{tok.vocab_size}; {REMAKE}")
    if vocab_size is not None and vocab_size != shard_set.vocab_size:
        raise UserError(f"{where}: the shards were made with a {shard_set.vocab_size}-piece vocabulary but the "
                        f"model has vocab_size {vocab_size}; set the model's vocab_size to the tokenizer's or "
                        f"re-create the shards with the run's tokenizer")
    limit = vocab_size if vocab_size is not None else shard_set.vocab_size
    for split in SPLITS:
        for shard in shard_set.shards(split):
            if shard.max_token_id >= limit:
                raise UserError(f"{shard_set.files.describe(shard.name)} holds token id {shard.max_token_id}, "
                                f"outside the vocabulary of {limit}; {REMAKE} using the run's tokenizer")


def _check_file(files: ShardFiles, shard: ShardInfo, verify: str) -> None:
    """Sizes of local shards; with verify sha256/full, every shard's hash (a remote one is fetched first)."""
    if files.remote is None:
        if not shard.path.is_file():
            raise UserError(f"shard {shard.path} is missing; restore it or {REMAKE}")
        size = shard.path.stat().st_size
        if size < shard.bytes:
            raise UserError(f"shard {shard.path} is truncated ({size} of {shard.bytes} bytes); "
                            f"copy it again or {REMAKE}")
        if size != shard.bytes:
            raise UserError(f"shard {shard.path} has {size} bytes, the manifest says {shard.bytes}; "
                            f"it was modified: copy it again or {REMAKE}")
    if verify in ("sha256", "full"):
        files.ensure(shard.name, shard.sha256, shard.bytes, recheck=True)


def _check_blocks(shard_set: ShardSet, split: str) -> None:
    """Read every shard through a WebDataset pipeline and compare each block with the manifest."""
    lengths = shard_set.lengths(split)
    limit = shard_set.vocab_size
    next_sample = 0
    block_number = 0
    for shard in shard_set.shards(split):
        # No wds.decode(): its default handlers would unpickle a .pyd/.pkl member and torch.load a .pth
        # one, running code from the shard. Only the two .npy members are decoded, without pickle.
        pipeline = wds.DataPipeline(wds.SimpleShardList([str(shard.path)]), wds.tarfile_to_samples())
        found = 0
        try:
            for block in pipeline:
                expected_key = block_key(block_number)
                members = sorted(k for k in block if not k.startswith("__"))
                if block.get("__key__") != expected_key or members != sorted((LENGTHS_MEMBER, TOKENS_MEMBER)):
                    raise UserError(f"shard {shard.path} holds member(s) {block.get('__key__')!r} {members} where "
                                    f"block {expected_key} ({LENGTHS_MEMBER}, {TOKENS_MEMBER}) was expected; {REMAKE}")
                tokens = npy_loads(block[TOKENS_MEMBER])
                block_lengths = npy_loads(block[LENGTHS_MEMBER]).astype(np.int64)
                n = len(block_lengths)
                if (found >= len(shard.block_samples) or n != shard.block_samples[found]
                        or int(block_lengths.sum()) != tokens.size
                        or not np.array_equal(block_lengths, lengths[next_sample:next_sample + n])):
                    raise UserError(f"shard {shard.path} block {expected_key} does not match the manifest or "
                                    f"the lengths file; {REMAKE}")
                if tokens.size and int(tokens.max()) >= limit:
                    raise UserError(f"shard {shard.path} block {expected_key} holds token id {int(tokens.max())}, "
                                    f"outside the vocabulary of {limit}; {REMAKE} using the run's tokenizer")
                next_sample += n
                block_number += 1
                found += 1
        except UserError:
            raise
        except Exception as err:  # tarfile.ReadError, ValueError from a damaged npy, ...
            raise UserError(f"shard {shard.path} is corrupt or truncated ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); copy it again or {REMAKE}") from None
        if found != len(shard.block_samples):
            raise UserError(f"shard {shard.path} holds {found} blocks, the manifest says "
                            f"{len(shard.block_samples)}; {REMAKE}")
    if next_sample != shard_set.num_samples(split):
        raise UserError(f"the {split} shards hold {next_sample} samples, {shard_set.dir / MANIFEST} says "
                        f"{shard_set.num_samples(split)}; {REMAKE}")
