"""Open and check a shard set, and read its samples by id (the format: `andy_dist.data.shard_format`).

`open_shards()` checks everything that can be checked before training starts and turns each
problem into a `UserError` that names the file and the fix: a missing or malformed manifest, a
missing, truncated or modified shard (size and sha256 against the manifest), a shard set made with
another tokenizer or vocabulary, token ids outside the vocabulary, an empty split. With
`verify="full"` it also reads every shard through a plain WebDataset pipeline
(`SimpleShardList -> tarfile_to_samples`; only the two .npy members are decoded, never by pickle)
and checks every block: its members, key, sample count, lengths against the lengths file, and its
largest token id.

`SampleReader` gives random access by sample id. The manifest records each block's sample count and
the byte offset of its first tar header, so reading a sample costs one seek plus one block read:
WebDataset's `tar_file_iterator` parses the two members from there and its npy decoder decodes them
(no pickle). A small LRU cache keeps recently used blocks, since the shuffled order visits a window of
blocks at a time (see `andy_dist.data.batch_plan`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.autodecode import npy_loads

from andy_dist import UserError
from andy_dist.data.shard_format import (
    LENGTHS_MEMBER,
    MANIFEST,
    REMAKE,
    SPLITS,
    TOKENS_MEMBER,
    block_key,
    read_manifest,
)
from andy_dist.data.tokenizer import Tokenizer

VERIFY_LEVELS = ("size", "sha256", "full")


@dataclass(frozen=True)
class ShardInfo:
    path: Path
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

    def __init__(self, directory: Path, manifest: dict):
        self.dir = directory
        self.manifest = manifest
        self._shards = {split: [_shard_info(directory, entry) for entry in manifest["splits"][split]["shards"]]
                        for split in SPLITS}
        self._lengths: dict[str, np.ndarray] = {}

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
            self._lengths[split] = _load_lengths(self.dir, self._split(split), self.num_samples(split))
        return self._lengths[split]

    def block_index(self, split: str) -> BlockIndex:
        paths, offsets, sizes, shard_of_block = [], [], [], []
        for shard_number, shard in enumerate(self.shards(split)):
            for offset, samples in zip(shard.block_offsets, shard.block_samples):
                paths.append(shard.path)
                offsets.append(offset)
                sizes.append(samples)
                shard_of_block.append(shard_number)
        return BlockIndex(tuple(paths), np.asarray(offsets, dtype=np.int64),
                          np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]),
                          np.asarray(shard_of_block, dtype=np.int64))

    def reader(self, split: str, cache_blocks: int = 32) -> "SampleReader":
        return SampleReader(self, split, cache_blocks)

    def __repr__(self) -> str:
        return (f"ShardSet({self.dir}, train={self.num_samples('train')} samples/{len(self.train)} shards, "
                f"val={self.num_samples('val')} samples/{len(self.val)} shards)")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _shard_info(directory: Path, entry: dict) -> ShardInfo:
    blocks = entry["blocks"]
    return ShardInfo(directory / entry["file"], int(entry["samples"]), int(entry["tokens"]), entry["sha256"],
                     int(entry["bytes"]), int(entry["max_token_id"]), tuple(int(b[0]) for b in blocks),
                     tuple(int(b[1]) for b in blocks))


def _load_lengths(directory: Path, split_entry: dict, samples: int) -> np.ndarray:
    path = directory / split_entry["lengths_file"]
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
    directory: str | Path,
    tokenizer: Tokenizer | str | Path | None = None,
    vocab_size: int | None = None,
    verify: str = "full",
    require_val: bool = True,
) -> ShardSet:
    """Open `directory` (a shard set written by tools/make_shards.py) and check it; see the module doc.

    tokenizer: the run's tokenizer (object or path); its sha256 must match the one the shards were made with.
    vocab_size: the model's vocabulary size; it must equal the shards' and exceed every token id.
    verify: "size" (files and sizes), "sha256" (also hashes), "full" (also decodes every block).
    require_val: an empty validation split is an error (the trainer evaluates on it).
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    shard_set = ShardSet(directory, manifest)
    _check_tokenizer(shard_set, tokenizer, vocab_size)
    for split in SPLITS:
        if shard_set.num_samples(split) == 0 and (split == "train" or require_val):
            raise UserError(f"{directory / MANIFEST}: the {split} split is empty; "
                            f"{'add text to the input' if split == 'train' else 'make it with --val-fraction > 0'} "
                            f"and {REMAKE}")
        for shard in shard_set.shards(split):
            _check_file(shard, verify)
        lengths = shard_set.lengths(split)
        if int(lengths.sum(dtype=np.int64)) != shard_set.tokens(split):
            raise UserError(f"{directory / shard_set._split(split)['lengths_file']} does not match the manifest's "
                            f"token count for {split}; {REMAKE}")
        if verify == "full":
            _check_blocks(shard_set, split)
    return shard_set


def _check_tokenizer(shard_set: ShardSet, tokenizer, vocab_size: int | None) -> None:
    where = shard_set.dir / MANIFEST
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
        if tok.sha256 != shard_set.tokenizer_sha256:
            raise UserError(f"{shard_set.dir} was made with a different tokenizer (sha256 "
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
                raise UserError(f"{shard.path} holds token id {shard.max_token_id}, outside the vocabulary of "
                                f"{limit}; {REMAKE} using the run's tokenizer")


def _check_file(shard: ShardInfo, verify: str) -> None:
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
        digest = hashlib.sha256()
        with open(shard.path, "rb") as handle:
            for data in iter(lambda: handle.read(1 << 20), b""):
                digest.update(data)
        if digest.hexdigest() != shard.sha256:
            raise UserError(f"shard {shard.path} is corrupt: its sha256 {digest.hexdigest()[:12]} does not match "
                            f"the manifest's {shard.sha256[:12]}; copy it again or {REMAKE}")


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


# ---------------------------------------------------------------------------------------------
# Random access


class SampleReader:
    """Reads samples by id (0..N-1 within a split); one per process (it keeps files open)."""

    def __init__(self, shard_set: ShardSet, split: str, cache_blocks: int = 32):
        self.split = split
        self.index = shard_set.block_index(split)
        self.vocab_size = shard_set.vocab_size
        self.cache_blocks = cache_blocks
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._files: dict[Path, object] = {}
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

    def _read_block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.index.paths[number]
        offset = int(self.index.offsets[number])
        expected = int(self.index.sizes[number])
        key = None
        try:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = open(path, "rb")
            handle.seek(offset)
            members = {}
            for member in wds.tariterators.tar_file_iterator(handle):
                key, suffix = wds.tariterators.base_plus_ext(member["fname"])
                members[suffix] = member["data"]
                if len(members) == 2:
                    break
            lengths = npy_loads(members[LENGTHS_MEMBER]).astype(np.int64)
            tokens = npy_loads(members[TOKENS_MEMBER])
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
        state["_files"], state["_cache"] = {}, OrderedDict()
        return state

